"""The custom ops: torch.library registration, fake implementations and autograd.

  prefix_kernels::fwd, ::bwd   the training op's forward and backward; `backend` names the
                               implementation the registry planned (backends/registry.py)
  prefix_kernels::decode       a decode step (forward only)

Each op is one node for torch.compile (a fake implementation states its outputs' shapes, dtypes
and memory layout, _core/layout.py), and looks its implementation up in the registry when it
runs. `prefix_mask` (G, P) bool, optional, comes last so that the positional form of the other
arguments stays as it was. `check_index`: whether the op checks prefix_index's values itself. The public functions
check them once before the call in eager mode and pass False; under torch.compile they cannot
see values, pass True, and the op checks where it runs.

A backend's forward or backward may return None where its kernels cannot give a call's values
right (the composed backend: a gradient through lse; non-finite values on a CPU); the op then
runs the explicit split path (registry.FALLBACK), which takes every case.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._core.layout import bhld, bhld_like, in_bhld
from ._core.problem import check_index_range
from .backends import registry


def _forward(kind, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend, check_index,
             prefix_mask):
    """The planned implementation's forward ("forward" or "decode"): (out, lse). prefix_mask is
    passed as a keyword only when there is one, so a backend that takes none never sees it."""
    if check_index and prefix_index is not None:
        check_index_range(prefix_index, prefix_k.shape[0])
    masked = {} if prefix_mask is None else {"prefix_mask": prefix_mask}
    args = (q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale)
    result = registry.implementation(backend).function(kind)(*args, **masked)
    if result is None:  # the backend's kernels cannot give this call's values right: see registry.FALLBACK
        result = registry.implementation(registry.FALLBACK).function(kind)(*args, **masked)
    return result


@torch.library.custom_op("prefix_kernels::fwd", mutates_args=(), device_types=None)
def fwd(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Optional[Tensor], kv_mask: Optional[Tensor], causal: bool, scale: float, backend: str,
    check_index: bool = False, prefix_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    out, lse = _forward("forward", q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend,
                        check_index, prefix_mask)
    return out, lse.contiguous()  # the fake promises a contiguous lse; ATen's CPU flash lse is (B, Lq, Hq)


@fwd.register_fake
def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend, check_index=False,
              prefix_mask=None):
    B, Hq, Lq, D = q.shape
    return bhld(B, Hq, Lq, D, q), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::bwd", mutates_args=(), device_types=None)
def bwd(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Optional[Tensor], kv_mask: Optional[Tensor], out: Tensor, lse: Tensor,
    causal: bool, scale: float, backend: str, prefix_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse)
    masked = {} if prefix_mask is None else {"prefix_mask": prefix_mask}
    grads = registry.implementation(backend).function("backward")(*args, **masked)
    if grads is None:  # as in _forward
        grads = registry.implementation(registry.FALLBACK).function("backward")(*args, **masked)
    dq, dk, dv, dpk, dpv = grads
    return in_bhld(dq), in_bhld(dk), in_bhld(dv), dpk.contiguous(), dpv.contiguous()


@bwd.register_fake
def _bwd_fake(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, out, lse, causal, scale, backend,
              prefix_mask=None):
    return (*(bhld_like(x) for x in (q, k, v)), prefix_k.new_empty(prefix_k.shape),
            prefix_v.new_empty(prefix_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend, _, prefix_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, out, lse, prefix_mask)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.set_materialize_grads(False)  # dlse is None unless lse was used


def _backward(ctx, dout, dlse):
    q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, out, lse, prefix_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = bwd(
        dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, out, lse, ctx.causal, ctx.scale, ctx.backend,
        prefix_mask,
    )
    return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None


fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("prefix_kernels::decode", mutates_args=(), device_types=None)
def decode(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Optional[Tensor], kv_mask: Optional[Tensor], causal: bool, scale: float, backend: str,
    check_index: bool = False, prefix_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    out, lse = _forward("decode", q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend,
                        check_index, prefix_mask)
    like = bhld_like(q)
    if out.stride() != like.stride():  # the fake below promises the package's layout
        out = like.copy_(out)
    return out, lse.contiguous()


@decode.register_fake
def _decode_fake(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend, check_index=False,
                 prefix_mask=None):
    B, Hq, Lq, D = q.shape
    return bhld(B, Hq, Lq, D, q), q.new_empty((B, Hq, Lq), dtype=torch.float32)
