"""The split path with plain PyTorch products, on any device: the fallback everywhere (and what
CUDA tensors take when triton declines). Everything in float32, cast back at the end."""

from __future__ import annotations

import torch

from ..._core.grouping import prefix_groups
from ..vendor.compose import no_inf
from .common import merge, per_request_scores, scatter, stack_rows, unstack_rows


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal: bool, scale: float, prefix_mask=None):
    """Returns out (B, Hq, Lq, D) in q's dtype and the natural-log lse (B, Hq, Lq) in float32."""
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    q5 = q.float().reshape(B, Hkv, -1, D)  # (B, Hkv, R = group * Lq, D)
    R = q5.shape[2]
    neg_inf = torch.full((B, Hkv, R), float("-inf"), device=q.device)

    out_p, lse_p = torch.zeros_like(q5), neg_inf.clone()
    if P > 0:
        for g, rows in prefix_groups(prefix_index):
            qs = stack_rows(q5, rows)  # (Hkv, N, D)
            s = torch.bmm(qs, prefix_k[g].float().transpose(1, 2)) * scale  # (Hkv, N, P)
            if prefix_mask is not None:
                s = s.masked_fill(~prefix_mask[g], float("-inf"))
            lse = torch.logsumexp(s, dim=-1)  # -inf where every key of prefix g is masked
            o = torch.bmm(torch.exp(s - no_inf(lse)[..., None]), prefix_v[g].float())
            n = B if rows is None else rows.numel()
            scatter(out_p, rows, unstack_rows(o, n))
            scatter(lse_p, rows, unstack_rows(lse[..., None], n)[..., 0])

    out_r, lse_r = torch.zeros_like(q5), neg_inf
    if Lk > 0:
        s = per_request_scores(q5, k, kv_mask, causal, scale, Lq)
        lse_r = torch.logsumexp(s, dim=-1)
        out_r = torch.matmul(torch.exp(s - no_inf(lse_r)[..., None]), v.float())

    return merge(q, out_p.view(B, Hq, Lq, D), lse_p.view(B, Hq, Lq), out_r.view(B, Hq, Lq, D), lse_r.view(B, Hq, Lq))


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
             prefix_mask=None):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) of forward, each in its input's dtype.

    With p = softmax probabilities over all visible keys and delta = rowsum(dout * out) - dlse:
    dv = p^T dout, ds = p * (dout v^T - delta), dq = scale * ds k, dk = scale * ds^T q.
    """
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    q5 = q.float().reshape(B, Hkv, -1, D)
    do5 = dout.float().reshape(B, Hkv, -1, D)
    lse5 = no_inf(lse.float().reshape(B, Hkv, -1))
    delta = (do5 * out.float().reshape(B, Hkv, -1, D)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float().reshape(B, Hkv, -1)
    delta = torch.where(torch.isinf(lse5), 0.0, delta)  # empty rows get no gradient

    dq5 = torch.zeros_like(q5)
    dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)
    dpv = torch.zeros_like(dpk)
    if P > 0:
        for g, rows in prefix_groups(prefix_index):
            qs, dos = stack_rows(q5, rows), stack_rows(do5, rows)
            lses = stack_rows(lse5[..., None], rows)
            deltas = stack_rows(delta[..., None], rows)
            pk, pv = prefix_k[g].float(), prefix_v[g].float()
            s = torch.bmm(qs, pk.transpose(1, 2)) * scale
            if prefix_mask is not None:
                s = s.masked_fill(~prefix_mask[g], float("-inf"))
            p = torch.exp(s - lses)  # (Hkv, N, P); masked keys: exp(-inf) = 0
            dpv[g] = torch.bmm(p.transpose(1, 2), dos)
            ds = p * (torch.bmm(dos, pv.transpose(1, 2)) - deltas)
            dpk[g] = torch.bmm(ds.transpose(1, 2), qs) * scale
            n = B if rows is None else rows.numel()
            scatter(dq5, rows, unstack_rows(torch.bmm(ds, pk) * scale, n))

    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if Lk > 0:
        s = per_request_scores(q5, k, kv_mask, causal, scale, Lq)
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
