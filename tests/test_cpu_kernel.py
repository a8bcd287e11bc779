"""The one-pass CPU kernel (csrc/prefix_attention_cpu.cpp): it is built and taken by the public
"torch" backend for float32 CPU tensors (with a prefix_mask too), it matches the float64 reference
with BLAS and with its plain loop (padded prefixes, masks with holes, rows that see no key), and
switching it off returns the split path (ATen's fused kernel twice + a merge)."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import assert_close_to_reference, make_inputs
from prefix_kernels import shared_prefix_attention
from prefix_kernels.backends import cpu_kernel
from prefix_kernels.backends.torch_split import aten_cpu

FP32 = torch.float32


def _toolchain_missing():
    from torch.utils import cpp_extension

    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler on PATH"
    if not cpp_extension.is_ninja_available():
        return "ninja not found"
    return None


@pytest.fixture
def kernel():
    why = _toolchain_missing()
    if why:
        pytest.skip(f"the CPU kernel cannot be built here: {why}")
    assert cpu_kernel.unavailable() is None, cpu_kernel.unavailable()
    return torch.ops.prefix_kernels_cpu


def _count(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_float32_cpu_calls_take_the_kernel(kernel, monkeypatch):
    fwd, bwd = _count(monkeypatch, cpu_kernel, "forward"), _count(monkeypatch, cpu_kernel, "backward")
    split = _count(monkeypatch, aten_cpu, "forward")
    inp = make_inputs(3, 4, 2, 5, 7, 6, 16, 1, FP32, padding="left")
    assert_close_to_reference(inp, backend="torch", return_lse=False)
    assert (len(fwd), len(bwd), len(split)) == (1, 1, 0)


# (B, Hq, Hkv, Lq, Lk, P, D, G, padding, causal): GQA and MHA, no prefix, no own keys, several
# prefixes, a cache (Lk > Lq), rows that see no own key (left padding with P = 0), one query row.
CASES = [
    (3, 4, 2, 5, 7, 6, 16, 2, "left", True),
    (2, 4, 4, 9, 9, 0, 32, 1, "right", True),
    (2, 6, 2, 4, 0, 5, 16, 1, None, True),
    (4, 2, 1, 1, 13, 3, 64, 3, "left", False),
    (2, 4, 1, 70, 70, 17, 16, 1, "left", True),
    (3, 2, 2, 3, 6, 0, 16, 1, "left", True),
]


def _holed_mask(G, P, generator=None):
    """A (G, P) prefix_mask with holes inside its visible span (not a padding), one prefix (when
    G > 1) entirely masked, and the first prefix's first and last keys visible."""
    mask = torch.rand(G, P, generator=generator) < 0.6
    if P > 0:
        mask[0, 0] = mask[0, -1] = True
    if G > 1:
        mask[G // 2] = False
    return mask


@pytest.fixture
def blas_setting(kernel, request):
    """Runs the test with BLAS on or off (the plain loop), restoring the setting afterwards."""
    blas = request.param
    if not blas and not kernel.has_blas():
        pytest.skip("no BLAS in this process: the loop is what every case above runs")
    previous = kernel.set_use_blas(blas)
    yield blas
    kernel.set_use_blas(previous)


BLAS = pytest.mark.parametrize("blas_setting", [True, False], ids=["blas", "loop"], indirect=True)


# prefix_mask: none, a left- or right-padded prompt per prefix (one prefix entirely masked when
# G > 1), or holes inside the visible span.
@BLAS
@pytest.mark.parametrize("prefix_padding", [None, "left", "right", "holes"],
                         ids=["no_prefix_mask", "prefix_left", "prefix_right", "prefix_holes"])
@pytest.mark.parametrize("lse", [True, False], ids=["lse", "no_lse"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_reference(kernel, case, lse, prefix_padding, blas_setting):
    B, Hq, Hkv, Lq, Lk, P, D, G, padding, causal = case
    torch.manual_seed(hash(case) % 1000)
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, G, FP32, padding=padding,
                      prefix_padding=None if prefix_padding == "holes" else prefix_padding)
    if prefix_padding == "holes":
        inp["prefix_mask"] = _holed_mask(G, P)
    res = assert_close_to_reference(inp, causal=causal, return_lse=lse, backend="torch")
    if inp["prefix_mask"] is not None:  # a hidden prefix key's gradient is exactly 0
        hidden = ~inp["prefix_mask"][:, None, :, None].expand_as(inp["prefix_k"])
        assert torch.all(res["dprefix_k"][hidden] == 0) and torch.all(res["dprefix_v"][hidden] == 0)


def _run(inp, **kw):
    """out, lse and the five gradients of the public op on the torch backend (dout and dlse fixed)."""
    tensors = [inp[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    out, lse = shared_prefix_attention(*tensors, prefix_index=inp["prefix_index"], kv_mask=inp["kv_mask"],
                                       prefix_mask=inp["prefix_mask"], return_lse=True, backend="torch", **kw)
    g = torch.Generator().manual_seed(1)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # -inf lse: no gradient through it
    grads = torch.autograd.grad((out * dout).sum() + (finite * dlse).sum(), tensors)
    return (out, lse, *grads)


def test_prefix_mask_takes_the_kernel(kernel, monkeypatch):
    fwd, bwd = _count(monkeypatch, cpu_kernel, "forward"), _count(monkeypatch, cpu_kernel, "backward")
    split = _count(monkeypatch, aten_cpu, "forward")
    inp = make_inputs(3, 4, 2, 5, 7, 6, 16, 2, FP32, padding="left", prefix_padding="left")
    assert cpu_kernel.reasons(_problem(inp)) == []
    assert_close_to_reference(inp, backend="torch", return_lse=False)
    assert (len(fwd), len(bwd), len(split)) == (1, 1, 0)


def _problem(inp, causal=True):
    from prefix_kernels._core.problem import check_inputs

    tensors = [inp[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    return check_inputs(*tensors, inp["prefix_index"], inp["kv_mask"], None, causal, prefix_mask=inp["prefix_mask"])


@BLAS
@pytest.mark.parametrize("Lq", [3, 70], ids=["one_block", "two_blocks"])
def test_a_row_that_sees_no_key(kernel, blas_setting, Lq):
    """Request 0 reads prefix 0, every key of which is masked, and has no visible own key: out 0,
    lse -inf, zero gradients, no NaN; request 1 (prefix 1: padding on both sides and a hole) is
    unaffected. The keys outside a prefix's visible span are never read: NaN and Inf there reach
    nothing, gradients included. A NaN key in a hole reaches neither out nor lse (its
    probability is 0); in the backward it reaches dq through 0 * NaN, as in the reference."""
    torch.manual_seed(0)
    B, Hq, Hkv, Lk, P, D, G = 2, 4, 2, 5, 6, 16, 2
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, G, FP32, requires_grad=False)
    inp["prefix_index"] = torch.tensor([0, 1])
    inp["kv_mask"] = torch.tensor([[False] * Lk, [True] * Lk])
    inp["prefix_mask"] = torch.tensor([[False] * P, [False, True, False, True, True, False]])
    outside = torch.tensor([[True] * P, [True, False, False, False, False, True]])  # outside the span
    clean = {n: inp[n].clone() for n in ("prefix_k", "prefix_v")}
    for n, bad in (("prefix_k", float("nan")), ("prefix_v", float("inf"))):
        inp[n][outside[:, None, :].expand(G, Hkv, P)] = bad
    inp["prefix_k"][0, 0, 0] = float("inf")
    for n in ("q", "k", "v", "prefix_k", "prefix_v"):
        inp[n].requires_grad_(True)
    out, lse, dq, dk, dv, dpk, dpv = _run(inp)
    for t in (out, lse.nan_to_num(neginf=0.0), dq, dk, dv, dpk, dpv):
        assert torch.isfinite(t).all()
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0])) and torch.isfinite(lse[1]).all()
    assert torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    hidden = ~inp["prefix_mask"][:, None, :, None].expand_as(dpk)
    assert torch.all(dpk[hidden] == 0) and torch.all(dpv[hidden] == 0)
    # bitwise what clean hidden keys give, and within the rule of the float64 reference
    clean_inp = dict(inp, **{n: clean[n].requires_grad_(True) for n in clean})
    again = _run(clean_inp)
    for a, b in zip((out, lse, dq, dk, dv, dpk, dpv), again):
        assert torch.equal(a, b)
    assert_close_to_reference(clean_inp, backend="torch")
    # a NaN key in the hole: out and lse as without it
    holed = dict(clean_inp, prefix_k=clean["prefix_k"].detach().clone())
    holed["prefix_k"][1, :, 2] = float("nan")
    with torch.no_grad():
        out2, lse2 = shared_prefix_attention(*(holed[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")),
                                             prefix_index=holed["prefix_index"], kv_mask=holed["kv_mask"],
                                             prefix_mask=holed["prefix_mask"], return_lse=True, backend="torch")
    assert torch.equal(out2, out.detach()) and torch.equal(lse2, lse.detach())


def test_prefix_mask_is_deterministic(kernel):
    inp = make_inputs(8, 4, 2, 9, 11, 13, 16, 3, FP32, padding="left", prefix_padding="right")
    first, second = _run(inp), _run(inp)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_all_true_prefix_mask_is_bitwise_no_mask(kernel):
    inp = make_inputs(4, 4, 2, 6, 7, 9, 16, 2, FP32, padding="right")
    plain = _run(inp)
    masked = _run(dict(inp, prefix_mask=torch.ones(2, 9, dtype=torch.bool)))
    assert all(torch.equal(a, b) for a, b in zip(plain, masked))


def test_ops_keep_their_old_positional_form(kernel):
    """prefix_mask is the schema's last argument, defaulting to None: calls without it still work,
    and a mask of the wrong shape is refused by the C++ check."""
    inp = make_inputs(2, 4, 2, 3, 4, 5, 16, 2, FP32, padding="left", requires_grad=False)
    args = [inp[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    out, lse = kernel.fwd(*args, inp["prefix_index"], inp["kv_mask"], True, 0.25)
    same, same_lse = kernel.fwd(*args, inp["prefix_index"], inp["kv_mask"], True, 0.25,
                                torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(out, same) and torch.equal(lse, same_lse)
    grads = kernel.bwd(torch.ones_like(out), None, *args, inp["prefix_index"], inp["kv_mask"], out, lse, True, 0.25)
    assert len(grads) == 5
    with pytest.raises(RuntimeError, match="prefix_mask must have shape"):
        kernel.fwd(*args, inp["prefix_index"], inp["kv_mask"], True, 0.25, torch.ones(2, 6, dtype=torch.bool))


def test_disabled_kernel_takes_the_split_path(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_DISABLE, "1")
    one_pass, split = _count(monkeypatch, cpu_kernel, "forward"), _count(monkeypatch, aten_cpu, "forward")
    assert "disabled" in cpu_kernel.unavailable()
    inp = make_inputs(3, 4, 2, 5, 7, 6, 16, 2, FP32, padding="left")
    assert_close_to_reference(inp, backend="torch", return_lse=False)
    assert (len(one_pass), len(split)) == (0, 1)


def test_source_is_cxx17():
    """torch 2.11's extension builder (the GPU machine's) compiles with -std=c++17, torch 2.13's
    with c++20: a C++20-only header or function in the CPU kernel builds here and fails there
    (std::bit_cast did), leaving that machine on the split path. torch 2.13's own headers need
    C++20, so the source cannot be compiled as C++17 here; it is read instead."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "csrc" / "prefix_attention_cpu.cpp").read_text()
    source = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)  # comments may name them
    cxx20_headers = ("bit", "span", "concepts", "ranges", "numbers", "format", "source_location", "compare")
    found = [h for h in cxx20_headers if re.search(rf"#include\s*<{h}>", source)]
    found += [f for f in ("std::bit_cast", "std::span", "std::ranges", "std::popcount", "std::countl_zero")
              if f in source]
    assert not found, f"C++20-only in csrc/prefix_attention_cpu.cpp: {found}"
