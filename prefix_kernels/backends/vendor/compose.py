"""A shared-prefix attention call as two calls of a vendor kernel, merged by log-sum-exp.

    prefix part  per prefix g, one non-causal call whose batch is the requests using g folded
                 into the query length: q (n_g, Hq, Lq, D) read as (1, Hq, n_g * Lq, D) against
                 prefix g (1, Hkv, P, D); a view, no copy, in transformers' (B, L, H, D) memory
                 (Hydragen's inter-sequence batching). Its backward returns prefix g's dK/dV
                 already summed over the requests. prefix_mask enters as a bias over P.
    own part     one call over each request's own keys (B, Hkv, Lk, D): the kernel's causal flag
                 where Lq == Lk and there is no kv_mask, else an additive bias (bottom-right
                 causal + padding), built once per mask and reused by every layer.
    merge        out = w_p out_p + w_r out_r with w = exp(lse_part - lse), lse = logaddexp of the
                 two (natural log); a part a row cannot see has lse -inf and weight 0.
    backward     each part's kernel backward called with the merged out and lse: its
                 probabilities exp(s - lse) are then those of the combined softmax, and its
                 delta = rowsum(dout * out) is the combined one, so the gradients are exact (as in
                 ring attention). A gradient through lse (dlse) is not taken: backward returns None.

Rows that see no key of a part (padding, a fully masked prefix) get lse -inf and output 0 from
fix-ups on the device, never from the kernel's convention for empty rows, and no host sync.
`checked=True` (the CPU path) also returns None where a kernel's result is not finite, so that the
caller recomputes with the explicit path: a bias adds -inf to a NaN or Inf score, which poisons
rows that may not see it (torch_split/aten_cpu.py has the argument).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from ..._core import env
from ..._core.grouping import prefix_groups
from ..._core.layout import bhld_like
from ..._core.masks import visible_keys
from . import kernels as K


# Whether CUDA tensors merge in the Triton kernel (tests switch it off to compare).
MERGE_KERNEL = True


def unit_last(x):
    """x with a contiguous last dim, which every kernel here reads as contiguous whatever its
    stride says (ATen's CPU flash kernel gave errors of 2.4 for a D-strided bf16 q). Copied only
    where it is not; transformers' views all have unit stride there."""
    return x if x.stride(-1) == 1 else x.contiguous()


# ---- which kernel runs a part ----------------------------------------------------------------


def order(device: torch.device) -> tuple:
    """The kernels tried for a part, best first: PREFIX_KERNELS_COMPOSED_KERNELS (names, comma
    separated) when set, else this device type's order (kernels.CUDA_ORDER, CPU_ORDER)."""
    return _order(device.type, env.value(env.COMPOSED_KERNELS))


@lru_cache(maxsize=None)
def _order(device_type: str, requested: str) -> tuple:
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = [n for n in names if n not in K.BY_NAME]
        if unknown:
            raise ValueError(f"{env.COMPOSED_KERNELS} names unknown kernels {unknown}; known: {sorted(K.BY_NAME)}")
        return tuple(K.BY_NAME[n] for n in names)
    return K.CUDA_ORDER if device_type == "cuda" else K.CPU_ORDER


def kernel_for(dtype, D: int, device: torch.device, *, bias: bool):
    """(the first kernel that can run a part, None) or (None, every kernel's reasons)."""
    reasons = []
    for kernel in order(device):
        why = list(kernel.reasons(dtype, D, device))
        if bias and not kernel.takes_bias and not why:
            why.append("takes no bias (kv_mask, prefix_mask or non-square causal)")
        if not why:
            return kernel, []
        reasons.append(f"{kernel.name}: {', '.join(why)}")
    return None, reasons or ["no kernel for this device"]


def reasons(dtype, D: int, device: torch.device) -> list:
    """Why no kernel can run some part of a call on this device, dtype and head dim ([] if one
    can run every kind of part: with and without a bias)."""
    why = []
    for bias in (False, True):
        kernel, declined = kernel_for(dtype, D, device, bias=bias)
        if kernel is None:
            why.append(f"no kernel for a part {'with' if bias else 'without'} a bias ({'; '.join(declined)})")
    return why


def _kernel(dtype, D, device, bias: bool):
    kernel, declined = kernel_for(dtype, D, device, bias=bias)
    if kernel is None:  # the backend's reasons were asked first; reached only if they changed since
        raise RuntimeError(f"no vendor kernel for this part: {'; '.join(declined)}")
    return kernel


# ---- masks and layouts -----------------------------------------------------------------------


def _aligned_bias(allowed, dtype, align: int):
    """An additive bias (0 / -inf) in `dtype` shaped like `allowed`, its last dim allocated as a
    multiple of `align` (the memory-efficient kernel reads rows at aligned strides)."""
    *lead, last = allowed.shape
    padded = -(-last // align) * align
    bias = torch.zeros((*lead, padded), dtype=dtype, device=allowed.device)[..., :last]
    return bias.masked_fill_(~allowed, float("-inf"))


# The last own-part mask built. Every layer of a model passes a slice of the same kv_mask, so a
# step builds it once instead of once per layer. The cache keeps the mask it was built from
# alive, so a mask with the same data pointer, shape, strides and version is a view of the same,
# unchanged memory, never a new tensor that reuses a freed address.
_own_cache: tuple = (None, None, None)


def _mask_key(kv_mask):
    if kv_mask is None:
        return None
    return (kv_mask.data_ptr(), tuple(kv_mask.shape), kv_mask.stride(), kv_mask._version)


# The last grouping of requests by prefix. prefix_groups reads the index back to the host (a
# sync); every layer of a forward, and the backward, pass the same index, so they share one.
# Kept alive with its key, as _own_cache.
_groups_cache: tuple = (None, None, None)


def groups_of(prefix_index) -> list:
    """prefix_groups(prefix_index), computed once per index tensor and version."""
    global _groups_cache
    if prefix_index is None:
        return prefix_groups(None)
    key = _mask_key(prefix_index)
    held, cached_key, value = _groups_cache
    if cached_key == key and held is not None:
        return value
    value = prefix_groups(prefix_index)
    _groups_cache = (prefix_index, key, value)
    return value


def own_needs_bias(Lq: int, Lk: int, kv_mask, causal: bool) -> bool:
    return kv_mask is not None or (causal and Lq != Lk)


def _own_bias(kernel, B, Lq, Lk, kv_mask, causal, dtype, device):
    """((B or 1, 1, Lq, Lk) bias, (B or 1, 1, Lq) rows with no visible own key)."""
    global _own_cache
    key = (kernel.bias_align, B, Lq, Lk, causal, dtype, device, _mask_key(kv_mask))
    held, cached_key, value = _own_cache
    if cached_key == key and (kv_mask is None or held is not None):
        return value
    allowed = visible_keys(1 if kv_mask is None else B, Lq, Lk, kv_mask, causal, device)
    value = (_aligned_bias(allowed, dtype, kernel.bias_align), ~allowed.any(-1))
    _own_cache = (kv_mask, key, value)
    return value


def _prefix_bias(kernel, prefix_mask, g: int, dtype):
    """(1, 1, 1, P) bias of prefix g's keys, and a 0-d bool: whether any key of g is visible."""
    if prefix_mask is None:
        return None, None
    return _aligned_bias(prefix_mask[g][None, None, None], dtype, kernel.bias_align), prefix_mask[g].any()


def fold(x):
    """(n, H, L, X) -> (1, H, n * L, X): the requests' rows as one long query. A view when x's
    memory is (n, L, H, X), transformers' layout and the package's outputs'."""
    n, H, L, X = x.shape
    return x.transpose(0, 1).reshape(H, n * L, X)[None]


def unfold(x, n: int):
    """(1, H, n * L, X) -> (n, H, L, X), the inverse of fold; always a view."""
    return x[0].unflatten(1, (n, -1)).transpose(0, 1)


def _fold_lse(lse):
    """(n, H, L) -> (1, H, n * L), contiguous (kernels read lse densely)."""
    n, H, L = lse.shape
    return lse.transpose(0, 1).reshape(1, H, n * L).contiguous()


def _unfold_lse(lse, n: int):
    return lse[0].unflatten(1, (n, -1)).transpose(0, 1)


def _repeat_heads(x, group: int):
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _sum_heads(dx, group: int):
    if group == 1:
        return dx
    B, H, L, D = dx.shape
    return dx.unflatten(1, (H // group, group)).sum(2)


def _finite(*xs) -> bool:
    return bool(torch.isfinite(sum(x.sum(dtype=torch.float32) for x in xs)))


def no_inf(lse):
    """lse with -inf (a row that sees no key) replaced by +inf, so exp(s - lse) is 0, not NaN."""
    return torch.where(torch.isneginf(lse), torch.inf, lse)


# ---- forward -----------------------------------------------------------------------------------


def _own_forward(q, k, v, kv_mask, causal, scale):
    """(out_r, lse_r, raw lse) of the own part; rows with no visible own key have lse -inf, out 0."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    biased = own_needs_bias(Lq, Lk, kv_mask, causal)
    kernel = _kernel(q.dtype, D, q.device, biased)
    group = Hq // k.shape[1] if not kernel.native_gqa else 1
    k, v = _repeat_heads(k, group), _repeat_heads(v, group)
    if not biased:
        out, lse = kernel.forward(q, k, v, causal=causal, bias=None, scale=scale)
        return out, lse, lse
    bias, empty = _own_bias(kernel, B, Lq, Lk, kv_mask, causal, q.dtype, q.device)
    out, raw = kernel.forward(q, k, v, causal=False, bias=bias, scale=scale)
    return out.masked_fill(empty[..., None], 0.0), raw.masked_fill(empty, float("-inf")), raw


def _prefix_forward(q, pk, pv, bias, visible, scale, kernel):
    """(out (n, Hq, Lq, D), lse (n, Hq, Lq), the kernel's lse where it saw a key: what `checked`
    checks) of q's rows against one prefix (1, Hkv, P, D)."""
    n, Hq = q.shape[:2]
    group = Hq // pk.shape[1] if not kernel.native_gqa else 1
    out, raw = kernel.forward(fold(q), _repeat_heads(pk, group), _repeat_heads(pv, group), causal=False,
                              bias=bias, scale=scale)
    lse = checkable = raw
    if visible is not None:  # a prefix with every key masked: its rows see nothing of it
        out = torch.where(visible, out, 0.0)
        lse = torch.where(visible, raw, float("-inf"))
        checkable = torch.where(visible, raw, 0.0)  # what the kernel said of a prefix it could see
    return unfold(out, n), _unfold_lse(lse, n), checkable


def merge(q, out_p, lse_p, out_r, lse_r):
    """Both parts combined by their natural-log lse (either may be -inf), in the package's layout.
    On CUDA one Triton kernel (merge_kernel.py), where this eager form moves several times the
    bytes of the outputs."""
    if q.device.type == "cuda" and MERGE_KERNEL:
        from . import merge_kernel

        return merge_kernel.merge(q, out_p, lse_p, out_r, lse_r)
    lse = torch.logaddexp(lse_p, lse_r)
    safe = no_inf(lse)
    w_p, w_r = torch.exp(lse_p - safe)[..., None], torch.exp(lse_r - safe)[..., None]
    out = bhld_like(q)
    if q.dtype == torch.float32:
        torch.mul(out_p, w_p, out=out).addcmul_(out_r, w_r)
    else:
        out.copy_(out_p.float() * w_p + out_r.float() * w_r)
    return out, lse


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask=None, *,
            checked=False):
    """(out (B, Hq, Lq, D) in q's dtype and the package's layout, lse (B, Hq, Lq) float32), or
    None when `checked` and a kernel's result is not finite."""
    q, k, v, prefix_k, prefix_v = map(unit_last, (q, k, v, prefix_k, prefix_v))
    B, Hq, Lq, D = q.shape
    P, Lk = prefix_k.shape[2], k.shape[2]
    raw = []
    neg_inf = q.new_full((B, Hq, Lq), float("-inf"), dtype=torch.float32)
    if Lk > 0:
        out_r, lse_r, r = _own_forward(q, k, v, kv_mask, causal, scale)
        raw.append(r)
    else:
        out_r, lse_r = torch.zeros_like(q), neg_inf
    if P > 0:
        kernel = _kernel(q.dtype, D, q.device, prefix_mask is not None)
        groups = groups_of(prefix_index)
        if len(groups) == 1:
            g = groups[0][0]
            bias, visible = _prefix_bias(kernel, prefix_mask, g, q.dtype)
            out_p, lse_p, r = _prefix_forward(q, prefix_k[g][None], prefix_v[g][None], bias, visible, scale, kernel)
            raw.append(r)
        else:
            out_p, lse_p = torch.empty_like(q), torch.empty_like(neg_inf)
            for g, rows in groups:
                bias, visible = _prefix_bias(kernel, prefix_mask, g, q.dtype)
                o, lse, r = _prefix_forward(q[rows], prefix_k[g][None], prefix_v[g][None], bias, visible, scale,
                                            kernel)
                out_p[rows], lse_p[rows] = o, lse
                raw.append(r)
    else:
        out_p, lse_p = torch.zeros_like(q), neg_inf
    if checked and raw and not _finite(*raw):
        return None
    return merge(q, out_p, lse_p.float(), out_r, lse_r.float())


# ---- backward ----------------------------------------------------------------------------------


def _own_backward(dout, q, k, v, out, lse_in, kv_mask, causal, scale):
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    biased = own_needs_bias(Lq, Lk, kv_mask, causal)
    kernel = _kernel(q.dtype, D, q.device, biased)
    group = Hq // k.shape[1] if not kernel.native_gqa else 1
    ke, ve = _repeat_heads(k, group), _repeat_heads(v, group)
    if biased:
        bias, _ = _own_bias(kernel, B, Lq, Lk, kv_mask, causal, q.dtype, q.device)
        dq, dk, dv = kernel.backward(dout, q, ke, ve, out, lse_in, causal=False, bias=bias, scale=scale)
    else:
        dq, dk, dv = kernel.backward(dout, q, ke, ve, out, lse_in, causal=causal, bias=None, scale=scale)
    return dq, _sum_heads(dk, group), _sum_heads(dv, group)


def _prefix_backward(dout, q, out, lse_in, pk, pv, prefix_mask, g, scale, kernel):
    """(dq (n, Hq, Lq, D), dpk (Hkv, P, D), dpv) of q's rows against prefix g, summed over the rows."""
    n, Hq = q.shape[:2]
    if kernel.prefix_backward is not None:
        return kernel.prefix_backward(dout, q, out, lse_in, pk, pv, scale,
                                      None if prefix_mask is None else prefix_mask[g])
    group = Hq // pk.shape[0] if not kernel.native_gqa else 1
    bias, _ = _prefix_bias(kernel, prefix_mask, g, q.dtype)
    dq, dpk, dpv = kernel.backward(fold(dout), fold(q), _repeat_heads(pk[None], group), _repeat_heads(pv[None], group),
                                   fold(out), _fold_lse(lse_in), causal=False, bias=bias, scale=scale)
    return unfold(dq, n), _sum_heads(dpk, group)[0], _sum_heads(dpv, group)[0]


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
             prefix_mask=None, *, checked=False):
    """(dq, dk, dv, dprefix_k, dprefix_v) in the inputs' dtypes, or None where this composition
    cannot give them: a gradient through lse (dlse), or, when `checked`, a non-finite dv."""
    if dlse is not None:
        return None
    dout, q, k, v, prefix_k, prefix_v, out = map(unit_last, (dout.to(q.dtype), q, k, v, prefix_k, prefix_v, out))
    B, Hq, Lq, D = q.shape
    P, Lk = prefix_k.shape[2], k.shape[2]
    lse_in = no_inf(lse.float())
    if Lk > 0:
        dq, dk, dv = _own_backward(dout, q, k, v, out, lse_in, kv_mask, causal, scale)
        if checked and not _finite(dv):
            return None
    else:
        dq, dk, dv = bhld_like(q, zero=True), bhld_like(k, zero=True), bhld_like(v, zero=True)
    dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)
    dpv = torch.zeros_like(dpk)
    if P > 0:
        kernel = _kernel(q.dtype, D, q.device, prefix_mask is not None)
        dq = dq if dq.dtype == torch.float32 else dq.float()
        for g, rows in groups_of(prefix_index):
            pick = (lambda x: x) if rows is None else (lambda x: x[rows])
            dq_g, dpk[g], dpv[g] = _prefix_backward(pick(dout), pick(q), pick(out), pick(lse_in), prefix_k[g],
                                                    prefix_v[g], prefix_mask, g, scale, kernel)
            if rows is None:
                dq += dq_g
            else:
                dq.index_add_(0, rows, dq_g.to(dq.dtype))
        if checked and not _finite(dpv):
            return None
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype))
