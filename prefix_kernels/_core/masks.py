"""Which of a request's own keys each of its queries may attend."""

from __future__ import annotations

import torch


def visible_keys(B: int, Lq: int, Lk: int, kv_mask, causal: bool, device) -> torch.Tensor:
    """(B, 1, Lq, Lk) bool: which per-request keys each query may attend.

    Causal is aligned to the bottom right: query i sees key j iff j <= i + (Lk - Lq). kv_mask
    (B, Lk) bool, or None, removes padding keys. (B may be 1 when kv_mask is None.)
    """
    allowed = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        allowed = allowed & (j <= i + (Lk - Lq))
    if kv_mask is not None:
        allowed = allowed & kv_mask[:, None, None, :].bool()
    return allowed
