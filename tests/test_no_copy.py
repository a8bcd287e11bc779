"""No per-request copy of the prefix is allocated, forward or backward.

A TorchDispatchMode records the shape of every tensor an op *allocates*
(outputs that do not alias an input: views such as expand() are free and are
not recorded).  Sizes are chosen so that a per-request prefix-shaped tensor is
identifiable by its element count alone:

    B=5, Hkv=2, Hq=4, Lq=3, Lk=4, P=23, D=16, G in {1, 2}

A per-request copy of the prefix (B, Hkv, P, D) = 3680 elements, or the
concatenation (B, Hkv, P + Lk, D), or (B, Hq, P, D) ..., has a multiple of
B * P (or B * (P + Lk)) elements and at least B * Hkv * P * D of them.  The
legitimate tensors that mention both B and P are scores / probabilities,
(B, Hq, Lq, P + Lk) = 1620 elements: Hq * Lq = 12 < Hkv * D = 32 keeps them
below the threshold.  Per-prefix tensors (G, Hq, P, D) are not multiples of
B = 5 (a prime that divides none of the other sizes).

Second rule, for the prefix gradient: an allocation whose size is a multiple
of Hkv * P * D holds that many (Hkv, P, D) "rows"; it must hold fewer than B
(the triton backend's split partials are (S, G, Hkv, P, D) with S * G < B).

The reference backend materialises the prefix per request, so it must trip the
detector: that proves the test can fail.

Custom ops (prefix_kernels::fwd / ::bwd, torch.library) are opaque to a
dispatch mode (the mode is popped while it handles an op), so the recorder runs
their Python implementation itself, under the mode, to see inside them, and
the one-pass CPU kernel's C++ ops (prefix_kernels_cpu::fwd / ::bwd) past the
Python key, so that their at:: allocations reach it.  An op it cannot open is
reported and fails the test rather than being trusted.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers import TENSOR_ARGS, make_inputs, run_op

B, HKV, HQ, LQ, LK, P, D = 5, 2, 4, 3, 4, 23, 16


def _custom_op_impl(func, device_type):
    """The Python implementation behind a torch.library.custom_op, or None."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - private API moved
        return None
    opdef = OPDEFS.get(func._schema.name) if hasattr(func, "_schema") else None
    if opdef is None:
        return None
    fn = getattr(opdef, "_backend_fns", {}).get(device_type)
    return fn if fn is not None else getattr(opdef, "_init_fn", None)


def _cpp_kernel(func):
    """The CPU kernel of a C++ op (csrc/prefix_attention_cpu.cpp), called past the Python dispatch
    key, so that the at:: allocations it makes are dispatched to the recorder. Its std::vector
    score buffers (rows x (P + Lk) floats per thread) are not tensors and are not seen."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return lambda *args, **kwargs: func.redispatch(keys, *args, **kwargs)


class AllocationRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.allocs = []  # (op name, shape, numel)
        self.opaque = []  # ops whose insides could not be inspected
        self.opened = []  # custom ops whose implementation ran under the recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns not in ("aten", "prims", "_c10d_functional", "profiler"):
            tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
            dev = tensors[0].device.type if tensors else "cpu"
            impl = _custom_op_impl(func, dev)
            if ns == "prefix_kernels_cpu":  # C++ ops: run their CPU kernel under the recorder
                impl = _cpp_kernel(func)
            if impl is None:
                self.opaque.append(str(func))
                out = func(*args, **kwargs)
            else:
                self.opened.append(str(func))
                with self:  # re-enter: record the ops inside the implementation
                    out = impl(*args, **kwargs)
            self._record(func, out, aliasing=False)
            return out
        out = func(*args, **kwargs)
        self._record(func, out)
        return out

    def _record(self, func, out, aliasing=True):
        returns = func._schema.returns if aliasing else []
        outs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for i, val in enumerate(outs):
            if aliasing and i < len(returns) and returns[i].alias_info is not None:
                continue  # a view or an in-place result: no new memory
            for x in tree_flatten(val)[0]:
                if isinstance(x, torch.Tensor):
                    self.allocs.append((str(func), tuple(x.shape), x.numel()))


def per_request_prefix_copies(allocs, B=B, Hkv=HKV, P=P, Lk=LK, D=D):
    """Allocations that look like the prefix (or prefix + own keys) per request."""
    threshold = B * Hkv * P * D
    bad = []
    for name, shape, numel in allocs:
        if numel < threshold:
            continue
        if numel % (B * P) == 0 or numel % (B * (P + Lk)) == 0:
            bad.append((name, shape))
    return bad


def prefix_row_buffers(allocs, B=B, Hkv=HKV, P=P, D=D):
    """Allocations holding >= B (Hkv, P, D) rows (e.g. a per-request prefix-gradient buffer)."""
    row = Hkv * P * D
    return [(name, shape) for name, shape, numel in allocs if numel and numel % row == 0 and numel // row >= B]


def run_recorded(backend, device, G, dtype=torch.float32, lse=True, prefix_padding=None):
    """Forward + backward under the recorder. lse=False: no gradient into lse, which on the CPU
    sends the torch backend through its fused backward instead of its explicit one.
    prefix_padding: with a (G, P) prefix_mask."""
    inp = make_inputs(B, HQ, HKV, LQ, LK, P, D, G, dtype, device, padding="left", prefix_padding=prefix_padding)
    tensors = [inp[n] for n in TENSOR_ARGS]
    rec = AllocationRecorder()
    with rec:
        if lse:
            out, lse_ = run_op(inp, causal=True, return_lse=True, backend=backend)
            grads = torch.autograd.grad([out, lse_], tensors, [torch.randn_like(out), torch.randn_like(lse_)])
        else:
            out = run_op(inp, causal=True, backend=backend)
            grads = torch.autograd.grad(out, tensors, torch.randn_like(out))
    assert all(g is not None for g in grads)
    return rec


def _check_sizes_are_distinguishing():
    # The argument in the module docstring, as assertions.
    assert HQ * LQ < HKV * D
    for G in (1, 2):
        assert (G * HQ * P * D) % B != 0 and G * (HQ // HKV) < B


def test_detector_fires_on_reference_backend():
    _check_sizes_are_distinguishing()
    rec = run_recorded("reference", "cpu", G=2)
    assert per_request_prefix_copies(rec.allocs), "the detector missed the reference's per-request prefix copy"
    assert prefix_row_buffers(rec.allocs)


def test_detector_ignores_views():
    inp = make_inputs(B, HQ, HKV, LQ, LK, P, D, 1, torch.float32, "cpu", requires_grad=False)
    rec = AllocationRecorder()
    with rec:
        inp["prefix_k"].expand(B, HKV, P, D)
    assert not per_request_prefix_copies(rec.allocs)
    with rec:
        inp["prefix_k"].expand(B, HKV, P, D).contiguous()
    assert per_request_prefix_copies(rec.allocs)


def _assert_no_copies(rec, backend):
    assert not rec.opaque, f"{backend}: could not look inside {rec.opaque}"
    copies = per_request_prefix_copies(rec.allocs)
    assert not copies, f"{backend}: per-request prefix-sized allocations: {copies}"
    rows = prefix_row_buffers(rec.allocs)
    assert not rows, f"{backend}: buffers with >= B rows of (Hkv, P, D): {rows}"
    assert rec.allocs, "nothing was recorded"


@pytest.mark.parametrize("lse", [True, False], ids=["explicit_bwd", "fused_bwd"])
@pytest.mark.parametrize("G", [1, 2])
def test_torch_backend_makes_no_prefix_copy(G, lse):
    rec = run_recorded("torch", "cpu", G, lse=lse)
    _assert_no_copies(rec, "torch")


@pytest.mark.parametrize("prefix_padding", [None, "left"])
@pytest.mark.parametrize("G", [1, 2])
def test_composed_backend_makes_no_prefix_copy(G, prefix_padding):
    """The composition folds each prefix's requests into one query: its forward and backward
    (ATen's CPU flash kernel here; on CUDA the same code with vendor kernels) copy no prefix."""
    rec = run_recorded("composed", "cpu", G, prefix_padding=prefix_padding)
    _assert_no_copies(rec, "composed")


@pytest.mark.parametrize("G", [1, 2])
def test_triton_backend_makes_no_prefix_copy(G, triton_device):
    rec = run_recorded("triton", triton_device, G)
    _assert_no_copies(rec, "triton")
    # The launcher's prefix-gradient buffers: each (.., Hkv, P, D)-shaped
    # allocation has fewer than B rows of (Hkv, P, D).
    prefix_shaped = [s for _, s, n in rec.allocs if len(s) >= 3 and s[-3:] == (HKV, P, D)]
    assert prefix_shaped, "expected the prefix gradient to be allocated"
    for shape in prefix_shaped:
        rows = 1
        for x in shape[:-3]:
            rows *= x
        assert rows < B, shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["cpu_kernel", "split"])
@pytest.mark.parametrize("lse", [True, False], ids=["explicit_bwd", "fused_bwd"])
def test_prefix_mask_makes_no_prefix_copy(lse, dtype):
    """A (G, P) prefix_mask (prompts of different lengths) is applied per prefix, never expanded
    per request: float32 takes the one-pass CPU kernel, bf16 the split path."""
    rec = run_recorded("torch", "cpu", 2, dtype=dtype, lse=lse, prefix_padding="left")
    _assert_no_copies(rec, "torch")


def test_triton_prefix_mask_makes_no_prefix_copy(triton_device):
    rec = run_recorded("triton", triton_device, 2, prefix_padding="left")
    _assert_no_copies(rec, "triton")
