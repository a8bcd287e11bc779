"""prefix_mask (G, P): prompts of different lengths, left- or right-padded, sharing one (G, Hkv, P, D)
prefix tensor. Every backend against the float64 reference, forward and all five gradients (the
same accuracy rule as the rest of the suite), decode, rows that see no key, the checks, and the
custom ops under torch.compile."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close_to_reference, make_inputs, run_op
from prefix_kernels import NoBackendError, shared_prefix_attention, shared_prefix_decode
from prefix_kernels.backends import registry
from prefix_kernels._core.problem import check_inputs
from test_decode import assert_decode_close

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (B, Hq, Hkv, Lq, Lk, P, D, G, padding, prefix_padding, causal): GQA and MHA, one and several
# prefixes (one entirely padding), P = 1, prefixes longer than a tile, no own keys (rows whose
# only keys are the masked prefix: some see nothing), a cache (Lk > Lq), both paddings.
CASES = [
    (3, 4, 2, 5, 5, 6, 16, 2, "right", "left", True),
    (4, 4, 4, 7, 9, 37, 32, 3, "left", "left", True),
    (2, 2, 1, 3, 0, 5, 16, 3, None, "left", True),
    (3, 4, 2, 1, 13, 1, 64, 1, "left", "right", False),
    (5, 6, 2, 4, 4, 70, 16, 2, None, "right", True),
]


@pytest.mark.parametrize("lse", [True, False], ids=["lse", "no_lse"])
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_torch_backend(case, dtype, lse):
    B, Hq, Hkv, Lq, Lk, P, D, G, padding, prefix_padding, causal = case
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, G, dtype, padding=padding, prefix_padding=prefix_padding)
    assert_close_to_reference(inp, causal=causal, return_lse=lse, backend="torch")


@pytest.mark.parametrize("case", CASES[::2], ids=[f"case{i}" for i in range(0, len(CASES), 2)])
def test_torch_backend_explicit_path(case, monkeypatch):
    """The split path's explicit half (what CUDA tensors take when triton declines), on a CPU."""
    from prefix_kernels.backends import torch_split

    monkeypatch.setattr(torch_split, "FUSED_CPU", False)
    B, Hq, Hkv, Lq, Lk, P, D, G, padding, prefix_padding, causal = case
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, G, FP32, padding=padding, prefix_padding=prefix_padding)
    assert_close_to_reference(inp, causal=causal, backend="torch")


@pytest.mark.parametrize("lse", [True, False], ids=["lse", "no_lse"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_backend(case, lse, triton_device):
    B, Hq, Hkv, Lq, Lk, P, D, G, padding, prefix_padding, causal = case
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, G, FP32, triton_device, padding=padding,
                      prefix_padding=prefix_padding)
    assert_close_to_reference(inp, causal=causal, return_lse=lse, backend="triton")


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_cpu_kernel(case):
    """float32 CPU tensors: the public "torch" backend tries the one-pass CPU kernel first."""
    B, Hq, Hkv, Lq, Lk, P, D, G, padding, prefix_padding, causal = case
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, G, FP32, padding=padding, prefix_padding=prefix_padding)
    tensors = [inp[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    p = check_inputs(*tensors, inp["prefix_index"], inp["kv_mask"], None, causal, prefix_mask=inp["prefix_mask"])
    why = registry.implementation("cpu_kernel").reasons(p, decode=False)
    assert not any("prefix_mask" in r for r in why), why  # the mask itself is never a reason
    if why:  # no C++ compiler or ninja here
        pytest.skip("the one-pass CPU kernel cannot be built here: " + "; ".join(why))
    assert registry.plan("torch", p) == "cpu_kernel"
    assert_close_to_reference(inp, causal=causal, backend="torch")


DECODE = [  # (B, Hq, Hkv, Lq, T, P, D, G, padding, prefix_padding)
    (3, 4, 2, 1, 9, 6, 16, 2, "left", "left"),
    (4, 8, 2, 3, 40, 33, 32, 3, "left", "right"),
    (2, 4, 1, 2, 0, 5, 16, 2, None, "left"),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("case", DECODE, ids=[f"case{i}" for i in range(len(DECODE))])
def test_decode(case, backend, request):
    B, Hq, Hkv, Lq, T, P, D, G, padding, prefix_padding = case
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    inp = make_inputs(B, Hq, Hkv, Lq, T, P, D, G, FP32, device, padding=padding, prefix_padding=prefix_padding,
                      requires_grad=False)
    with torch.no_grad():
        assert_decode_close(inp, backend=backend)


def test_a_row_that_sees_nothing_gets_zeros_and_zero_gradient():
    """Every prefix key masked and no own key: out 0, lse -inf, no gradient, never NaN."""
    q = torch.randn(2, 2, 3, 16, requires_grad=True)
    k = v = torch.randn(2, 2, 0, 16, requires_grad=True)
    pk, pv = torch.randn(2, 2, 4, 16, requires_grad=True), torch.randn(2, 2, 4, 16, requires_grad=True)
    mask = torch.tensor([[False] * 4, [False, True, True, True]])
    for backend in ("torch", "reference"):
        out, lse = shared_prefix_attention(q, k, v, pk, pv, prefix_index=torch.tensor([0, 1]), prefix_mask=mask,
                                           return_lse=True, backend=backend)
        assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0])) and torch.isfinite(lse[1]).all()
        grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, pk, pv))
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.all(grads[0][0] == 0) and torch.all(grads[1][0] == 0) and torch.all(grads[1][1][:, 0] == 0)


def test_all_true_mask_changes_nothing():
    inp = make_inputs(3, 4, 2, 5, 6, 7, 16, 2, FP32, padding="left", requires_grad=False)
    plain = run_op(inp, backend="torch")
    masked = run_op(dict(inp, prefix_mask=torch.ones(2, 7, dtype=torch.bool)), backend="torch")
    torch.testing.assert_close(masked, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda G, P: torch.ones(G, P), TypeError, "prefix_mask must have dtype torch.bool"),
    (lambda G, P: torch.ones(G, P + 1, dtype=torch.bool), ValueError, r"prefix_mask must have shape \(G, P\)"),
    (lambda G, P: torch.ones(P, dtype=torch.bool), ValueError, r"prefix_mask must have shape \(G, P\)"),
    (lambda G, P: [[True] * P] * G, TypeError, "prefix_mask must be a"),
    (lambda G, P: torch.ones(G, P, dtype=torch.bool, device="meta"), ValueError, "prefix_mask is on meta"),
])
def test_bad_prefix_mask_is_named(bad, exc, match):
    inp = make_inputs(2, 4, 2, 3, 4, 5, 16, 2, FP32, requires_grad=False)
    for fn in (shared_prefix_attention, shared_prefix_decode):
        with pytest.raises(exc, match=match):
            run = dict(inp, prefix_mask=bad(2, 5))
            fn(*(run[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")), prefix_index=run["prefix_index"],
               prefix_mask=run["prefix_mask"])


def test_compiles_without_graph_breaks():
    inp = make_inputs(3, 4, 2, 5, 6, 7, 16, 2, FP32, padding="left", prefix_padding="left")
    args = [inp[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]

    def step(*tensors):
        out = shared_prefix_attention(*tensors, prefix_index=inp["prefix_index"], kv_mask=inp["kv_mask"],
                                      prefix_mask=inp["prefix_mask"], backend="torch")
        return out.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(*args)
    eager = torch.autograd.grad(eager_loss, args)
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


def test_opcheck():
    from torch.library import opcheck

    inp = make_inputs(3, 4, 2, 5, 6, 7, 16, 2, FP32, padding="left", prefix_padding="left", requires_grad=True)
    args = [inp[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    for impl in ("torch_split",):
        opcheck(torch.ops.prefix_kernels.fwd.default, (*args, inp["prefix_index"], inp["kv_mask"], True, 0.25, impl,
                                                       False, inp["prefix_mask"]))


def test_no_backend_declines_the_mask():
    """Every implementation, training and decode, takes a prefix_mask: none gives it as a reason
    (a backend that could not take it would have to say so, never drop it)."""
    inp = make_inputs(2, 4, 2, 3, 4, 5, 16, 2, FP32, requires_grad=False, prefix_padding="left")
    tensors = [inp[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    for device in ("cpu", "cuda"):  # a CUDA problem is only described, nothing runs
        p = check_inputs(*tensors, inp["prefix_index"], None, None, True, prefix_mask=inp["prefix_mask"])
        p = type(p)(**{**p.__dict__, "device": torch.device(device)})
        assert p.has_prefix_mask
        for name, backend in registry.IMPLEMENTATIONS.items():
            for decode in (False, True):
                check = backend.decode_reasons if decode else backend.train_reasons
                if check is not None and name != "cuda":
                    assert not any("mask" in r for r in check(p)), (name, decode, check(p))
    with pytest.raises(NoBackendError) as info:  # on CPU tensors the CUDA kernels say why, not the mask
        shared_prefix_decode(*tensors, prefix_index=inp["prefix_index"], prefix_mask=inp["prefix_mask"],
                             backend="cuda")
    assert "not CUDA tensors" in str(info.value) and "mask" not in str(info.value)


@pytest.mark.parametrize("fuse_parts", [False, True], ids=["3launches", "fused"])
def test_triton_a_row_that_sees_nothing(fuse_parts, triton_device, monkeypatch):
    """Triton: every prefix key masked and no own key: out 0, lse -inf, exactly zero gradients
    (q and the masked prefix keys), never NaN; decode (both launch forms) likewise. The mask is a
    strided view (stride 2 along P), read in place, and gives the same bits as its copy."""
    from prefix_kernels._core import config

    monkeypatch.setitem(config.FUSE_PARTS, "triton", fuse_parts)
    dev = triton_device
    q = torch.randn(2, 2, 3, 16, device=dev, requires_grad=True)
    k = torch.randn(2, 2, 0, 16, device=dev, requires_grad=True)
    v = torch.randn(2, 2, 0, 16, device=dev, requires_grad=True)
    pk = torch.randn(2, 2, 20, 16, device=dev, requires_grad=True)
    pv = torch.randn(2, 2, 20, 16, device=dev, requires_grad=True)
    wide = torch.zeros(2, 40, dtype=torch.bool, device=dev)
    wide[1, 4:36:2] = True
    wide[1, 10] = False
    pidx = torch.tensor([0, 1], device=dev)
    weight = torch.randn(2, 2, 3, 16, device=dev)
    results = []
    for mask in (wide[:, ::2], wide[:, ::2].contiguous()):
        out, lse = shared_prefix_attention(q, k, v, pk, pv, prefix_index=pidx, prefix_mask=mask, return_lse=True,
                                           backend="triton")
        assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0])) and torch.isfinite(lse[1]).all()
        grads = torch.autograd.grad((out * weight).sum() + lse[1].sum(), (q, pk, pv))
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.all(grads[0][0] == 0)
        for g in grads[1:]:
            assert torch.all(g[0] == 0) and torch.all(g[1][:, ~mask[1]] == 0) and g[1].abs().sum() > 0
        with torch.no_grad():
            dout, dlse = shared_prefix_decode(q, k, v, pk, pv, prefix_index=pidx, prefix_mask=mask,
                                              return_lse=True, backend="triton")
        assert torch.all(dout[0] == 0) and torch.all(torch.isneginf(dlse[0]))
        torch.testing.assert_close(dout, out.detach(), rtol=1e-5, atol=1e-5)
        results.append([out, lse, dout, *grads])
    assert all(torch.equal(a, b) for a, b in zip(*results))
