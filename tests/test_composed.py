"""The composed backend: two vendor-kernel calls merged by log-sum-exp (backends/vendor).

On a CPU the composition runs on ATen's CPU flash kernel and is checked like every backend, all
five gradients against the float64 reference (test_op's covering set and random draws, G > 1
with sorted and mixed prefix_index, padding, prefix_mask). The CUDA kernels' call sites run on
meta tensors: the shapes, strides and dtypes each kernel receives, and the out and lse each
backward is given (the merged ones). On a GPU the same matrix runs against the reference.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefix_kernels as pk
from helpers import assert_close_to_reference, describe, make_inputs, run_op
from prefix_kernels._core.problem import Problem
from prefix_kernels.backends import registry, train_choice
from prefix_kernels.backends.vendor import compose
from prefix_kernels.backends.vendor import kernels as K
from test_op import TORCH_CASES, _HYP, case_id, random_case, run_case

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_composed_matrix_cpu(case):
    run_case(case, "composed", "cpu")


@settings(max_examples=150, **_HYP)
@given(c=random_case(max_L=40, max_P=70, dims=[16, 24, 40, 64, 72, 96, 112, 256], dtypes=[FP32, FP16, BF16],
                     max_heads=8))
def test_composed_random_shapes_cpu(c):
    torch.manual_seed(zlib.crc32(repr(sorted((k, str(v)) for k, v in c.items())).encode()))
    inp = make_inputs(c["B"], c["Hkv"] * c["ratio"], c["Hkv"], c["Lq"], c["Lk"], c["P"], c["D"], c["G"],
                      c["dtype"], "cpu", padding=c["padding"], mixed_index=c["mixed"], transposed=c["transposed"])
    assert_close_to_reference(inp, causal=c["causal"], return_lse=c["lse"], backend="composed",
                              desc=f"composed:{describe(**c)}")


@pytest.mark.parametrize("prefix_padding", ["left", "right"])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_composed_prefix_mask_cpu(prefix_padding, G, dtype):
    """prefix_mask enters the prefix part as a bias; a prefix with every key masked (G = 3) is
    fixed on the device, not sent to the fallback."""
    torch.manual_seed(G)
    inp = make_inputs(4, 4, 2, 9, 9, 11, 32, G, dtype, "cpu", padding="left", prefix_padding=prefix_padding)
    assert_close_to_reference(inp, causal=True, return_lse=False, backend="composed", desc="composed:prefix_mask")


def _spy_fallback(monkeypatch):
    """Counts the calls that reached the explicit fallback (registry.FALLBACK)."""
    from prefix_kernels.backends.torch_split import explicit

    calls = []
    for name in ("forward", "backward"):
        original = getattr(explicit, name)

        def spy(*a, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(*a, **kw)

        monkeypatch.setattr(explicit, name, spy)
    return calls


def test_finite_inputs_never_reach_the_fallback(monkeypatch):
    calls = _spy_fallback(monkeypatch)
    inp = make_inputs(3, 4, 2, 6, 6, 5, 16, 2, FP32, "cpu", padding="left", prefix_padding="left")
    out = run_op(inp, causal=True, backend="composed")
    out.backward(torch.randn_like(out))
    assert calls == []


def test_gradient_through_lse_takes_the_fallback(monkeypatch):
    """The vendor backwards take no dlse; the op recomputes with the explicit path, and the
    result is still the reference's (test_composed_matrix_cpu checks values with lse)."""
    calls = _spy_fallback(monkeypatch)
    inp = make_inputs(2, 4, 2, 5, 5, 3, 16, 1, FP32, "cpu")
    out, lse = run_op(inp, causal=True, backend="composed", return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert calls == ["backward"]


def test_non_finite_input_on_cpu_is_recomputed(monkeypatch):
    """A NaN in a padding key the rows may not see: the bias would add -inf to it and poison
    every row; the checked CPU path sees the NaN in its result and the op recomputes."""
    calls = _spy_fallback(monkeypatch)
    inp = make_inputs(2, 2, 1, 5, 5, 3, 16, 1, FP32, "cpu", padding="right", requires_grad=False)
    inp["kv_mask"][0, -1] = False
    inp["k"][0, :, -1] = float("nan")
    out = run_op(inp, causal=True, backend="composed")
    ref = run_op(inp, causal=True, backend="reference")
    assert calls == ["forward"] and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_composed_is_a_public_training_backend_only():
    inp = make_inputs(2, 2, 1, 1, 4, 3, 16, 1, FP32, "cpu", requires_grad=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.shared_prefix_decode(inp["q"], inp["k"], inp["v"], inp["prefix_k"], inp["prefix_v"], backend="composed")


def test_env_backend_composed_leaves_decode_on_auto(monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "composed")
    inp = make_inputs(2, 2, 1, 1, 4, 3, 16, 1, FP32, "cpu", requires_grad=False)
    out = pk.shared_prefix_decode(inp["q"], inp["k"], inp["v"], inp["prefix_k"], inp["prefix_v"])
    assert out.shape == inp["q"].shape


def test_unknown_kernel_name_is_refused(monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_COMPOSED_KERNELS", "aten_flash,fa9")
    with pytest.raises(ValueError, match="PREFIX_KERNELS_COMPOSED_KERNELS names unknown kernels \\['fa9'\\]"):
        compose.order(torch.device("cuda"))


def test_kernel_order_override(monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_COMPOSED_KERNELS", " aten_efficient , aten_flash")
    assert compose.order(torch.device("cuda")) == (K.ATEN_EFFICIENT, K.ATEN_FLASH)
    monkeypatch.delenv("PREFIX_KERNELS_COMPOSED_KERNELS")
    assert compose.order(torch.device("cuda")) == K.CUDA_ORDER
    assert compose.order(torch.device("cpu")) == K.CPU_ORDER


def test_cuda_kernels_say_why_not_on_a_cpu():
    for kernel in K.CUDA_ORDER:
        assert "runs on CUDA tensors, got cpu" in kernel.reasons(BF16, 64, torch.device("cpu"))
    assert K.ATEN_CPU.reasons(BF16, 64, torch.device("cpu")) == []


def test_composed_declines_other_devices_with_a_reason():
    p = Problem(2, 4, 2, 8, 8, 64, 1, 4, BF16, torch.device("meta"))
    assert registry.public_reasons("composed", p, decode=False) == [
        "vendor kernels for CPU and CUDA tensors only, got meta"]


def test_flash_attn_absent_is_a_reason(monkeypatch):
    K._flash_attn_interface.cache_clear()
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    try:
        interface, why = K._flash_attn_interface()
        assert interface is None and "flash_attn is not importable" in why
    finally:
        K._flash_attn_interface.cache_clear()


# ---- auto on CUDA: measured choice, composed before any measurement -------------------------


def _cuda_problem(**kw):
    sizes = dict(B=16, Hq=32, Hkv=8, Lq=1024, Lk=1024, D=128, G=1, P=128, dtype=BF16, device=torch.device("cuda"))
    sizes.update(kw)
    return Problem(**sizes)


def test_auto_training_order_on_cuda_without_measurements(monkeypatch):
    monkeypatch.setattr(train_choice, "load_table", lambda path=None: {})
    train_choice._faster.cache_clear()
    assert registry._auto_order(_cuda_problem(), decode=False) == ("composed", "triton", "torch")


def test_auto_training_order_follows_the_measured_table(monkeypatch):
    table = {"GPU X": [dict(dtype="bfloat16", D=128, B=16, L=1024, P=16, faster="triton"),
                       dict(dtype="bfloat16", D=128, B=16, L=1024, P=1024, faster="composed")]}
    monkeypatch.setattr(train_choice, "load_table", lambda path=None: table)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    train_choice._faster.cache_clear()
    try:
        assert registry._auto_order(_cuda_problem(P=20), decode=False) == ("triton", "composed", "torch")
        assert registry._auto_order(_cuda_problem(P=900), decode=False) == ("composed", "triton", "torch")
    finally:
        train_choice._faster.cache_clear()


# ---- the CUDA call sites, on meta tensors ---------------------------------------------------


class _Recorder:
    """Wraps kernels so that each call's arguments are recorded, then runs the real call (the
    ATen ops have meta implementations)."""

    def __init__(self):
        self.calls = []

    def wrap(self, kernel):
        def record(kind, fn):
            def call(*args, **kw):
                self.calls.append((kernel.name, kind, args, kw))
                return fn(*args, **kw)
            return call
        return dataclasses.replace(kernel, forward=record("forward", kernel.forward),
                                   backward=record("backward", kernel.backward))


def _meta_inputs(B=3, Hq=8, Hkv=2, Lq=12, Lk=12, P=40, D=64, G=1, dtype=BF16, kv_mask=False, prefix_mask=False):
    def t(*shape_bhld):  # transformers' layout: (B, L, H, D) memory
        b, h, l, d = shape_bhld
        return torch.empty(b, l, h, d, dtype=dtype, device="meta").transpose(1, 2)
    q, k, v = t(B, Hq, Lq, D), t(B, Hkv, Lk, D), t(B, Hkv, Lk, D)
    pk_, pv_ = torch.empty(G, Hkv, P, D, dtype=dtype, device="meta"), torch.empty(G, Hkv, P, D, dtype=dtype,
                                                                                  device="meta")
    mask = torch.ones(B, Lk, dtype=torch.bool, device="meta") if kv_mask else None
    pmask = torch.ones(G, P, dtype=torch.bool, device="meta") if prefix_mask else None
    return q, k, v, pk_, pv_, mask, pmask


def _run_meta(monkeypatch, kernels, groups=None, **shape):
    """forward + backward of the composition on meta tensors with `kernels` (tried in order)."""
    rec = _Recorder()
    wrapped = tuple(rec.wrap(k) for k in kernels)

    def pick(dtype, D, device, bias):
        return next(k for k in wrapped if k.takes_bias or not bias)

    monkeypatch.setattr(compose, "_kernel", pick)
    if groups is not None:
        monkeypatch.setattr(compose, "prefix_groups", lambda index: groups)
    monkeypatch.setattr(compose, "_own_cache", (None, None, None))
    q, k, v, pk_, pv_, mask, pmask = _meta_inputs(**shape)
    scale = 0.125
    out, lse = compose.forward(q, k, v, pk_, pv_, None, mask, True, scale, pmask)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3] and lse.dtype == FP32
    assert out.transpose(1, 2).is_contiguous()  # the package's layout
    grads = compose.backward(torch.empty_like(out), None, q, k, v, pk_, pv_, None, mask, True, scale, out, lse, pmask)
    for g, x in zip(grads, (q, k, v, pk_, pv_)):
        assert g.shape == x.shape and g.dtype == x.dtype
    return rec.calls, (q, k, v, pk_, pv_), out


@pytest.mark.parametrize("kernels", [(K.ATEN_FLASH, K.ATEN_EFFICIENT), (K.ATEN_CUDNN, K.ATEN_EFFICIENT),
                                     (K.ATEN_EFFICIENT,)], ids=["aten_flash", "aten_cudnn", "aten_efficient"])
def test_cuda_call_sites_unmasked(monkeypatch, kernels):
    calls, (q, k, v, pk_, pv_), out = _run_meta(monkeypatch, kernels)
    names = [(n, kind) for n, kind, _, _ in calls]
    first = kernels[0].name
    assert names == [(first, "forward")] * 2 + [(first, "backward")] * 2
    own_fwd, prefix_fwd, own_bwd, prefix_bwd = (c[2] for c in calls)
    gqa_heads = q.shape[1] if not kernels[0].native_gqa else k.shape[1]
    # own part: the request's own keys, causal flag (square), no bias
    assert own_fwd[0].shape == q.shape and own_fwd[1].shape[1] == gqa_heads
    assert calls[0][3]["causal"] is True and calls[0][3]["bias"] is None
    # prefix part: the batch folded into the query length, a view (no copy of q)
    B, Hq, Lq, D = q.shape
    assert prefix_fwd[0].shape == (1, Hq, B * Lq, D) and prefix_fwd[1].shape[:3] == (1, gqa_heads, pk_.shape[2])
    assert calls[1][3]["causal"] is False
    # backwards get the merged out and lse, folded for the prefix part
    assert own_bwd[4] is out and own_bwd[5].shape == (B, Hq, Lq) and own_bwd[5].dtype == FP32
    assert prefix_bwd[4].shape == (1, Hq, B * Lq, D) and prefix_bwd[5].shape == (1, Hq, B * Lq)
    assert prefix_bwd[5].is_contiguous()


def test_cuda_call_sites_masked_take_the_efficient_kernel(monkeypatch):
    """kv_mask and prefix_mask: both parts need a bias, which only the memory-efficient kernel
    takes; its bias rows are allocated at 16-element strides."""
    calls, (q, k, v, pk_, pv_), _ = _run_meta(monkeypatch, (K.ATEN_FLASH, K.ATEN_EFFICIENT), kv_mask=True,
                                              prefix_mask=True, Lk=13, Lq=12, P=37)
    assert {n for n, *_ in calls} == {"aten_efficient"}
    for _, kind, args, kw in calls:
        bias = kw["bias"]
        assert bias is not None and bias.dtype == q.dtype and bias.stride(-2) % 16 == 0
        assert kw["causal"] is False
        assert args[1].shape[1] == q.shape[1]  # GQA expanded: this kernel has none


def test_cuda_call_sites_several_prefixes(monkeypatch):
    rows = [torch.tensor([0, 2], device="meta"), torch.tensor([1], device="meta")]
    calls, (q, k, v, pk_, pv_), _ = _run_meta(monkeypatch, (K.ATEN_FLASH,), groups=[(0, rows[0]), (1, rows[1])],
                                              G=2)
    def keys_and_queries(kind, args):
        return (args[1], args[0]) if kind == "forward" else (args[2], args[1])

    prefix_rows = [keys_and_queries(kind, args)[1].shape[2] for _, kind, args, _ in calls
                   if keys_and_queries(kind, args)[0].shape[2] == pk_.shape[2]]
    assert prefix_rows == [2 * q.shape[2], q.shape[2]] * 2  # each prefix's requests folded, forward and backward


def test_flash_attn_package_call_site(monkeypatch):
    """The flash_attn >= 2.7 low-level interface, stubbed: (B, L, H, D) views, keyword names
    as that release spells them, dq/dk/dv preallocated and filled by the backward."""
    seen = {}

    def fwd(q, k, v, *, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
            alibi_slopes, return_softmax):
        seen.setdefault("fwd", []).append((q.shape, k.shape, causal))
        B, L, H, D = q.shape
        return torch.empty_like(q), torch.empty(B, H, L, dtype=FP32, device=q.device), None, None

    def bwd(dout, q, k, v, out, lse, dq, dk, dv, *, dropout_p, softmax_scale, causal, window_size_left,
            window_size_right, softcap, alibi_slopes, deterministic, rng_state):
        seen.setdefault("bwd", []).append((lse.shape, dq.shape, dk.shape))
        return torch.empty_like(lse)

    package = types.ModuleType("flash_attn")
    package.__version__ = "2.8.3"
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward, interface._flash_attn_backward = fwd, bwd
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
    K._flash_attn_interface.cache_clear()
    try:
        _run_meta(monkeypatch, (K.FLASH_ATTN,), B=2, Hq=4, Hkv=2, Lq=5, Lk=5, P=7)
    finally:
        K._flash_attn_interface.cache_clear()
    assert seen["fwd"] == [((2, 5, 4, 64), (2, 5, 2, 64), True), ((1, 10, 4, 64), (1, 7, 2, 64), False)]
    assert seen["bwd"] == [((2, 4, 5), (2, 5, 4, 64), (2, 5, 2, 64)), ((1, 4, 10), (1, 10, 4, 64), (1, 7, 2, 64))]


def test_old_flash_attn_is_a_reason(monkeypatch):
    package = types.ModuleType("flash_attn")
    package.__version__ = "2.5.9"
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", types.ModuleType("x"))
    K._flash_attn_interface.cache_clear()
    try:
        assert K._flash_attn_interface()[1] == "flash_attn 2.5.9 is older than 2.7"
    finally:
        K._flash_attn_interface.cache_clear()


# ---- on a GPU: the same checks against the reference, bf16 included ------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_composed_matrix_gpu(case):
    run_case(case, "composed", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["aten_flash,aten_efficient", "aten_cudnn,aten_efficient", "aten_efficient"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_composed_each_cuda_kernel(monkeypatch, kernels, dtype):
    monkeypatch.setenv("PREFIX_KERNELS_COMPOSED_KERNELS", kernels)
    registry.forget_plans()
    for padding, G in ((None, 1), ("left", 3), ("right", 2)):
        torch.manual_seed(G)
        inp = make_inputs(4, 8, 2, 70, 70, 130, 128, G, dtype, "cuda", padding=padding, transposed=True,
                          prefix_padding="left" if G > 1 else None)
        assert_close_to_reference(inp, causal=True, return_lse=False, backend="composed",
                                  desc=f"composed[{kernels}]:{padding}:G{G}")


# ---- the measured training table (benchmarks/train_choice.py) -------------------------------


def _train_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "train_choice.py"
    spec = importlib.util.spec_from_file_location("train_choice_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _attention_row(provider, ms, P=128, G=1, kv_mask=False, mode="fwd_bwd", status="ok"):
    return dict(workload="attention", mode=mode, provider=provider, status=status, median_ms=ms, device="GPU X",
                dtype="bfloat16", shape=dict(B=16, Hq=32, Hkv=8, L=1024, P=P, D=128, G=G, kv_mask=kv_mask))


def test_train_table_keeps_the_faster_where_both_ran():
    rows = [_attention_row("prefix_kernels_composed", 2.0), _attention_row("prefix_kernels_triton", 3.0),
            _attention_row("prefix_kernels_composed", 2.0, P=16), _attention_row("prefix_kernels_triton", 1.0, P=16),
            _attention_row("prefix_kernels_triton", 1.0, P=1024),  # composed missing: no entry
            _attention_row("prefix_kernels_composed", 0.1, P=16, G=3), _attention_row("prefix_kernels_triton", 9.0,
                                                                                       P=16, G=3),  # G > 1: not here
            _attention_row("prefix_kernels_composed", 0.1, mode="fwd"), _attention_row("sdpa_copied", 0.1)]
    table = _train_script().build_table(rows)
    assert table == {"GPU X": [
        dict(dtype="bfloat16", D=128, B=16, L=1024, P=16, faster="triton", composed_ms=2.0, triton_ms=1.0),
        dict(dtype="bfloat16", D=128, B=16, L=1024, P=128, faster="composed", composed_ms=2.0, triton_ms=3.0)]}


def test_deterministic_mode_rules_out_the_efficient_kernel(monkeypatch):
    """torch.use_deterministic_algorithms(True): the memory-efficient kernel (atomics in its
    backward; ATen raises there) says why it declines, and a choice made before is not reused."""
    monkeypatch.setattr(K, "_cuda_reasons", lambda device, min_capability=(8, 0): [])  # as on a GPU
    cuda = torch.device("cuda")
    assert K.ATEN_EFFICIENT.reasons(BF16, 64, cuda) == []
    before = registry._variables()
    torch.use_deterministic_algorithms(True)
    try:
        assert registry._variables() != before
        assert K.ATEN_EFFICIENT.reasons(BF16, 64, cuda) == [
            "its backward accumulates with atomics, and torch.use_deterministic_algorithms(True) is set"]
        assert K.ATEN_FLASH.reasons(BF16, 64, cuda) == [] or not torch.backends.cuda.is_flash_attention_available()
    finally:
        torch.use_deterministic_algorithms(False)


def test_prefix_groups_read_back_once_per_index(monkeypatch):
    """Grouping requests by prefix reads prefix_index back to the host: every layer and the
    backward share one reading of the same index; an in-place change is seen."""
    calls = []
    real = compose.prefix_groups
    monkeypatch.setattr(compose, "prefix_groups", lambda index: calls.append(1) or real(index))
    monkeypatch.setattr(compose, "_groups_cache", (None, None, None))
    inp = make_inputs(4, 4, 2, 6, 6, 5, 16, 2, FP32, "cpu")
    for _ in range(3):  # three "layers"
        out = run_op(inp, causal=True, backend="composed")
        out.backward(torch.randn_like(out))
    assert len(calls) == 1
    with torch.no_grad():
        inp["prefix_index"][0] = 1 - inp["prefix_index"][0]
    assert_close_to_reference(inp, causal=True, return_lse=False, backend="composed", desc="index changed in place")
    assert len(calls) >= 2


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
def test_merge_kernel_matches_the_eager_merge(triton_device, dtype):
    """The one-kernel merge (CUDA tensors; here under the interpreter) against compose's eager
    merge: strided parts as the fold leaves them, rows where one part or both see nothing."""
    from prefix_kernels.backends.vendor import merge_kernel

    torch.manual_seed(0)
    B, Hq, Lq, D = 3, 4, 7, 40
    q = torch.empty(B, Hq, Lq, D, dtype=dtype, device=triton_device)
    out_p = compose.unfold(torch.randn(1, Hq, B * Lq, D, dtype=dtype, device=triton_device), B)  # strided
    out_r = torch.randn(B, Lq, Hq, D, dtype=dtype, device=triton_device).transpose(1, 2)
    lse_p = compose._unfold_lse(torch.randn(1, Hq, B * Lq, device=triton_device) * 3, B)
    lse_r = torch.randn(B, Hq, Lq, device=triton_device) * 3
    lse_p[0, 0, 1] = float("-inf")  # this row sees no prefix key
    lse_r[1, 2, 3] = float("-inf")  # this one no own key
    lse_p[2, 1, 0] = lse_r[2, 1, 0] = float("-inf")  # and this one nothing
    out_r[1, 2, 3] = 0.0  # compose sets a part's rows that see nothing to 0 before merging
    want_out, want_lse = compose.merge(q.cpu(), out_p.cpu(), lse_p.cpu(), out_r.cpu(), lse_r.cpu())
    got_out, got_lse = merge_kernel.merge(q, out_p, lse_p, out_r, lse_r)
    tol = 1e-6 if dtype == FP32 else 1e-3
    torch.testing.assert_close(got_out.cpu().float(), want_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-6, atol=1e-6)
    assert got_out.transpose(1, 2).is_contiguous() and got_lse.is_contiguous()
    assert got_lse[2, 1, 0] == float("-inf") and torch.equal(got_out[2, 1, 0].cpu(), torch.zeros(D, dtype=dtype))
