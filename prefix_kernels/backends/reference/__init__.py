"""Materialising reference: every request gets its own copy of its prefix.

This is what PEFT on transformers does today (expand the prefix to batch size, concatenate,
build a mask, softmax). It is the ground truth for the tests and the ``"reference"`` backend,
never a production path: it allocates (B, Hq, P + Lk, D) keys and values and (B, Hq, Lq, P + Lk)
scores.
"""

from __future__ import annotations

import math

import torch

from ..._core.masks import visible_keys
from ..base import Backend


def reference_attention(
    q, k, v, prefix_k, prefix_v, *, prefix_index=None, kv_mask=None, causal=True, scale=None, prefix_mask=None,
    compute_dtype=torch.float32,
):
    """Shared-prefix attention computed the slow, obvious way, differentiably.

    Shapes as in :func:`prefix_kernels.shared_prefix_attention`. Returns ``(out, lse)``, both in
    ``compute_dtype``: out (B, Hq, Lq, D) and lse (B, Hq, Lq), the natural-log log-sum-exp of the
    scaled scores over the visible keys (-inf for a row that sees no key, whose output is 0).
    """
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if prefix_index is None:
        prefix_index = torch.zeros(B, dtype=torch.long, device=q.device)
    prefix_index = prefix_index.long()
    group = Hq // Hkv

    def per_query_head(x):  # (B, Hkv, L, D) -> (B, Hq, L, D), transformers' repeat_kv
        return x.repeat_interleave(group, dim=1)

    keys = torch.cat([prefix_k[prefix_index], k], dim=2).to(compute_dtype)
    values = torch.cat([prefix_v[prefix_index], v], dim=2).to(compute_dtype)
    keys, values = per_query_head(keys), per_query_head(values)
    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale

    allowed = torch.cat(
        [
            torch.ones(B, 1, Lq, P, dtype=torch.bool, device=q.device) if prefix_mask is None
            else prefix_mask[prefix_index][:, None, None, :].expand(B, 1, Lq, P),
            visible_keys(B, Lq, Lk, kv_mask, causal, q.device),
        ],
        dim=-1,
    )
    # A row that sees no key has lse = -inf and output 0. Its scores are zeroed before the
    # logsumexp (whose gradient would be exp(-inf - -inf) = NaN) and its probabilities are
    # exp(-inf - +inf) = 0, so no NaN reaches the output or any gradient.
    empty = ~allowed.any(dim=-1)  # (B, 1, Lq)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(empty[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(empty, torch.inf, lse)[..., None])
    lse = lse.masked_fill(empty, float("-inf"))
    out = torch.matmul(probs, values)
    return out, lse


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask=None):
    """The backend's forward, differentiable by autograd: out in q's dtype, lse float32."""
    out, lse = reference_attention(q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, kv_mask=kv_mask,
                                   causal=causal, scale=scale, prefix_mask=prefix_mask)
    return out.to(q.dtype), lse.float()


def _function(kind: str):
    return forward  # the same computation for training and decode; autograd does the backward


NAME = "reference"
BACKEND = Backend(NAME, NAME, function=_function, train_reasons=lambda p: [], decode_reasons=lambda p: [],
                  differentiable=True)
