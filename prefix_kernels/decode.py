"""Shared-prefix decode: Lq = 1..16 new tokens per request against a shared prefix and a cache.

Layers, top to bottom:
  shared_prefix_decode     thin public function: checks, forward-only guard, backend choice
  prefix_kernels::decode   custom op (torch.library) with a fake implementation, so torch.compile
                           traces a decode step as one node
  backends                 "cuda" (optional module prefix_kernels.cuda), "triton"
                           (triton/decode.py), "torch" (torch_backend.forward), "reference"

shared_prefix_attention(backend="auto") also comes here for CUDA tensors with Lq <= 16 when no
gradient is wanted (see ops.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import torch_backend
from .checks import Problem, check_index_range, check_inputs, refuse_forward_ad
from .dispatch import MAX_DECODE_LQ, cuda_decode_module, select_backend
from .ops import out_layout
from .reference import reference_attention


def _decode_forward_fn(name: str):
    if name == "triton":
        from .triton import decode

        return decode.forward
    if name == "cuda":
        module, why = cuda_decode_module()
        if module is None:
            raise RuntimeError(why)
        return module.decode_forward
    return torch_backend.forward


@torch.library.custom_op("prefix_kernels::decode", mutates_args=(), device_types=None)
def _decode(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Optional[Tensor], kv_mask: Optional[Tensor], causal: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    if prefix_index is not None:  # the public check cannot see values under torch.compile
        check_index_range(prefix_index, prefix_k.shape[0])
    out, lse = _decode_forward_fn(backend)(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale)
    B, Hq, Lq, D = q.shape
    like = out_layout(B, Hq, Lq, D, q)
    if out.stride() != like.stride():  # the fake below promises ops.out_layout's memory
        out = like.copy_(out)
    return out, lse.contiguous()


@_decode.register_fake
def _decode_fake(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend):
    B, Hq, Lq, D = q.shape
    return out_layout(B, Hq, Lq, D, q), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def _check_forward_only(tensors) -> None:
    if torch.is_grad_enabled():
        wanting = [name for name, t in zip(("q", "k", "v", "prefix_k", "prefix_v"), tensors) if t.requires_grad]
        if wanting:
            raise RuntimeError(
                f"shared_prefix_decode is forward-only (inference), but {', '.join(wanting)} "
                f"require{'s' if len(wanting) == 1 else ''} grad with grad mode on: use "
                "prefix_kernels.shared_prefix_attention for training, or call this under "
                "torch.no_grad() / torch.inference_mode()"
            )


def decode_checked(p: Problem, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend):
    """The decode path after check_inputs: backend choice and the call. Returns (out, lse).

    `scale` is a float already; prefix_index is None when every request uses prefix 0.
    """
    name = select_backend(backend, p, decode=True)
    if name == "reference":
        out, lse = reference_attention(
            q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, kv_mask=kv_mask, causal=causal, scale=scale
        )
        return out.to(q.dtype), lse.float()
    return _decode(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, bool(causal), scale, name)


def shared_prefix_decode(
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
    """One decode (or append) step of shared-prefix attention: forward only, for inference.

    Same contract as :func:`prefix_kernels.shared_prefix_attention`, for Lq = 1 to 16 new tokens
    per request. The prefix part reads each prefix tile once for all the requests that share it
    and all query heads of a kv group; each request's own cache is split along its keys
    (flash-decoding) so that small batches still fill the GPU; the parts merge by log-sum-exp.

    Args:
        q: (B, Hq, Lq, D) the new tokens' queries, 1 <= Lq <= 16. Any strides.
        k, v: (B, Hkv, T, D) each request's own cache (the new tokens' keys included), T >= 0.
            Any strides.
        prefix_k, prefix_v: (G, Hkv, P, D) the G >= 1 shared prefixes, P >= 0.
        prefix_index: (B,) integer tensor, request b uses prefix ``prefix_index[b]`` in [0, G).
            None: every request uses prefix 0.
        kv_mask: (B, T) bool, True where request b may attend its own key j (False on padding,
            typically on the left). Prefix keys are always visible.
        causal: query i sees own key j only if ``j <= i + (T - Lq)`` (bottom-right aligned)::

                Lq = 2, T = 5:    keys 0 1 2 3 4
                        query 0:       x x x x .
                        query 1:       x x x x x

        scale: multiplies q @ k^T; default 1 / sqrt(D).
        return_lse: also return the natural-log log-sum-exp of the scaled scores over every
            visible key, float32 (B, Hq, Lq); -inf for a row that sees no key (only possible
            with P == 0), whose output is 0.
        backend: "auto" (on CUDA: whichever of "cuda" and "triton" the benchmark measured
            faster for the nearest shape on this GPU, prefix_kernels/data/decode_choice.json,
            "cuda" where nothing was measured; then the other, then "torch"; on CPU: "torch"),
            "cuda" (the optional prefix_kernels.cuda extension), "triton", "torch" or
            "reference" (materialises the prefix per request; for tests).

    GQA/MQA: Hq must be a multiple of Hkv; query head h reads kv head h // (Hq // Hkv).
    dtypes: float16, bfloat16, float32 (all five tensors alike). Head dim D in [16, 256].

    Raises:
        ValueError: Lq outside 1..16 (use shared_prefix_attention), or any malformed argument.
        RuntimeError: an input requires grad while grad mode is on (use shared_prefix_attention).

    Returns:
        out (B, Hq, Lq, D) in q's dtype (memory laid out (B, Lq, Hq, D)), or (out, lse).
    """
    p = check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, scale, causal)
    refuse_forward_ad(q, k, v, prefix_k, prefix_v)
    if not 1 <= p.Lq <= MAX_DECODE_LQ:
        raise ValueError(
            f"q has Lq={p.Lq} query tokens per request (shape {tuple(q.shape)}); shared_prefix_decode takes "
            f"1 to {MAX_DECODE_LQ}: use shared_prefix_attention for longer queries"
        )
    _check_forward_only((q, k, v, prefix_k, prefix_v))
    scale = 1.0 / math.sqrt(p.D) if scale is None else float(scale)
    if p.G == 1:
        prefix_index = None  # all requests use prefix 0 (values were checked to be in [0, 1))
    out, lse = decode_checked(p, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, backend)
    return (out, lse) if return_lse else out
