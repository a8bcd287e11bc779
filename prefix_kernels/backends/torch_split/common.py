"""Pieces of the explicit split path: stacking the rows of the requests that use one prefix,
masked per-request scores, the log-sum-exp merge of the two parts."""

from __future__ import annotations

import torch

from ..._core.layout import bhld_like
from ..._core.masks import visible_keys
from ..vendor.compose import no_inf


def stack_rows(x5, rows):
    """(B, Hkv, R, X) -> (Hkv, n * R, X): the rows of the requests `rows`, stacked per kv head."""
    xg = x5 if rows is None else x5[rows]
    return xg.transpose(0, 1).reshape(x5.shape[1], -1, x5.shape[-1])


def unstack_rows(xs, n: int):
    """(Hkv, n * R, X) -> (n, Hkv, R, X), the inverse of stack_rows."""
    Hkv, _, X = xs.shape
    return xs.reshape(Hkv, n, -1, X).transpose(0, 1)


def scatter(full, rows, part):
    if rows is None:
        full.copy_(part)
    else:
        full[rows] = part


def per_request_scores(q5, k, kv_mask, causal, scale, Lq):
    """Masked scores (B, Hkv, group * Lq, Lk) of each request's queries against its own keys."""
    B, Hkv, R, _ = q5.shape
    Lk = k.shape[2]
    s = torch.matmul(q5, k.float().transpose(-1, -2)) * scale
    allowed = visible_keys(B, Lq, Lk, kv_mask, causal, q5.device)  # (B, 1, Lq, Lk)
    s5 = s.view(B, Hkv, R // Lq, Lq, Lk).masked_fill(~allowed[:, :, None], float("-inf"))
    return s5.view(B, Hkv, R, Lk)


def merge(q, out_p, lse_p, out_r, lse_r):
    """Combine two parts by their natural-log lse (either may be -inf: a part with no visible key)."""
    lse = torch.logaddexp(lse_p, lse_r)
    safe = no_inf(lse)
    out = torch.exp(lse_p - safe)[..., None] * out_p + torch.exp(lse_r - safe)[..., None] * out_r
    return bhld_like(q).copy_(out), lse  # the package's output layout (_core.layout)
