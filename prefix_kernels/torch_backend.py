"""Pure-PyTorch split path: the CPU backend and the fallback everywhere.

No request gets a copy of its prefix. The prefix part is one batched matrix product per prefix g,
batched over the Hkv kv heads, whose rows are the stacked queries of every request that uses g
(and every query head of each kv group): (Hkv, n_g * group * Lq, D) x (Hkv, D, P). Its gradient
is therefore reduced across the batch by the matrix product itself, with no (B, Hkv, P, D)
buffer. The per-request part is ordinary masked attention; the two merge by their natural-log
log-sum-exps. Everything is computed in float32 and cast back at the end.
"""

from __future__ import annotations

import torch

from .reference import visible_keys


def _requests_by_prefix(prefix_index, B: int):
    """[(g, rows)] for every prefix in use; rows None means all B requests (no gather needed)."""
    if prefix_index is None:
        return [(0, None)]
    used = torch.unique(prefix_index).tolist()  # one device sync, on the fallback path only
    if len(used) == 1:
        return [(used[0], None)]
    return [(g, torch.nonzero(prefix_index == g).flatten()) for g in used]


def _stack_rows(x5, rows):
    """(B, Hkv, R, X) -> (Hkv, n * R, X): the rows of the requests `rows`, stacked per kv head."""
    xg = x5 if rows is None else x5[rows]
    return xg.transpose(0, 1).reshape(x5.shape[1], -1, x5.shape[-1])


def _unstack_rows(xs, n: int):
    """(Hkv, n * R, X) -> (n, Hkv, R, X), the inverse of _stack_rows."""
    Hkv, _, X = xs.shape
    return xs.reshape(Hkv, n, -1, X).transpose(0, 1)


def _scatter(full, rows, part):
    if rows is None:
        full.copy_(part)
    else:
        full[rows] = part


def _no_inf(lse):
    """lse with -inf (a row that sees no key) replaced by +inf, so exp(s - lse) is 0, not NaN."""
    return torch.where(torch.isneginf(lse), torch.inf, lse)


def _per_request_scores(q5, k, kv_mask, causal, scale, Lq):
    """Masked scores (B, Hkv, group * Lq, Lk) of each request's queries against its own keys."""
    B, Hkv, R, _ = q5.shape
    Lk = k.shape[2]
    s = torch.matmul(q5, k.float().transpose(-1, -2)) * scale
    allowed = visible_keys(B, Lq, Lk, kv_mask, causal, q5.device)  # (B, 1, Lq, Lk)
    s5 = s.view(B, Hkv, R // Lq, Lq, Lk).masked_fill(~allowed[:, :, None], float("-inf"))
    return s5.view(B, Hkv, R, Lk)


# ---------------------------------------------------------------- fused CPU path
#
# On CPU tensors both parts run through ATen's fused flash-attention kernel for CPU (the one SDPA
# uses), which also returns the natural-log lse and accepts GQA directly. The per-request part is
# one call with an additive bias (bottom-right causal + padding); the prefix part is one call per
# prefix whose "batch" is the stacked queries of all its requests, so its backward reduces the
# prefix gradient over the batch inside the kernel. Measured on 2 CPU cores, B=16, Hq=8, Hkv=2,
# L=40, P=16, D=32, fp32, forward + backward: see benchmarks/NOTES.md.


def _cpu_flash():
    return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)


def _own_bias(B, Lq, Lk, kv_mask, causal, dtype, device):
    """(B, 1, Lq, Lk) additive bias (0 or -inf) and (B, 1, Lq) whether a row sees any own key."""
    allowed = visible_keys(B, Lq, Lk, kv_mask, causal, device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return bias, allowed.any(-1)


def _forward_cpu(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale):
    fwd, _ = _cpu_flash()
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    neg_inf = torch.full((B, Hq, Lq), float("-inf"), device=q.device)
    out_r, lse_r = torch.zeros(B, Hq, Lq, D, device=q.device), neg_inf
    if Lk > 0:
        bias, any_own = _own_bias(B, Lq, Lk, kv_mask, causal, q.dtype, q.device)
        o, lse = fwd(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        lse_r = lse.float().masked_fill(~any_own, float("-inf"))  # the kernel gives 0 for such rows
        out_r = o.float()
    out_p, lse_p = torch.zeros(B, Hq, Lq, D, device=q.device), neg_inf.clone()
    if P > 0:
        q5 = q.reshape(B, Hkv, -1, D)
        for g, rows in _requests_by_prefix(prefix_index, B):
            n = B if rows is None else rows.numel()
            o, lse = fwd(_stack_rows(q5, rows)[None], prefix_k[g][None], prefix_v[g][None], 0.0, False, scale=scale)
            _scatter(out_p.view(B, Hkv, -1, D), rows, _unstack_rows(o[0].float(), n))
            _scatter(lse_p.view(B, Hkv, -1), rows, _unstack_rows(lse[0].float()[..., None], n)[..., 0])
    return _merge(q, out_p, lse_p, out_r, lse_r)


def _merge(q, out_p, lse_p, out_r, lse_r):
    B, Hq, Lq, D = q.shape
    lse = torch.logaddexp(lse_p, lse_r)
    safe = _no_inf(lse)
    out = torch.exp(lse_p - safe)[..., None] * out_p + torch.exp(lse_r - safe)[..., None] * out_r
    # Same layout as the triton backend: (B, Lq, Hq, D) memory seen as (B, Hq, Lq, D).
    out = out.transpose(1, 2).to(q.dtype).contiguous()
    return out.transpose(1, 2), lse


def _backward_cpu(dout, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse):
    """Gradients through the fused CPU kernel's backward, given the merged out and lse: each part's
    probabilities are exp(s - lse_total), which is what that backward computes from them."""
    _, bwd = _cpu_flash()
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    lse_safe = _no_inf(lse).to(torch.float32).contiguous()  # rows that see nothing: p = exp(-inf) = 0
    out = out.contiguous()
    dout = dout.to(q.dtype).contiguous()
    dq = torch.zeros(B, Hq, Lq, D, device=q.device)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    if Lk > 0:
        bias, _ = _own_bias(B, Lq, Lk, kv_mask, causal, q.dtype, q.device)
        dq_r, dk, dv = bwd(dout, q, k, v, out, lse_safe, 0.0, False, attn_mask=bias, scale=scale)
        dq += dq_r.float()
    dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    if P > 0:
        q5, do5, o5 = (x.reshape(B, Hkv, -1, D) for x in (q, dout, out))
        lse5 = lse_safe.view(B, Hkv, -1)
        dq5 = dq.view(B, Hkv, -1, D)
        for g, rows in _requests_by_prefix(prefix_index, B):
            n = B if rows is None else rows.numel()
            qs, dos, os_ = (_stack_rows(x, rows)[None] for x in (q5, do5, o5))
            lses = _stack_rows(lse5[..., None], rows)[None, ..., 0]
            dqs, dpk_g, dpv_g = bwd(dos, qs, prefix_k[g][None], prefix_v[g][None], os_, lses, 0.0, False, scale=scale)
            dpk[g], dpv[g] = dpk_g[0], dpv_g[0]
            if rows is None:
                dq5 += _unstack_rows(dqs[0].float(), n)
            else:
                dq5[rows] += _unstack_rows(dqs[0].float(), n)
    return dq.to(q.dtype), dk, dv, dpk, dpv


# ---------------------------------------------------------------- explicit path (any device)


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal: bool, scale: float):
    """Returns out (B, Hq, Lq, D) in q's dtype and the natural-log lse (B, Hq, Lq) in float32."""
    if q.device.type == "cpu":
        return _forward_cpu(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale)
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    q5 = q.float().reshape(B, Hkv, -1, D)  # (B, Hkv, R = group * Lq, D)
    R = q5.shape[2]
    neg_inf = torch.full((B, Hkv, R), float("-inf"), device=q.device)

    out_p, lse_p = torch.zeros_like(q5), neg_inf.clone()
    if P > 0:
        for g, rows in _requests_by_prefix(prefix_index, B):
            qs = _stack_rows(q5, rows)  # (Hkv, N, D)
            s = torch.bmm(qs, prefix_k[g].float().transpose(1, 2)) * scale  # (Hkv, N, P)
            lse = torch.logsumexp(s, dim=-1)
            o = torch.bmm(torch.exp(s - lse[..., None]), prefix_v[g].float())
            n = B if rows is None else rows.numel()
            _scatter(out_p, rows, _unstack_rows(o, n))
            _scatter(lse_p, rows, _unstack_rows(lse[..., None], n)[..., 0])

    out_r, lse_r = torch.zeros_like(q5), neg_inf
    if Lk > 0:
        s = _per_request_scores(q5, k, kv_mask, causal, scale, Lq)
        lse_r = torch.logsumexp(s, dim=-1)
        out_r = torch.matmul(torch.exp(s - _no_inf(lse_r)[..., None]), v.float())

    return _merge(q, out_p.view(B, Hq, Lq, D), lse_p.view(B, Hq, Lq), out_r.view(B, Hq, Lq, D), lse_r.view(B, Hq, Lq))


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) of forward, each in its input's dtype.

    With p = softmax probabilities over all visible keys and delta = rowsum(dout * out) - dlse:
    dv = p^T dout, ds = p * (dout v^T - delta), dq = scale * ds k, dk = scale * ds^T q.
    """
    if q.device.type == "cpu" and dlse is None:
        return _backward_cpu(dout, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse)
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    q5 = q.float().reshape(B, Hkv, -1, D)
    do5 = dout.float().reshape(B, Hkv, -1, D)
    lse5 = _no_inf(lse.float().reshape(B, Hkv, -1))
    delta = (do5 * out.float().reshape(B, Hkv, -1, D)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float().reshape(B, Hkv, -1)
    delta = torch.where(torch.isinf(lse5), 0.0, delta)  # empty rows get no gradient

    dq5 = torch.zeros_like(q5)
    dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)
    dpv = torch.zeros_like(dpk)
    if P > 0:
        for g, rows in _requests_by_prefix(prefix_index, B):
            qs, dos = _stack_rows(q5, rows), _stack_rows(do5, rows)
            lses = _stack_rows(lse5[..., None], rows)
            deltas = _stack_rows(delta[..., None], rows)
            pk, pv = prefix_k[g].float(), prefix_v[g].float()
            p = torch.exp(torch.bmm(qs, pk.transpose(1, 2)) * scale - lses)  # (Hkv, N, P)
            dpv[g] = torch.bmm(p.transpose(1, 2), dos)
            ds = p * (torch.bmm(dos, pv.transpose(1, 2)) - deltas)
            dpk[g] = torch.bmm(ds.transpose(1, 2), qs) * scale
            n = B if rows is None else rows.numel()
            _scatter(dq5, rows, _unstack_rows(torch.bmm(ds, pk) * scale, n))

    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if Lk > 0:
        s = _per_request_scores(q5, k, kv_mask, causal, scale, Lq)
        p = torch.exp(s - lse5[..., None])  # masked keys: exp(-inf) = 0
        dv = torch.matmul(p.transpose(-1, -2), do5)
        ds = p * (torch.matmul(do5, v.float().transpose(-1, -2)) - delta[..., None])
        dq5 += torch.matmul(ds, k.float()) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q5) * scale

    return (
        dq5.view(B, Hq, Lq, D).to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        dpk.to(prefix_k.dtype),
        dpv.to(prefix_v.dtype),
    )
