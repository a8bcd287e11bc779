"""The split path on CPU tensors, through ATen's fused flash-attention kernel for CPU.

Both parts run through the kernel SDPA uses on a CPU, which also returns the natural-log lse and
accepts GQA directly. The per-request part is one call with an additive bias (bottom-right
causal + padding); the prefix part is one call per prefix whose "batch" is the stacked queries
of all its requests, so its backward reduces the prefix gradient over the batch inside the
kernel (timings in benchmarks/NOTES.md). forward and backward return None where a non-finite
result shows that the explicit path must recompute (see `_finite`).
"""

from __future__ import annotations

import torch

from ..._core.grouping import prefix_groups
from ..._core.layout import bhld_like
from ..._core.masks import visible_keys
from .common import no_inf, out_layout, scatter, unstack_rows


# On CPU tensors both parts run through ATen's fused flash-attention kernel for CPU (the one SDPA
# uses), which also returns the natural-log lse and accepts GQA directly. The per-request part is
# one call with an additive bias (bottom-right causal + padding); the prefix part is one call per
# prefix whose "batch" is the stacked queries of all its requests, so its backward reduces the
# prefix gradient over the batch inside the kernel (timings in benchmarks/NOTES.md).


def unit_last(x):
    """x with a contiguous last dim: ATen's CPU flash kernel (forward and backward) reads the head
    dim as contiguous whatever its stride says (a D-strided bf16 q gave errors of 2.4 instead of
    7e-3). Copied only where it is not; transformers' views all have unit stride there."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _cpu_flash():
    return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)


# Non-finite inputs. The fused kernel masks by adding a -inf bias, and a NaN or Inf score plus
# -inf is NaN: a non-finite key or query would poison rows that may not see it, where the
# reference (and the explicit path) fill masked scores with -inf. A poisoned score s_ij makes
# p_ij = exp(s_ij - lse_i) NaN, which always reaches row i's lse in the forward (it enters the
# row's sum of exponentials) and key j's dv in the backward (dv_j sums p_ij dout_i over every
# query row). So the fused path checks its *results*: one reduction of the small lse (forward)
# and one of dv (backward; Hq / Hkv times smaller than dq under GQA), where checking q, k and
# prefix_k up front would cost three reductions in each direction. On a non-finite result the
# explicit path recomputes. Finite inputs never pay twice; an overflow of huge finite scores only
# costs the recomputation.


def _finite(*xs) -> bool:
    return bool(torch.isfinite(sum(x.sum(dtype=torch.float32) for x in xs)))


# The last bias built. Every layer of a model passes a slice of the same mask, so a step builds it
# once instead of twice per layer. The cache keeps the mask it was built from alive, so a mask with the same data
# pointer, shape, strides and version is a view of the same, unchanged memory, never a new
# tensor that reuses a freed address.
_bias_cache: tuple = (None, None, None)


def _mask_key(kv_mask):
    if kv_mask is None:
        return None
    return (kv_mask.data_ptr(), tuple(kv_mask.shape), kv_mask.stride(), kv_mask._version)


def _own_bias(B, Lq, Lk, kv_mask, causal, dtype, device):
    """(B or 1, 1, Lq, Lk) additive bias (0 or -inf): bottom-right causal + padding; and, if some
    query row sees no own key at all, the (B, 1, Lq) rows whose lse must be -inf, else None."""
    global _bias_cache
    key = (B, Lq, Lk, causal, dtype, device, _mask_key(kv_mask))
    held, cached_key, value = _bias_cache
    if cached_key == key and (kv_mask is None or held is not None):
        return value
    allowed = visible_keys(1 if kv_mask is None else B, Lq, Lk, kv_mask, causal, device)
    bias = torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(-1)  # (B, 1, Lq)
    value = (bias, empty if bool(empty.any()) else None)
    _bias_cache = (kv_mask, key, value)
    return value


def _rows_per_head(x):
    """(n, Hq, Lq, X) -> (Hq, n * Lq, X): each head's query rows. A view when x's memory is
    (n, Lq, Hq, X), which is transformers' layout and this package's outputs' and gradients';
    otherwise one copy."""
    n, H, L, X = x.shape
    return x.transpose(1, 2).reshape(n * L, H, X).transpose(0, 1)


def _key_bias(prefix_mask, g, dtype=torch.float32):
    """(P,) additive bias (0 or -inf) of prefix g's keys, or None without a mask."""
    if prefix_mask is None:
        return None
    return torch.zeros(prefix_mask.shape[1], dtype=dtype, device=prefix_mask.device).masked_fill(
        ~prefix_mask[g], float("-inf"))


def _prefix_bias(prefix_mask, g, dtype):
    """_key_bias as the fused kernel's (1, 1, 1, P) attn_mask, in the inputs' dtype."""
    bias = _key_bias(prefix_mask, g, dtype)
    return None if bias is None else bias[None, None, None]


def _a_prefix_fully_masked(prefix_mask, P: int) -> bool:
    """Whether some prefix has every key masked: the fused path relies on every row seeing a
    prefix key (P > 0), so such a call goes to the explicit path. One device sync."""
    return prefix_mask is not None and P > 0 and not bool(prefix_mask.any(-1).all())


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask=None):
    """The fused forward, or None where a non-finite result shows that the explicit path must
    recompute it (see _finite above), or where some prefix has every key masked (the merge
    below relies on every row seeing a prefix key)."""
    fwd, _ = _cpu_flash()
    if _a_prefix_fully_masked(prefix_mask, prefix_k.shape[2]):
        return None
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    out_r = lse_r = None
    checked = []  # the kernel's own lse, before rows that see no key are set to -inf
    if Lk > 0:
        bias, empty = _own_bias(B, Lq, Lk, kv_mask, causal, q.dtype, q.device)
        out_r, lse_r = fwd(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        if P == 0 and not _finite(lse_r):
            return None
        checked.append(lse_r)
        if empty is not None:
            lse_r = lse_r.masked_fill(empty, float("-inf"))  # the kernel gives 0 for such rows
    if P == 0:
        if out_r is None:  # no key at all: zeros, lse -inf
            return out_layout(q.new_zeros(B, Hq, Lq, D)), q.new_full((B, Hq, Lq), float("-inf"), dtype=torch.float32)
        return out_layout(out_r), lse_r.float()

    groups = prefix_groups(prefix_index)
    if len(groups) == 1:
        # One prefix for the whole batch: read it broadcast (stride 0 over the batch). The kernel
        # reads strides and makes no copy (checked: B=4096, P=1024 grows RSS by 18 MiB, where a
        # copy would take 32 GiB), and no query stacking is needed.
        g = groups[0][0]
        out_p, lse_p = fwd(q, prefix_k[g][None].expand(B, -1, -1, -1), prefix_v[g][None].expand(B, -1, -1, -1),
                           0.0, False, attn_mask=_prefix_bias(prefix_mask, g, q.dtype), scale=scale)
    else:
        out_p = q.new_empty(B, Hkv, Hq // Hkv * Lq, D)
        lse_p = q.new_empty(B, Hkv, Hq // Hkv * Lq, dtype=torch.float32)
        for g, rows in groups:
            qs = q.unflatten(1, (Hkv, -1))[rows].transpose(0, 1).reshape(Hkv, -1, D)[None]
            o, lse = fwd(qs, prefix_k[g][None], prefix_v[g][None], 0.0, False,
                         attn_mask=_prefix_bias(prefix_mask, g, q.dtype), scale=scale)
            scatter(out_p, rows, unstack_rows(o[0], rows.numel()))
            scatter(lse_p, rows, unstack_rows(lse[0][..., None], rows.numel())[..., 0])
        out_p, lse_p = out_p.view(B, Hq, Lq, D), lse_p.view(B, Hq, Lq)
    if not _finite(lse_p, *checked):
        return None
    if out_r is None:
        return out_layout(out_p), lse_p.float()
    # P > 0: every row sees the prefix, lse_p is finite, and the weight of the prefix part,
    # exp(lse_p - logaddexp(lse_p, lse_r)), is sigmoid(lse_p - lse_r) (1 where lse_r = -inf).
    # A weighted sum, not lerp(out_r, out_p, w) = out_r + w (out_p - out_r): with an Inf value in
    # one part, lerp gives Inf - Inf = NaN where the reference's sum gives Inf.
    w = torch.sigmoid(lse_p - lse_r)[..., None]
    out = out_layout(None, like=q)
    if q.dtype == torch.float32:
        torch.mul(out_p, w, out=out).addcmul_(out_r, 1.0 - w)
    else:
        out.copy_(out_p.float() * w + out_r.float() * (1.0 - w))
    return out, torch.logaddexp(lse_p.float(), lse_r.float())


# Rows of the prefix part's backward handled at once: its (Hq, rows, P) scores and their
# gradient take 2 * 4 * Hq * rows * P bytes, 32 MiB at this budget.
_PREFIX_BWD_SCORES = 1 << 22


def _prefix_backward_cpu(dq, dout, q, out, lse, prefix_k, prefix_v, scale, key_bias=None):
    """The prefix part's gradients for requests that share one prefix (P > 0).

    Adds the prefix part of dq into `dq` (n, Hq, Lq, D) and returns (dprefix_k, dprefix_v), each
    (Hkv, P, D) float32, reduced over the n requests by the matrix products themselves: each
    head's query rows of all requests are one (n * Lq, D) matrix, a view in transformers' layout,
    so no request gets a copy of the prefix or of its gradient. With the merged lse and
    delta = rowsum(dout * out): p = exp(s - lse), dv = p^T dout, ds = p * (dout v^T - delta),
    dk = scale * ds^T q, dq += scale * ds k. key_bias (P,) adds -inf to masked prefix keys' scores
    (p = 0 there). Explicit products rather than the fused kernel's
    backward, which needs the rows stacked per kv head (four copies of q's size) and costs more
    at small P (benchmarks/NOTES.md).
    """
    n, Hq, Lq, D = q.shape
    Hkv, P, _ = prefix_k.shape
    group = Hq // Hkv
    f32 = torch.float32
    # (Hq, P, D): per head, not per request. The scale multiplies the product, not pk: that is
    # the fused forward's order, so these scores are its scores to the bit wherever the products
    # agree and p = exp(s - lse) sums to 1 (with pk pre-scaled, the gradients failed the accuracy
    # rule from logits ~300 on; measured, fp32, 4 of 4 seeds).
    pk = prefix_k.to(f32).repeat_interleave(group, 0)
    pv = prefix_v.to(f32).repeat_interleave(group, 0)
    Q, dO = _rows_per_head(q), _rows_per_head(dout)  # (Hq, n * Lq, D)
    lse_rows = lse.transpose(0, 1).reshape(Hq, n * Lq, 1)
    # rowsum(dout * out) over dense memory, then the (small) per-row result rearranged
    delta_rows = (dout.to(f32) * out.to(f32)).sum(-1).transpose(0, 1).reshape(Hq, n * Lq, 1)
    in_place = q.dtype == f32 and dq.transpose(1, 2).is_contiguous()
    dQ = _rows_per_head(dq) if in_place else torch.zeros(Hq, n * Lq, D, dtype=f32, device=q.device)
    dpk = torch.zeros(Hq, P, D, dtype=f32, device=q.device)
    dpv = torch.zeros_like(dpk)
    step = max(1, _PREFIX_BWD_SCORES // (Hq * P))
    for a in range(0, n * Lq, step):
        rows = slice(a, a + step)
        Qc, dOc = Q[:, rows].to(f32), dO[:, rows].to(f32)
        s = torch.bmm(Qc, pk.transpose(1, 2)).mul_(scale)
        if key_bias is not None:
            s.add_(key_bias)
        p = s.sub_(lse_rows[:, rows]).exp_()  # (Hq, c, P)
        dpv.baddbmm_(p.transpose(1, 2), dOc)
        ds = p.mul_(torch.bmm(dOc, pv.transpose(1, 2)).sub_(delta_rows[:, rows]))
        dpk.baddbmm_(ds.transpose(1, 2), Qc)
        dQ[:, rows].baddbmm_(ds, pk, alpha=scale)
    if not in_place:
        dq.add_(dQ.transpose(0, 1).reshape(n, Lq, Hq, D).transpose(1, 2))
    return (dpk * scale).view(Hkv, group, P, D).sum(1), dpv.view(Hkv, group, P, D).sum(1)


def backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse, prefix_mask=None):
    """Gradients through the fused CPU kernel's backward (own keys) and explicit products (the
    prefix), given the merged out and lse: each part's probabilities are exp(s - lse_total). None
    where a non-finite dv shows that the explicit path must recompute them (see _finite), or
    where some prefix has every key masked (as the forward)."""
    _, bwd = _cpu_flash()
    if _a_prefix_fully_masked(prefix_mask, prefix_k.shape[2]):
        return None
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    dout = dout.to(q.dtype)
    if Lk > 0:
        lse_own = lse.contiguous() if P > 0 else no_inf(lse).contiguous()  # no key seen: p = exp(-inf) = 0
        bias, _ = _own_bias(B, Lq, Lk, kv_mask, causal, q.dtype, q.device)
        dq, dk, dv = bwd(dout, q, k, v, out, lse_own, 0.0, False, attn_mask=bias, scale=scale)
        if not _finite(dv):
            return None
    else:
        dq, dk, dv = bhld_like(q, zero=True), bhld_like(k, zero=True), bhld_like(v, zero=True)
    if P == 0:
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)
    dpv = torch.zeros_like(dpk)
    for g, rows in prefix_groups(prefix_index):
        if rows is None:
            dpk[g], dpv[g] = _prefix_backward_cpu(dq, dout, q, out, lse, prefix_k[g], prefix_v[g], scale,
                                                  _key_bias(prefix_mask, g))
        else:
            dq_g = torch.zeros(rows.numel(), Lq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
            dpk[g], dpv[g] = _prefix_backward_cpu(dq_g, dout[rows], q[rows], out[rows], lse[rows],
                                                  prefix_k[g], prefix_v[g], scale, _key_bias(prefix_mask, g))
            dq.index_add_(0, rows, dq_g)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
