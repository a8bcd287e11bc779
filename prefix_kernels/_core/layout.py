"""The one memory layout of every (B, H, L, D) tensor the package returns.

Outputs and the gradients of q, k and v are (B, H, L, D) tensors whose memory is (B, L, H, D):
transformers' q, k and v are views of the projections' (B, L, H * D) outputs, and it transposes
attention outputs back to (B, L, H, D) and reshapes them to (B, L, H * D). In this layout that
reshape is free, and the gradients flow back into the projections without a copy, where a
contiguous (B, H, L, D) tensor is copied by the view's backward. The fake implementations of the
custom ops state this layout exactly, for torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bhld(B: int, H: int, L: int, D: int, like: Tensor, *, dtype=None, zero: bool = False) -> Tensor:
    """An empty (or zero) (B, H, L, D) tensor whose memory is (B, L, H, D), on `like`'s device and
    in its dtype unless `dtype` is given."""
    alloc = torch.zeros if zero else torch.empty
    return alloc((B, L, H, D), dtype=like.dtype if dtype is None else dtype, device=like.device).transpose(1, 2)


def bhld_like(x: Tensor, *, zero: bool = False) -> Tensor:
    """bhld with x's shape, dtype and device."""
    return bhld(*x.shape, like=x, zero=zero)


def in_bhld(x: Tensor) -> Tensor:
    """x itself when its memory is already (B, L, H, D), else a copy into that layout."""
    if x.transpose(1, 2).is_contiguous():
        return x
    return bhld_like(x).copy_(x)
