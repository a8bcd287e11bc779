"""Launcher of the shared-prefix decode kernels: splits, grids, block sizes, allocation.

Inputs arrive checked by prefix_kernels.checks (and 1 <= Lq <= 16 by the dispatcher). Any
strides are accepted. One decode step is three launches (see kernels/decode.py):

  prefix   grid (row blocks, Hkv, prefix splits)   each prefix tile read once per BLOCK_M
                                                    stacked rows of all requests sharing it
  own      grid (B * Hkv, own splits, row blocks)   flash-decoding over each request's cache
  merge    grid (B * Hq * Lq,)                      log-sum-exp merge of all partials

With fuse_parts the prefix and own grids run as one launch whose program ids alternate between
the two parts (decode_parts_kernel), so that the compute-bound prefix programs of a large batch
can overlap the memory-bound own-cache programs (benchmarks/NOTES.md, "A compute floor too").
Off by default (FUSE_PARTS): it has not been timed on a GPU yet.

The partials are fp32 (B * Hq * Lq, S, D) and (B * Hq * Lq, S) with S = prefix splits + own
splits; choose_splits keeps each part's partials no heavier than the keys and values it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .attention import LOG2E, _blocks, _mask_args, _on_gpu, _precision, _sm_count
from .kernels.decode import decode_merge_kernel, decode_own_kernel, decode_parts_kernel, decode_prefix_kernel

# Splits on a CPU (the interpreter): fixed and small, so that the tests exercise the split and
# merge path (and splits that see only padding) at tiny sizes.
CPU_SPLITS = 2
# Fewest keys a split should hold on a GPU: below this the split's fixed costs (loading q,
# writing its partial) outweigh the keys it reads.
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64
# Default of forward(fuse_parts=None). False until a GPU run shows the fused launch faster
# (bench_decode.py's prefix_kernels_triton_fused provider times it beside the default).
FUSE_PARTS = False


@dataclass(frozen=True)
class DecodeBlocks:
    prefix_m: int  # stacked rows per prefix program
    prefix_n: int  # prefix keys per tile
    own_m: int  # rows (group * Lq, padded) per own-cache program
    own_n: int  # own keys per tile
    warps: int
    stages: int


def _decode_blocks(D: int, R: int, dtype: torch.dtype, device: torch.device) -> DecodeBlocks:
    """Tile sizes. The prefix program has the forward kernel's shape (BLOCK_M stacked rows
    against BLOCK_N keys), so it takes the forward's tiles; the own-cache program takes the
    group * Lq rows of one request and kv head, padded to tl.dot's minimum of 16 and capped at
    the forward's BLOCK_M. Not autotuned: no GPU was at hand when these were set.
    Under the interpreter 16-row blocks and 32-key tiles make the test shapes cross several row
    blocks and tiles."""
    if not _on_gpu(device):
        return DecodeBlocks(16, 32, max(16, min(32, triton.next_power_of_2(R))), 32, 1, 1)
    fwd = _blocks(D, dtype, device, backward=False)
    own_m = max(16, min(fwd.m, triton.next_power_of_2(R)))
    return DecodeBlocks(fwd.m, fwd.n, own_m, fwd.n, fwd.warps, fwd.stages)


def choose_splits(programs: int, keys: int, block_n: int, sm_count: int | None, traffic_cap: int) -> int:
    """How many key splits give `programs` (the grid without splits) about two waves of work.

    sm_count None (CPU, the interpreter): CPU_SPLITS. On a GPU a split holds a whole number of
    tiles and at least MIN_KEYS_PER_SPLIT keys, and there are at most `traffic_cap` splits: the
    number for which the fp32 partials written (and read back by the merge) weigh as much as
    the keys and values the part reads. Without that cap a short prefix shared by a large batch
    (B = 64, Hq = 32, P = 1024) would be split 8 ways and its partials would move 4x the bytes
    of the prefix itself.
    """
    tiles = triton.cdiv(keys, block_n)
    if keys == 0:
        return 0
    if sm_count is None:
        return min(CPU_SPLITS, tiles)
    want = triton.cdiv(2 * sm_count, max(1, programs))
    most = min(tiles, triton.cdiv(keys, MIN_KEYS_PER_SPLIT), MAX_SPLITS, traffic_cap)
    return max(1, min(want, most))


def _keys_per_split(keys: int, splits: int, block_n: int) -> tuple[int, int]:
    """(keys per split, a multiple of block_n; the number of non-empty splits)."""
    if splits == 0:
        return block_n, 0
    per = triton.cdiv(triton.cdiv(keys, block_n), splits) * block_n
    return per, triton.cdiv(keys, per)


def _requests_by_prefix(prefix_index, G: int):
    """(order, starts) int32: order[starts[g]:starts[g+1]] are the requests using prefix g, in
    batch order. Unlike a bincount (whose CUDA version reads the maximum back to the host),
    sort + searchsorted never waits for the GPU: a decode step runs it in every layer."""
    sorted_index, order = torch.sort(prefix_index.long(), stable=True)
    bounds = torch.arange(G + 1, dtype=torch.long, device=prefix_index.device)
    return order.to(torch.int32), torch.searchsorted(sorted_index, bounds).to(torch.int32)


def _block_starts(starts, R: int, block_m: int, G: int):
    """BSTARTS (G + 1,) int32: the first row block of each prefix's stacked rows; no host sync."""
    counts = (starts[1:] - starts[:-1]).long()
    blocks = torch.div(counts * R + block_m - 1, block_m, rounding_mode="floor")
    bstarts = torch.zeros(G + 1, dtype=torch.int32, device=starts.device)
    bstarts[1:] = torch.cumsum(blocks, 0)
    return bstarts


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal: bool, scale: float,
            fuse_parts: bool | None = None):
    """Returns out (B, Hq, Lq, D) in q's dtype (a (B, Lq, Hq, D) tensor transposed, as
    ops.out_layout) and the natural-log lse (B, Hq, Lq) float32.

    fuse_parts: run the prefix and own parts as one launch (None: FUSE_PARTS). Same splits,
    same partials, same merge: the result is bit-identical either way."""
    if fuse_parts is None:
        fuse_parts = FUSE_PARTS
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    T = k.shape[2]
    group = Hq // Hkv
    R = group * Lq
    dev = q.device
    out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=dev)

    blk = _decode_blocks(D, R, q.dtype, dev)
    sm = _sm_count(dev) if _on_gpu(dev) else None
    BLOCK_D = max(16, triton.next_power_of_2(D))
    precision = _precision(q.dtype)
    qk_scale = scale * LOG2E

    # Prefix part: row blocks over the stacked rows of each prefix's requests.
    has_pidx = prefix_index is not None
    if has_pidx:
        # Each prefix's rows start a fresh block: at most one partial block per prefix in use.
        row_blocks = triton.cdiv(B * R, blk.prefix_m) + min(G, B)
    else:
        row_blocks = triton.cdiv(B * R, blk.prefix_m)
    # Traffic caps: the K and V bytes a part reads over the bytes of one split's fp32 partials
    # (B * Hq * Lq rows of D).
    rows = B * Hq * Lq
    kv_item, part_item = q.element_size(), 4
    prefixes_read = min(G, B) if has_pidx else 1
    p_cap = (2 * prefixes_read * Hkv * P * D * kv_item) // (rows * D * part_item)
    p_splits = choose_splits(row_blocks * Hkv, P, blk.prefix_n, sm, p_cap)
    p_per, p_splits = _keys_per_split(P, p_splits, blk.prefix_n)

    # Own part: one program per (request, kv head, row block), split along the keys.
    own_row_blocks = triton.cdiv(R, blk.own_m)
    o_cap = (2 * B * Hkv * T * D * kv_item) // (rows * D * part_item)
    o_splits = choose_splits(B * Hkv * own_row_blocks, T, blk.own_n, sm, o_cap)
    o_per, o_splits = _keys_per_split(T, o_splits, blk.own_n)

    S = p_splits + o_splits
    if S == 0:  # no key at all (P == 0 and T == 0): every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    part_out = torch.empty((rows, S, D), dtype=torch.float32, device=dev)
    part_lse = torch.empty((rows, S), dtype=torch.float32, device=dev)

    if p_splits > 0 and has_pidx:
        order, starts = _requests_by_prefix(prefix_index, G)
        bstarts = _block_starts(starts, R, blk.prefix_m, G)
    else:
        order = starts = bstarts = q  # unused (HAS_PIDX=False, or no prefix key)
    kvm, smb, smn = _mask_args(kv_mask, q)
    n_prefix = row_blocks * Hkv * p_splits
    n_own = B * Hkv * o_splits * own_row_blocks
    if fuse_parts and n_prefix > 0 and n_own > 0:
        decode_parts_kernel[(n_prefix + n_own,)](
            q, k, v, kvm, prefix_k, prefix_v, order, starts, bstarts, part_out, part_lse,
            *q.stride(), *k.stride(), *v.stride(), smb, smn, *prefix_k.stride(), *prefix_v.stride(),
            B, Hq, Hkv, Lq, T, P, group, G, qk_scale, p_per, o_per, p_splits, S,
            G.bit_length(), row_blocks, n_prefix, n_own, B * Hkv, o_splits,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, P_BLOCK_M=blk.prefix_m, P_BLOCK_N=blk.prefix_n,
            O_BLOCK_M=blk.own_m, O_BLOCK_N=blk.own_n, HAS_PIDX=has_pidx, HAS_KV_MASK=kv_mask is not None,
            CAUSAL=bool(causal), PRECISION=precision, num_warps=blk.warps, num_stages=blk.stages,
        )
    else:
        if n_prefix > 0:
            decode_prefix_kernel[(row_blocks, Hkv, p_splits)](
                q, prefix_k, prefix_v, order, starts, bstarts, part_out, part_lse,
                *q.stride(), *prefix_k.stride(), *prefix_v.stride(),
                B, Hq, Lq, P, group, G, qk_scale, p_per, 0, S, G.bit_length(),
                HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=blk.prefix_m, BLOCK_N=blk.prefix_n,
                HAS_PIDX=has_pidx, PRECISION=precision, num_warps=blk.warps, num_stages=blk.stages,
            )
        if n_own > 0:
            decode_own_kernel[(B * Hkv, o_splits, own_row_blocks)](
                q, k, v, kvm, part_out, part_lse,
                *q.stride(), *k.stride(), *v.stride(), smb, smn,
                Hq, Hkv, Lq, T, group, qk_scale, o_per, p_splits, S,
                HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=blk.own_m, BLOCK_N=blk.own_n,
                HAS_KV_MASK=kv_mask is not None, CAUSAL=bool(causal), PRECISION=precision,
                num_warps=blk.warps, num_stages=blk.stages,
            )
    block_s = min(16, triton.next_power_of_2(S))
    decode_merge_kernel[(rows,)](
        part_out, part_lse, out, lse, Hq, Lq, S, *out.stride(),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=block_s, num_warps=4 if BLOCK_D * block_s >= 2048 else 2,
    )
    return out, lse
