"""The public op: checks, dispatch, torch.library registration and autograd.

Layers, top to bottom:
  shared_prefix_attention   thin public function: checks arguments, picks the backend
  prefix_kernels::fwd/bwd   custom ops (torch.library) with fake implementations, so
                            torch.compile traces them as single nodes without graph breaks
  register_autograd         connects fwd to bwd; saves inputs, out and lse
  backends                  triton/attention.py and torch_backend.py (forward, backward)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import torch_backend
from .checks import check_index_range, check_inputs, refuse_forward_ad
from .dispatch import MAX_DECODE_LQ, select_backend
from .reference import reference_attention


def _backend_module(name: str):
    if name == "triton":
        from .triton import attention

        return attention
    return torch_backend


@torch.library.custom_op("prefix_kernels::fwd", mutates_args=(), device_types=None)
def _fwd(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Optional[Tensor], kv_mask: Optional[Tensor], causal: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    if prefix_index is not None:  # the public check cannot see values under torch.compile
        check_index_range(prefix_index, prefix_k.shape[0])
    out, lse = _backend_module(backend).forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale)
    return out, lse.contiguous()  # the fake promises a contiguous lse; ATen's CPU flash lse is (B, Lq, Hq)


def out_layout(B: int, Hq: int, Lq: int, D: int, like: Tensor) -> Tensor:
    """The output's memory is (B, Lq, Hq, D), returned as a (B, Hq, Lq, D) view: transformers
    transposes attention outputs back to (B, L, H, D) and reshapes them to (B, L, H * D), which
    is then free instead of a copy of the whole output."""
    return like.new_empty((B, Lq, Hq, D)).transpose(1, 2)


@_fwd.register_fake
def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend):
    B, Hq, Lq, D = q.shape
    return out_layout(B, Hq, Lq, D, q), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::bwd", mutates_args=(), device_types=None)
def _bwd(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Optional[Tensor], kv_mask: Optional[Tensor], out: Tensor, lse: Tensor,
    causal: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dpk, dpv = _backend_module(backend).backward(
        dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse
    )
    return _in_grad_layout(dq), _in_grad_layout(dk), _in_grad_layout(dv), dpk.contiguous(), dpv.contiguous()


def _in_grad_layout(g: Tensor) -> Tensor:
    """g as a (B, H, L, D) tensor whose memory is (B, L, H, D), copied only if it is not already.

    Every backend's dq, dk and dv leave in this one layout, which the fake implementation must
    state exactly for torch.compile. It is the layout of transformers' q, k and v (views of the
    projections' (B, L, H * D) outputs): their gradients then flow back into the projections
    without a copy, where a contiguous (B, H, L, D) gradient is copied by the view's backward."""
    if g.transpose(1, 2).is_contiguous():
        return g
    return out_layout(*g.shape, like=g).copy_(g)


@_bwd.register_fake
def _bwd_fake(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, out, lse, causal, scale, backend):
    return (*(out_layout(*x.shape, like=x) for x in (q, k, v)), prefix_k.new_empty(prefix_k.shape),
            prefix_v.new_empty(prefix_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.set_materialize_grads(False)  # dlse is None unless lse was used


def _backward(ctx, dout, dlse):
    q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dpk, dpv = _bwd(
        dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, out, lse, ctx.causal, ctx.scale, ctx.backend
    )
    return dq, dk, dv, dpk, dpv, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def routes_to_decode(backend: str, p, tensors) -> bool:
    """Whether shared_prefix_attention hands this call to the decode path (shared_prefix_decode's
    backends): "auto" on CUDA tensors with Lq <= 16 when no gradient is wanted, where the split
    decode kernels fill the GPU and the training kernels would not."""
    if backend != "auto" or p.device.type != "cuda" or p.Lq > MAX_DECODE_LQ:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def shared_prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    prefix_index: Optional[Tensor] = None,
    kv_mask: Optional[Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of every request to a shared prefix and to its own keys, without prefix copies.

    Request b's queries attend to the keys ``cat(prefix_k[prefix_index[b]], k[b])`` along the
    sequence, with values likewise, but the prefix is never copied per request: it is read once
    for the batch, and its gradient is reduced across the batch inside the kernel.

    Args:
        q: (B, Hq, Lq, D) queries. Any strides (transposed views are not copied).
        k, v: (B, Hkv, Lk, D) each request's own keys and values, Lk >= 0 (Lk > Lq with a cache).
        prefix_k, prefix_v: (G, Hkv, P, D) the G >= 1 shared prefixes, P >= 0.
        prefix_index: (B,) integer tensor, request b uses prefix ``prefix_index[b]`` in [0, G).
            None: every request uses prefix 0.
        kv_mask: (B, Lk) bool, True where request b may attend its own key j (padding: False).
            Prefix keys are always visible.
        causal: query i sees own key j only if ``j <= i + (Lk - Lq)``, aligned to the bottom
            right as in FlashAttention 2.1+::

                Lq = 2, Lk = 5:   keys 0 1 2 3 4
                        query 0:       x x x x .
                        query 1:       x x x x x

            Prefix keys are visible to every query.
        scale: multiplies q @ k^T; default 1 / sqrt(D).
        return_lse: also return the log-sum-exp, in natural log (base e, not base 2), of the
            scaled scores over every visible key: float32 (B, Hq, Lq). -inf for a row that sees
            no key (only possible with P == 0); such a row's output and gradients are 0.
        backend: "auto" (triton on CUDA, torch on CPU; falls back with a logged reason; on
            CUDA with Lq <= 16 and no input needing a gradient, the decode kernels of
            :func:`prefix_kernels.shared_prefix_decode`), "triton", "torch" or "reference"
            (materialises the prefix; for tests).

    GQA/MQA: Hq must be a multiple of Hkv; query head h reads kv head h // (Hq // Hkv).
    dtypes: float16, bfloat16, float32 (all five tensors alike). Head dim D in [16, 256].

    Returns:
        out (B, Hq, Lq, D) in q's dtype, or (out, lse) when return_lse.
    """
    p = check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, scale, causal)
    refuse_forward_ad(q, k, v, prefix_k, prefix_v)
    scale = 1.0 / math.sqrt(p.D) if scale is None else float(scale)
    if p.G == 1:
        prefix_index = None  # all requests use prefix 0 (values were checked to be in [0, 1))
    if routes_to_decode(backend, p, (q, k, v, prefix_k, prefix_v)):
        from .decode import decode_checked

        out, lse = decode_checked(p, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, "auto")
        return (out, lse) if return_lse else out
    name = select_backend(backend, p)
    if name == "reference":
        out, lse = reference_attention(
            q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, kv_mask=kv_mask, causal=causal, scale=scale
        )
        out, lse = out.to(q.dtype), lse.float()
    else:
        out, lse = _fwd(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, bool(causal), scale, name)
    return (out, lse) if return_lse else out
