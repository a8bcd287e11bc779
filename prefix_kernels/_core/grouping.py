"""Requests grouped by the prefix they use: the one definition every backend shares.

Two forms, for the two kinds of consumer:
- `sorted_by_prefix`: (order, starts) on the device, built with no host sync (a stable sort,
  then each prefix's first position by binary search; a bincount would read the maximum back to
  size its output). order[starts[g]:starts[g+1]] are the requests using prefix g, in batch order.
  The Triton kernels take these.
- `prefix_groups`: [(g, rows)] on the host, one entry per prefix in use, for code that loops
  over prefixes in Python (the torch split path). One device sync.
"""

from __future__ import annotations

from typing import Optional

import torch


def sorted_by_prefix(prefix_index: Optional[torch.Tensor], B: int, G: int, device) -> tuple:
    """(order (B,) int32, starts (G + 1,) int32) on `device`. prefix_index None: all B requests
    use prefix 0 (prefixes 1..G-1 have no request)."""
    if prefix_index is None:
        starts = torch.full((G + 1,), B, dtype=torch.int32, device=device)
        starts[0] = 0
        return torch.arange(B, dtype=torch.int32, device=device), starts
    sorted_index, order = torch.sort(prefix_index.long(), stable=True)
    bounds = torch.arange(G + 1, dtype=torch.long, device=prefix_index.device)
    return order.to(torch.int32), torch.searchsorted(sorted_index, bounds).to(torch.int32)


def prefix_groups(prefix_index: Optional[torch.Tensor]) -> list:
    """[(g, rows)] for every prefix in use, g ascending; rows None means all requests (a single
    prefix in use: no gather needed), else a (n_g,) long tensor of request indices."""
    if prefix_index is None:
        return [(0, None)]
    used = torch.unique(prefix_index).tolist()  # one device sync
    if len(used) == 1:
        return [(used[0], None)]
    return [(g, torch.nonzero(prefix_index == g).flatten()) for g in used]


def row_block_starts(starts, R: int, block_m: int, G: int):
    """(G + 1,) int32: the first row block of each prefix's stacked rows, when each request has R
    rows and each prefix's rows start a fresh block of block_m (the decode kernels' prefix grid).
    No host sync."""
    counts = (starts[1:] - starts[:-1]).long()
    blocks = torch.div(counts * R + block_m - 1, block_m, rounding_mode="floor")
    bstarts = torch.zeros(G + 1, dtype=torch.int32, device=starts.device)
    bstarts[1:] = torch.cumsum(blocks, 0)
    return bstarts
