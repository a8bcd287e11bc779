"""Correctness of shared_prefix_attention against reference_attention.

Every case runs forward + backward and checks out, lse, dq, dk, dv, dprefix_k
and dprefix_v with the FlashAttention-style rule of helpers.check_quantity.

Shape axes demanded by the issue: P in {0, 1, 7, 64, 130}, Lq in {1, 13, 128},
Lk in {Lq, Lq + 9}, D in {32, 64, 80, 128}, Hq/Hkv in {1, 4, 8}, G in {1, 3}
with a mixed prefix_index, left / right / no padding (with fully padded
requests), causal on / off.  The full product is too large, so the "torch"
lane uses a deterministic covering set: the full product of
P x Lq x Lk-offset x causal, with the remaining axes assigned greedily so that
*every pair of values of any two axes* occurs (checked by
test_covering_sets_are_complete).  The "triton" lane (CPU interpreter when no
GPU) does the same on small sizes.
"""

from __future__ import annotations

import itertools
import zlib
from collections import Counter
from typing import Dict, List

import pytest
import torch

from helpers import (
    DTYPE_NAMES,
    GRAD_NAMES,
    TENSOR_ARGS,
    assert_close_to_reference,
    describe,
    gpu_examples,
    make_inputs,
    run_op,
)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


# --------------------------------------------------------------------------
# Deterministic pairwise covering sets
# --------------------------------------------------------------------------


def covering_set(base: Dict[str, list], extra: Dict[str, list]) -> List[dict]:
    """Full product of the ``base`` axes; ``extra`` axes assigned so that every
    pair of values of any two axes appears in at least one row (greedy,
    IPOG-style, deterministic)."""
    rows = [dict(zip(base, vals)) for vals in itertools.product(*base.values())]
    axes = dict(base)
    for ax, values in extra.items():
        uncovered = {(o, ov, v) for o, ovals in axes.items() for ov in ovals for v in values}
        used = Counter()
        together = Counter()  # how often (axis o = ov) already met value v: spread combinations
        for r in rows:
            def score(v, r=r):
                gain = sum((o, r[o], v) in uncovered for o in axes)
                seen = sum(together[(o, r[o], v)] for o in axes)
                return (gain, -seen, -used[v], -values.index(v))

            best = max(values, key=score)
            r[ax] = best
            used[best] += 1
            for o in axes:
                together[(o, r[o], best)] += 1
            uncovered -= {(o, r[o], best) for o in axes}
        # Pairs the greedy pass could not reach: add rows (other axes take the
        # value of the first row; their pairs are already covered).
        for o, ov, v in sorted(uncovered, key=repr):
            if any(r[o] == ov and r[ax] == v for r in rows):
                continue
            new = dict(rows[0])
            new[o] = ov
            new[ax] = v
            rows.append(new)
        axes[ax] = values
    return rows


def uncovered_pairs(rows: List[dict], axes: Dict[str, list]):
    missing = []
    names = list(axes)
    for a, b in itertools.combinations(names, 2):
        seen = {(r[a], r[b]) for r in rows}
        for va in axes[a]:
            for vb in axes[b]:
                if (va, vb) not in seen:
                    missing.append((a, va, b, vb))
    return missing


def case_id(c: dict) -> str:
    pad = c["padding"] or "nopad"
    return (
        f"P{c['P']}-Lq{c['Lq']}-Lk+{c['dLk']}-{'causal' if c['causal'] else 'full'}-D{c['D']}"
        f"-r{c['ratio']}-Hkv{c['Hkv']}-G{c['G']}-{pad}-{DTYPE_NAMES[c['dtype']]}"
        f"-{'lse' if c['lse'] else 'out'}-B{c['B']}"
    )


TORCH_BASE = {
    "P": [0, 1, 7, 64, 130],
    "Lq": [1, 13, 128],
    "dLk": [0, 9],
    "causal": [True, False],
}
TORCH_EXTRA = {
    "D": [32, 64, 80, 128],
    "ratio": [1, 4, 8],
    "G": [1, 3],
    "padding": [None, "left", "right"],
    "dtype": [FP32, FP16, BF16],
    "lse": [True, False],
    "Hkv": [1, 2],
    "B": [2, 3, 5],
}
TORCH_CASES = covering_set(TORCH_BASE, TORCH_EXTRA)

# Small sizes for the Triton interpreter (slow): Lq <= 19, Lk <= 28.
TRITON_BASE = {
    "P": [0, 1, 7, 20],
    # 19 > 16 = the interpreter's BLOCK_M: crosses a query-block boundary, which
    # exercises the per-block causal loop bound.
    "Lq": [1, 7, 19],
    # Lk = Lq + 1 puts the causal diagonal one key past a block edge.
    "dLk": [0, 1, 9],
    "causal": [True, False],
}
TRITON_EXTRA = {
    "D": [16, 32, 80],
    "ratio": [1, 4, 8],
    "G": [1, 3],
    "padding": [None, "left", "right"],
    "dtype": [FP32, FP16],
    "lse": [True, False],
    "Hkv": [1, 2],
    "B": [2, 3, 5],
}
TRITON_CASES = covering_set(TRITON_BASE, TRITON_EXTRA)


def _shrink_triton(c: dict) -> dict:
    # Keep the interpreter lane cheap: Hq <= 8.
    c = dict(c)
    if c["ratio"] * c["Hkv"] > 8:
        c["Hkv"] = 1
    return c


TRITON_CASES = [_shrink_triton(c) for c in TRITON_CASES]


def run_case(c: dict, backend: str, device: str):
    Lq = c["Lq"]
    Lk = Lq + c["dLk"]
    Hkv = c["Hkv"]
    inp = make_inputs(
        c["B"], Hkv * c["ratio"], Hkv, Lq, Lk, c["P"], c["D"], c["G"], c["dtype"], device,
        padding=c["padding"], mixed_index=c["G"] > 1 or c["B"] % 2 == 0,
    )
    return assert_close_to_reference(
        inp, causal=c["causal"], return_lse=c["lse"], backend=backend,
        desc=f"{backend}:{case_id(c)}",
    )


def test_covering_sets_are_complete():
    for rows, base, extra in ((TORCH_CASES, TORCH_BASE, TORCH_EXTRA),):
        axes = {**base, **extra}
        assert not uncovered_pairs(rows, axes)
        for ax, values in axes.items():
            counts = Counter(r[ax] for r in rows)
            assert set(counts) == set(values), ax
            # every value appears many times
            assert min(counts.values()) >= 5, (ax, counts)
    # Triton lane: all pairs among the original axes (Hkv was shrunk for speed).
    axes = {**TRITON_BASE, **TRITON_EXTRA}
    axes.pop("Hkv")
    assert not uncovered_pairs(TRITON_CASES, axes)
    # fully padded requests happen (make_lengths: last request has length 0)
    assert any(c["padding"] and c["P"] == 0 for c in TORCH_CASES)
    assert any(c["padding"] and c["P"] == 0 for c in TRITON_CASES)
    assert len({case_id(c) for c in TORCH_CASES}) == len(TORCH_CASES)
    assert len({case_id(c) for c in TRITON_CASES}) == len(TRITON_CASES)
    # the triton launcher splits a prefix's requests when B >= 4 G: B=5, G=1 occurs
    assert any(c["B"] == 5 and c["G"] == 1 for c in TRITON_CASES)


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_torch_backend_matrix(case):
    run_case(case, "torch", "cpu")


@pytest.mark.parametrize("case", TORCH_CASES[::6], ids=case_id)
def test_torch_backend_explicit_path(case, monkeypatch):
    """The torch backend's explicit path (what CUDA tensors take when triton declines), on a CPU."""
    from prefix_kernels.backends import torch_split as torch_backend

    monkeypatch.setattr(torch_backend, "FUSED_CPU", False)
    monkeypatch.setenv("PREFIX_KERNELS_DISABLE_CPU_KERNEL", "1")  # float32 would take the one-pass kernel
    run_case(case, "torch", "cpu")


@pytest.mark.parametrize("case", [c for c in TORCH_CASES if c["P"] > 0 and not c["lse"]][::3], ids=case_id)
def test_torch_backend_prefix_backward_in_chunks(case, monkeypatch):
    """The CPU path's prefix backward bounds its scores' memory by taking query rows in chunks;
    a budget of 2 * Hq * P score elements leaves two query rows to a chunk. (Cases without lse:
    a gradient through lse takes the explicit path.)"""
    from prefix_kernels.backends.vendor import kernels

    monkeypatch.setattr(kernels, "PREFIX_BWD_SCORES", 2 * case["Hkv"] * case["ratio"] * case["P"])
    monkeypatch.setenv("PREFIX_KERNELS_DISABLE_CPU_KERNEL", "1")  # float32 would take the one-pass kernel
    run_case(case, "torch", "cpu")


@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_backend_matrix(case, triton_device):
    run_case(case, "triton", triton_device)


def test_reference_backend():
    c = dict(P=7, Lq=13, dLk=9, causal=True, D=32, ratio=4, Hkv=2, G=3, padding="left",
             dtype=FP32, lse=True, B=3)
    run_case(c, "reference", "cpu")


# --------------------------------------------------------------------------
# Focused cases, for both backends
# --------------------------------------------------------------------------

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend_device(request):
    if request.param == "triton":
        return "triton", request.getfixturevalue("triton_device")
    return "torch", "cpu"


# lse on and off in the focused cases below: with a gradient into lse the torch backend's CPU path
# takes its explicit backward, without one its fused backward.
LSE = pytest.mark.parametrize("lse", [True, False], ids=["lse", "no_lse"])


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=DTYPE_NAMES.get)
@LSE
@pytest.mark.parametrize("padding", [None, "left"])
def test_transposed_inputs(backend_device, dtype, padding, lse):
    backend, device = backend_device
    inp = make_inputs(3, 4, 2, 5, 11, 7, 32, 3, dtype, device, padding=padding, transposed=True)
    assert not inp["q"].is_contiguous() and not inp["k"].is_contiguous()
    assert not inp["prefix_k"].is_contiguous()
    assert_close_to_reference(inp, causal=True, return_lse=lse, backend=backend)


def _every_other(x):
    """x as a view of every other element of a twice-as-wide leaf: stride 2 along D."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x.detach()
    return wide.requires_grad_(x.requires_grad)[..., ::2]


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=DTYPE_NAMES.get)
@LSE
def test_head_dim_strided_inputs(backend_device, dtype, lse):
    """Inputs whose head dim has stride 2, and a prefix_index read with stride 2, then expanded
    (stride 0). ATen's CPU flash kernel, under the torch backend's fp16 path, reads the head dim
    as contiguous (errors of ~2); the triton kernels once read prefix_index as contiguous (wrong
    prefixes; a segfault when expanded)."""
    backend, device = backend_device
    inp = make_inputs(3, 4, 2, 5, 11, 7, 32, 3, dtype, device, padding="left")
    for name in TENSOR_ARGS:
        inp[name] = _every_other(inp[name])
        assert inp[name].stride(-1) == 2
    index = inp["prefix_index"]
    inp["prefix_index"] = torch.stack([index, torch.zeros_like(index)], 1).flatten()[::2]
    assert inp["prefix_index"].stride() == (2,) and torch.equal(inp["prefix_index"], index)
    assert_close_to_reference(inp, causal=True, return_lse=lse, backend=backend)
    inp["prefix_index"] = index[1:2].expand(3)
    assert_close_to_reference(inp, causal=True, return_lse=lse, backend=backend)


@pytest.mark.parametrize("scale", [0.3, 1.7])
def test_custom_scale(backend_device, scale):
    backend, device = backend_device
    inp = make_inputs(2, 4, 1, 6, 9, 7, 32, 1, FP32, device, padding="right")
    res = assert_close_to_reference(inp, causal=True, scale=scale, return_lse=True, backend=backend)
    # The scale really is used: differs from the default-scale result.
    default = run_op(inp, causal=True, return_lse=False, backend=backend)
    assert not torch.allclose(res["out"].detach(), default.detach(), atol=1e-3)


@LSE
@pytest.mark.parametrize("with_mask", [False, True])
def test_no_per_request_keys(backend_device, with_mask, lse):
    """Lk == 0 with P > 0: attention over the prefix only."""
    backend, device = backend_device
    inp = make_inputs(3, 4, 2, 5, 0, 7, 32, 3, FP32, device)
    if with_mask:
        inp["kv_mask"] = torch.ones(3, 0, dtype=torch.bool, device=device)
    for causal in (True, False):
        res = assert_close_to_reference(inp, causal=causal, return_lse=lse, backend=backend)
        assert not lse or torch.isfinite(res["lse"]).all()
        assert res["dk"].shape == (3, 2, 0, 32)


@LSE
@pytest.mark.parametrize("padding", ["left", "right"])
def test_no_prefix_fully_padded_rows(backend_device, padding, lse):
    """P == 0: fully padded requests (and, with left padding + causal, early
    rows) have no visible key -> out 0, lse -inf, zero gradients, no NaN."""
    backend, device = backend_device
    B, Hq, Hkv, Lq, Lk, D = 3, 4, 2, 5, 8, 32
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, 0, D, 1, FP32, device, padding=padding)
    assert inp["lengths"][-1] == 0
    for causal in (True, False):
        res = assert_close_to_reference(inp, causal=causal, return_lse=lse, backend=backend)
        out = res["out"].detach()
        assert torch.all(out[-1] == 0)
        if lse:
            assert torch.all(torch.isneginf(res["lse"][-1])) and torch.isfinite(res["lse"][0]).all()
        assert torch.all(res["dq"][-1] == 0)
        assert torch.all(res["dk"][-1] == 0) and torch.all(res["dv"][-1] == 0)
        for name in ("dq", "dk", "dv", "dprefix_k", "dprefix_v"):
            assert not torch.isnan(res[name]).any(), name


def test_no_keys_at_all(backend_device):
    """P == 0 and Lk == 0: every row is empty."""
    backend, device = backend_device
    inp = make_inputs(2, 2, 1, 3, 0, 0, 16, 2, FP32, device)
    out, lse = run_op(inp, return_lse=True, backend=backend)
    assert out.shape == (2, 2, 3, 16) and torch.all(out == 0)
    assert torch.all(torch.isneginf(lse))
    grads = torch.autograd.grad(
        [out, lse], [inp[n] for n in TENSOR_ARGS],
        [torch.randn_like(out), torch.randn_like(lse)], allow_unused=True,
    )
    for name, g in zip(TENSOR_ARGS, grads):
        if g is not None:
            assert torch.all(g == 0), name


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_prefix_index_dtypes(backend_device, index_dtype):
    backend, device = backend_device
    inp = make_inputs(3, 2, 2, 4, 6, 7, 16, 3, FP32, device, index_dtype=index_dtype,
                      padding="right")
    assert inp["prefix_index"].dtype == index_dtype
    assert_close_to_reference(inp, causal=True, return_lse=True, backend=backend)


def test_one_prefix_for_all_with_several_in_the_tensor(backend_device):
    """Every request on prefix 0 of three: the other two get exactly zero gradient. (Without
    prefix_index, several prefixes are refused: tests/test_errors.py.)"""
    backend, device = backend_device
    inp = make_inputs(2, 2, 1, 4, 6, 7, 16, 3, FP32, device, mixed_index=False)
    assert inp["prefix_index"].tolist() == [0, 0]
    res = assert_close_to_reference(inp, causal=True, return_lse=True, backend=backend)
    assert torch.all(res["dprefix_k"][1:] == 0) and torch.all(res["dprefix_v"][1:] == 0)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=DTYPE_NAMES.get)
def test_unused_prefix_has_exactly_zero_grad(backend_device, dtype):
    backend, device = backend_device
    inp = make_inputs(3, 4, 2, 5, 7, 9, 32, 3, dtype, device, padding="left")
    inp["prefix_index"] = torch.tensor([2, 0, 2], device=device)  # prefix 1 unused
    res = assert_close_to_reference(inp, causal=True, return_lse=True, backend=backend)
    assert torch.all(res["dprefix_k"][1] == 0)
    assert torch.all(res["dprefix_v"][1] == 0)
    assert res["dprefix_k"][0].abs().sum() > 0 and res["dprefix_k"][2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=DTYPE_NAMES.get)
def test_deterministic(backend_device, dtype):
    backend, device = backend_device
    inp = make_inputs(3, 4, 2, 13, 17, 20, 32, 3, dtype, device, padding="right")
    tensors = [inp[n] for n in TENSOR_ARGS]

    def once():
        out, lse = run_op(inp, causal=True, return_lse=True, backend=backend)
        g = torch.Generator(device="cpu").manual_seed(123)
        dout = torch.randn(out.shape, generator=g).to(device=device, dtype=out.dtype)
        dlse = torch.randn(lse.shape, generator=g).to(device=device)
        grads = torch.autograd.grad([out, lse], tensors, [dout, dlse])
        return [out.detach(), lse.detach(), *grads]

    first, second = once(), once()
    names = ["out", "lse"] + [GRAD_NAMES[n] for n in TENSOR_ARGS]
    for name, a, b in zip(names, first, second):
        assert torch.equal(a, b), f"{backend}: {name} differs between two identical runs"


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("PREFIX_KERNELS_BACKEND", raising=False)  # the implementation's debug override
    inp = make_inputs(3, 4, 2, 5, 8, 7, 32, 3, FP32, "cpu", padding="left")
    tensors = [inp[n] for n in TENSOR_ARGS]
    res = {}
    for backend in ("auto", "torch"):
        out, lse = run_op(inp, causal=True, return_lse=True, backend=backend)
        torch.manual_seed(5)
        grads = torch.autograd.grad([out, lse], tensors, [torch.randn_like(out), torch.randn_like(lse)])
        res[backend] = [out.detach(), lse.detach(), *grads]
    for a, b in zip(res["auto"], res["torch"]):
        assert torch.equal(a, b)
    # default backend is "auto"
    out_default = run_op(inp, causal=True)
    assert torch.equal(out_default.detach(), res["torch"][0])


def test_return_lse_false_returns_tensor(backend_device):
    backend, device = backend_device
    inp = make_inputs(2, 2, 1, 3, 4, 5, 16, 1, FP32, device, requires_grad=False)
    out = run_op(inp, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 3, 16)
    out2, lse = run_op(inp, backend=backend, return_lse=True)
    assert torch.equal(out, out2) and lse.shape == (2, 2, 3)


def test_causal_default_is_true(backend_device):
    backend, device = backend_device
    inp = make_inputs(2, 2, 1, 4, 6, 3, 16, 1, FP32, device, requires_grad=False)
    a = run_op(inp, backend=backend)
    b = run_op(inp, backend=backend, causal=True)
    c = run_op(inp, backend=backend, causal=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_forward_without_grad(backend_device):
    backend, device = backend_device
    inp = make_inputs(2, 4, 2, 5, 8, 7, 32, 3, FP16, device, padding="left", requires_grad=False)
    with torch.no_grad():
        out, lse = run_op(inp, return_lse=True, backend=backend)
    assert not out.requires_grad
    inp_g = {k: (v.detach().clone().requires_grad_() if k in TENSOR_ARGS else v) for k, v in inp.items()}
    res = assert_close_to_reference(inp_g, causal=True, return_lse=True, backend=backend)
    assert torch.equal(out, res["out"].detach())


@pytest.mark.parametrize("D", [16, 48, 96, 112, 256])
def test_head_dims_torch(D):
    inp = make_inputs(2, 4, 2, 13, 22, 7, D, 3, FP32, "cpu", padding="right")
    assert_close_to_reference(inp, causal=True, return_lse=True, backend="torch")
    inp = make_inputs(2, 4, 2, 13, 22, 7, D, 3, FP16, "cpu", padding="left")
    assert_close_to_reference(inp, causal=False, return_lse=True, backend="torch")


@pytest.mark.parametrize("D", [48, 112, 256])
def test_head_dims_triton(D, triton_device):
    inp = make_inputs(2, 2, 1, 5, 9, 7, D, 2, FP32, triton_device, padding="right")
    assert_close_to_reference(inp, causal=True, return_lse=True, backend="triton")


# --------------------------------------------------------------------------
# GPU lane (skipped without CUDA)
# --------------------------------------------------------------------------

GPU_CASES = []
for _i, (_P, _D, _dtype) in enumerate(itertools.product([0, 16, 130], [64, 80, 128], [BF16, FP16, FP32])):
    GPU_CASES.append(
        dict(P=_P, D=_D, dtype=_dtype, backend=("triton", "auto")[_i % 2],
             causal=_i % 3 != 1, padding=(None, "left", "right")[(_i // 2) % 3], G=(1, 3)[_i % 2])
    )


def _gpu_id(c):
    return (f"P{c['P']}-D{c['D']}-{DTYPE_NAMES[c['dtype']]}-{c['backend']}-"
            f"{'causal' if c['causal'] else 'full'}-{c['padding'] or 'nopad'}-G{c['G']}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_gpu_id)
def test_gpu_triton(case):
    c = case
    inp = make_inputs(4, 8, 2, 256, 256, c["P"], c["D"], c["G"], c["dtype"], "cuda",
                      padding=c["padding"])
    assert_close_to_reference(inp, causal=c["causal"], return_lse=True, backend=c["backend"],
                              desc=f"gpu:{_gpu_id(c)}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=DTYPE_NAMES.get)
def test_gpu_auto_is_triton_and_deterministic(dtype):
    inp = make_inputs(4, 8, 2, 100, 109, 130, 80, 3, dtype, "cuda", padding="left",
                      transposed=True)
    tensors = [inp[n] for n in TENSOR_ARGS]
    runs = []
    for backend in ("auto", "triton", "triton"):
        out, lse = run_op(inp, causal=True, return_lse=True, backend=backend)
        g = torch.Generator(device="cpu").manual_seed(1)
        dout = torch.randn(out.shape, generator=g).to(device="cuda", dtype=dtype)
        dlse = torch.randn(lse.shape, generator=g).cuda()
        grads = torch.autograd.grad([out, lse], tensors, [dout, dlse])
        runs.append([out.detach(), lse.detach(), *grads])
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(b, c)


# --------------------------------------------------------------------------
# Randomised shapes (hypothesis, derandomized: the same examples every run)
# --------------------------------------------------------------------------

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def random_case(draw, max_L, max_P, dims, dtypes, max_heads):
    Lq = draw(st.integers(1, max_L))
    Hkv = draw(st.integers(1, 2))
    ratio = draw(st.sampled_from([r for r in (1, 2, 3, 4, 8) if r * Hkv <= max_heads]))
    return dict(
        B=draw(st.integers(1, 4)),
        Hkv=Hkv,
        ratio=ratio,
        Lq=Lq,
        Lk=draw(st.integers(0, Lq + 10)),  # Lk < Lq too: early rows see no own key
        P=draw(st.integers(0, max_P)),
        D=draw(st.sampled_from(dims)),
        G=draw(st.integers(1, 3)),
        padding=draw(st.sampled_from([None, "left", "right"])),
        causal=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        transposed=draw(st.booleans()),
        mixed=draw(st.booleans()),
        # with lse returned, a gradient flows into it, and the torch backend's CPU path takes its
        # explicit backward: both halves of the draws test different code there
        lse=draw(st.booleans()),
    )


def _run_random(c, backend, device):
    torch.manual_seed(zlib.crc32(repr(sorted((k, str(v)) for k, v in c.items())).encode()))
    inp = make_inputs(c["B"], c["Hkv"] * c["ratio"], c["Hkv"], c["Lq"], c["Lk"], c["P"], c["D"], c["G"],
                      c["dtype"], device, padding=c["padding"], mixed_index=c["mixed"],
                      transposed=c["transposed"])
    assert_close_to_reference(inp, causal=c["causal"], return_lse=c["lse"], backend=backend,
                              desc=f"{backend}:{describe(**c)}")


_HYP = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=500, **_HYP)  # with the triton lane: 540 drawn cases in CI
@given(c=random_case(max_L=40, max_P=70, dims=[16, 24, 40, 64, 72, 96, 112, 256],
                     dtypes=[FP32, FP16, BF16], max_heads=8))
def test_torch_random_shapes(c):
    _run_random(c, "torch", "cpu")


# No shrinking under the interpreter (a failing example is printed with the
# whole case in the assertion message; shrinking would take minutes).
@settings(max_examples=40, phases=[Phase.explicit, Phase.reuse, Phase.generate], **_HYP)
@given(c=random_case(max_L=24, max_P=24, dims=[16, 24, 40, 64, 96], dtypes=[FP32, FP16], max_heads=4))
def test_triton_random_shapes(c, triton_device):
    _run_random(c, "triton", triton_device)


# GPU fuzzing (skipped without CUDA): more draws, longer rows, bf16, up to 16 query heads. Every
# training backend: on CUDA the torch backend is the explicit fallback path, and composed the
# vendor-kernel one.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "composed", "torch"])
@settings(max_examples=gpu_examples(200), **_HYP)  # x 3 backends; each new constexpr set costs a triton compile
@given(c=random_case(max_L=300, max_P=300, dims=[16, 24, 40, 64, 72, 96, 112, 128, 256],
                     dtypes=[FP32, FP16, BF16], max_heads=16))
def test_gpu_random_shapes(backend, c):
    _run_random(c, backend, "cuda")


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("P", [0, 5])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_cpu_fused_path_takes_finite_inputs(monkeypatch, padding, P, G):
    """Finite inputs never fall back to the explicit path, which would only show as a slowdown:
    rows that see no own key (left padding) included. (A finiteness check placed after those
    rows' lse was set to -inf once sent every left-padded batch down the explicit path.)"""
    from prefix_kernels.backends.torch_split import aten_cpu

    monkeypatch.setenv("PREFIX_KERNELS_DISABLE_CPU_KERNEL", "1")  # float32 would take the one-pass kernel
    declined, ran = [], []
    for name in ("forward", "backward"):
        original = getattr(aten_cpu, name)

        def watched(*args, _original=original, _name=name):
            result = _original(*args)
            ran.append(_name)
            if result is None:
                declined.append(_name)
            return result

        monkeypatch.setattr(aten_cpu, name, watched)
    inp = make_inputs(3, 4, 2, 6, 6, P, 16, G, FP32, "cpu", padding=padding)
    out = run_op(inp, causal=True, backend="torch")
    out.backward(torch.randn_like(out))
    assert ran == ["forward", "backward"] and not declined


def test_cpu_mask_bias_cache_never_serves_a_stale_mask(monkeypatch):
    """The split path's ATen CPU half caches the bias of the last kv_mask (every layer passes
    the same one): an in-place change, a different slice of the same memory, and a new mask that
    may reuse a freed address must each be seen."""
    monkeypatch.setenv("PREFIX_KERNELS_DISABLE_CPU_KERNEL", "1")  # float32 would take the one-pass kernel
    inp = make_inputs(3, 4, 2, 6, 6, 5, 16, 1, FP32, "cpu", padding="right", requires_grad=False)
    mask = inp["kv_mask"]
    first = run_op(inp, backend="torch")
    mask[0, :] = False  # in place: version changes
    changed = run_op(inp, backend="torch")
    assert not torch.equal(first, changed)
    torch.testing.assert_close(changed, run_op(inp, backend="reference"), rtol=1e-5, atol=1e-5)
    for _ in range(3):  # fresh masks, possibly at the address of the last freed one
        fresh = torch.rand(3, 6) > 0.5
        inp_fresh = dict(inp, kv_mask=fresh)
        torch.testing.assert_close(run_op(inp_fresh, backend="torch"), run_op(inp_fresh, backend="reference"),
                                   rtol=1e-5, atol=1e-5)
        del fresh, inp_fresh
    wide = torch.rand(3, 12) > 0.3  # two slices of one storage with the same shape
    for cols in (slice(0, 6), slice(6, 12)):
        inp_slice = dict(inp, kv_mask=wide[:, cols])
        torch.testing.assert_close(run_op(inp_slice, backend="torch"), run_op(inp_slice, backend="reference"),
                                   rtol=1e-5, atol=1e-5)
