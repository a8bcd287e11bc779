"""The public functions: describe the problem once, choose a backend, call the op.

  shared_prefix_attention   training and prefill (forward and backward)
  shared_prefix_decode      a decode or append step of 1 to 16 tokens per request (forward only)

Both check their arguments once (_core/problem.py), ask the registry for the implementation
planned for this kind of call (backends/registry.py), and call the custom op (ops.py), or the
reference directly, which autograd differentiates itself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._core.problem import MAX_DECODE_LQ, Problem, check_decode_lq, check_inputs, refuse_forward_ad
from .backends import registry
from .backends.registry import NoBackendError

__all__ = ["shared_prefix_attention", "shared_prefix_decode", "NoBackendError"]


def routes_to_decode(backend: str, p: Problem, tensors) -> bool:
    """Whether shared_prefix_attention hands this call to the decode path (shared_prefix_decode's
    backends): "auto" on CUDA tensors with Lq <= 16 when no gradient is wanted, where the split
    decode kernels fill the GPU and the training kernels would not."""
    if backend != "auto" or p.device.type != "cuda" or p.Lq > MAX_DECODE_LQ:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _run(op, p: Problem, backend: str, decode: bool, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask,
         causal: bool, scale: float, prefix_mask):
    """Plan, then run: the reference is called directly (autograd differentiates it), every
    other implementation through its custom op."""
    name = registry.plan(backend, p, decode=decode)
    impl = registry.implementation(name)
    if impl.differentiable:
        return impl.function("decode" if decode else "forward")(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask,
                                                                 causal, scale, prefix_mask=prefix_mask)
    # Under torch.compile the values of prefix_index are not visible here: the op checks them.
    return op(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, name,
              torch.compiler.is_compiling(), prefix_mask)


def attention(q, k, v, prefix_k, prefix_v, *, prefix_index=None, kv_mask=None, causal=True, scale=None,
              return_lse=False, backend="auto", index_checked=False, prefix_mask=None):
    """shared_prefix_attention, for callers inside the package that have checked prefix_index's
    values once for a whole forward (index_checked=True skips that device sync per layer)."""
    p = check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, scale, causal,
                     index_values=not index_checked, prefix_mask=prefix_mask)
    refuse_forward_ad(q, k, v, prefix_k, prefix_v)
    scale = 1.0 / math.sqrt(p.D) if scale is None else float(scale)
    if p.G == 1:
        prefix_index = None  # all requests use prefix 0 (values in [0, 1))
    if routes_to_decode(backend, p, (q, k, v, prefix_k, prefix_v)):
        out, lse = _run(ops.decode, p, "auto", True, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal,
                        scale, prefix_mask)
    else:
        out, lse = _run(ops.fwd, p, backend, False, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal,
                        scale, prefix_mask)
    return (out, lse) if return_lse else out


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
    prefix_mask: Optional[Tensor] = None,
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
            May be None only when G == 1.
        kv_mask: (B, Lk) bool, True where request b may attend its own key j (padding: False).
        causal: query i sees own key j only if ``j <= i + (Lk - Lq)``, aligned to the bottom
            right as in FlashAttention 2.1+::

                Lq = 2, Lk = 5:   keys 0 1 2 3 4
                        query 0:       x x x x .
                        query 1:       x x x x x

            Prefix keys are visible to every query (causality does not apply to them).
        scale: multiplies q @ k^T; default 1 / sqrt(D).
        return_lse: also return the log-sum-exp, in natural log (base e, not base 2), of the
            scaled scores over every visible key: float32 (B, Hq, Lq). -inf for a row that sees
            no key (P == 0, or every prefix key masked, and no own key); such a row's output and
            gradients are 0.
        backend: "auto" (triton on CUDA, torch on CPU; falls back with a logged reason; on
            CUDA with Lq <= 16 and no input needing a gradient, the decode kernels of
            :func:`prefix_kernels.shared_prefix_decode`), "triton", "torch" or "reference"
            (materialises the prefix; for tests). PREFIX_KERNELS_BACKEND overrides "auto".
        prefix_mask: (G, P) bool, True where key j of prefix g may be attended (left-padded
            prompts of different lengths sharing one (G, Hkv, P, D) tensor: False on the padding).
            None: every prefix key is visible.

    GQA/MQA: Hq must be a multiple of Hkv; query head h reads kv head h // (Hq // Hkv).
    dtypes: float16, bfloat16, float32 (all five tensors alike). Head dim D in [16, 256].

    Returns:
        out (B, Hq, Lq, D) in q's dtype, or (out, lse) when return_lse.
    """
    return attention(q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, kv_mask=kv_mask, causal=causal,
                     scale=scale, return_lse=return_lse, backend=backend, prefix_mask=prefix_mask)


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
    prefix_mask: Optional[Tensor] = None,
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
            May be None only when G == 1.
        kv_mask: (B, T) bool, True where request b may attend its own key j (False on padding,
            typically on the left).
        prefix_mask: (G, P) bool, True where key j of prefix g may be attended; None: all.
        causal: query i sees own key j only if ``j <= i + (T - Lq)`` (bottom-right aligned)::

                Lq = 2, T = 5:    keys 0 1 2 3 4
                        query 0:       x x x x .
                        query 1:       x x x x x

        scale: multiplies q @ k^T; default 1 / sqrt(D).
        return_lse: also return the natural-log log-sum-exp of the scaled scores over every
            visible key, float32 (B, Hq, Lq); -inf for a row that sees no key (P == 0, or every
            prefix key masked, and no own key), whose output is 0.
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
    p = check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, scale, causal, prefix_mask=prefix_mask)
    refuse_forward_ad(q, k, v, prefix_k, prefix_v)
    check_decode_lq(p, q)
    _check_forward_only((q, k, v, prefix_k, prefix_v))
    scale = 1.0 / math.sqrt(p.D) if scale is None else float(scale)
    if p.G == 1:
        prefix_index = None  # all requests use prefix 0 (values in [0, 1))
    out, lse = _run(ops.decode, p, backend, True, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale,
                    prefix_mask)
    return (out, lse) if return_lse else out
