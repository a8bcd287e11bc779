"""Launcher of the shared-prefix decode kernels: splits, grids, block sizes, allocation.

Inputs arrive checked by _core.problem (and 1 <= Lq <= 16 by the decode path). Any
strides are accepted. One decode step is at most three launches (see kernels/decode.py):

  prefix   grid (row blocks, Hkv, prefix splits)   each prefix tile read once per BLOCK_M
                                                    stacked rows of all requests sharing it
  own      grid (B * Hkv, own splits, row blocks)   flash-decoding over each request's cache
  merge    grid (B * Hq * Lq,)                      log-sum-exp merge of all partials

With fuse_merge (_core.config.FUSE_MERGE, on by default) and one own split, the common case at
serving batch sizes, where B * Hkv * row blocks programs already fill the GPU, there is no merge
launch: the own kernel (MERGE) merges each row's in-register state with the prefix partials the
prefix launch wrote before it on the stream, and writes out and lse itself (merge_in_own). The
own partial is then neither written nor read back. With several own splits, or a row block too
large to merge in registers (tiles.merge_fits), the three launches stay (merge_in_own says why).

With fuse_parts the prefix and own grids run as one launch whose program ids alternate between
the two parts (decode_parts_kernel), so that the compute-bound prefix programs of a large batch
can overlap the memory-bound own-cache programs (benchmarks/NOTES.md, "A compute floor too"),
followed by the merge launch. By default (_core.config.FUSE_PARTS "auto") where a model of the
GPU says running the parts one after the other would cost 1.25x or more; not timed on a GPU yet.

The partials are fp32 (B * Hq * Lq, S, D) and (B * Hq * Lq, S) with S = prefix splits + own
splits (prefix splits alone when the own kernel merges); tiles.split_caps keeps all of them
(written and read back) within a tenth of the bytes the step reads.
"""

from __future__ import annotations

import torch
import triton

from . import tiles
from ..._core import config
from ..._core.grouping import row_block_starts, sorted_by_prefix
from ..._core.layout import bhld
from .train import LOG2E, mask_args, precision
from .kernels.decode import decode_merge_kernel, decode_own_kernel, decode_parts_kernel, decode_prefix_kernel


def merge_in_own(fuse_parts: bool, fuse_merge: bool, o_splits: int, fits: bool) -> bool:
    """Whether the own kernel merges (MERGE) instead of a merge launch: fuse_merge on, the parts
    in separate launches, exactly one own split (o_splits == 0: no own key, nothing to fuse), and
    a tile whose merge fits in registers (fits: tiles.merge_fits).

    Why not with fuse_parts: the prefix programs then share the own programs' grid, so a prefix
    partial may not be written yet when an own program finishes. Why not with several own
    splits: the split to finish last would have to merge, which needs a per-row counter (an
    atomic) and memory ordering between programs (fences) that nothing here can check without a
    GPU (the interpreter runs programs one after the other); the merge launch orders them instead.
    """
    return fuse_merge and not fuse_parts and o_splits == 1 and fits


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal: bool, scale: float,
            fuse_parts: bool | None = None, prefix_mask=None, fuse_merge: bool | None = None):
    """Returns out (B, Hq, Lq, D) in q's dtype (a (B, Lq, Hq, D) tensor transposed, as
    _core.layout) and the natural-log lse (B, Hq, Lq) float32.

    prefix_mask: (G, P) bool, the prefix keys each prefix's rows may see (None: all); a row
    that sees no key at all gets out 0 and lse -inf.

    fuse_parts: run the prefix and own parts as one launch (None: _core.config.fuse_parts). Same splits,
    same partials, same merge: the result is bit-identical either way.

    fuse_merge: with one own split (of a row block that fits), merge in the own kernel instead of
    a merge launch (None: _core.config.FUSE_MERGE["triton"]; merge_in_own). Same arithmetic: the result differs from
    the merge launch's by fp32 rounding only."""
    if fuse_parts is None:
        fuse_parts = config.fuse_parts("triton", q, k.shape[2], prefix_k.shape[2], prefix_k.shape[0], k.shape[1])
    if fuse_merge is None:
        fuse_merge = config.FUSE_MERGE["triton"]
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    T = k.shape[2]
    group = Hq // Hkv
    R = group * Lq
    dev = q.device
    out = bhld(B, Hq, Lq, D, q)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=dev)

    has_pidx = prefix_index is not None
    blk = tiles.decode_blocks(D, R, q.dtype, dev, has_pidx=has_pidx, Lq=Lq)
    sm = tiles.sm_count(dev) if tiles.on_gpu(dev) else None
    BLOCK_D = max(16, triton.next_power_of_2(D))
    precision_ = precision(q.dtype)
    qk_scale = scale * LOG2E

    # Prefix part: row blocks over the stacked rows of each prefix's requests.
    if has_pidx:
        # Each prefix's rows start a fresh block: at most one partial block per prefix in use.
        row_blocks = triton.cdiv(B * R, blk.prefix_m) + min(G, B)
    else:
        row_blocks = triton.cdiv(B * R, blk.prefix_m)
    # Traffic caps: every split's fp32 partials (B * Hq * Lq rows of D + 1, written then read
    # back by the merge) together weigh at most tiles.PARTIAL_SHARE of the bytes the step reads,
    # shared between the parts by their keys.
    rows = B * Hq * Lq
    kv_item = q.element_size()
    prefixes_read = min(G, B) if has_pidx else 1
    step_bytes = 2 * (prefixes_read * Hkv * P + B * Hkv * T) * D * kv_item + 2 * rows * D * kv_item
    p_cap, o_cap = tiles.split_caps(step_bytes, rows, D, P, T)
    p_splits = tiles.choose_splits(row_blocks * Hkv, P, blk.prefix_n, sm, p_cap)
    p_per, p_splits = tiles.keys_per_split(P, p_splits, blk.prefix_n)

    # Own part: one program per (request, kv head, row block), split along the keys.
    own_row_blocks = triton.cdiv(R, blk.own_m)
    o_splits = tiles.choose_splits(B * Hkv * own_row_blocks, T, blk.own_n, sm, o_cap)
    o_per, o_splits = tiles.keys_per_split(T, o_splits, blk.own_n)

    if p_splits + o_splits == 0:  # no key at all (P == 0 and T == 0): every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    merge = merge_in_own(fuse_parts, fuse_merge, o_splits, tiles.merge_fits(blk.own_m, BLOCK_D, blk.warps, dev))
    S = p_splits if merge else p_splits + o_splits  # partial slots per row
    part_out = torch.empty((rows, S, D), dtype=torch.float32, device=dev)
    part_lse = torch.empty((rows, S), dtype=torch.float32, device=dev)

    if p_splits > 0 and has_pidx:
        order, starts = sorted_by_prefix(prefix_index, B, G, dev)
        bstarts = row_block_starts(starts, R, blk.prefix_m, G)
    else:
        order = starts = bstarts = q  # unused (HAS_PIDX=False, or no prefix key)
    kvm, smb, smn = mask_args(kv_mask, q)
    pm, spmg, spmn = mask_args(prefix_mask, q)
    has_pm = prefix_mask is not None
    wide = tiles.needs_wide_rows((P, prefix_k.stride(2)), (P, prefix_v.stride(2)), (T, k.stride(2)), (T, v.stride(2)))
    n_prefix = row_blocks * Hkv * p_splits
    n_own = B * Hkv * o_splits * own_row_blocks
    if fuse_parts and n_prefix > 0 and n_own > 0:
        decode_parts_kernel[(n_prefix + n_own,)](
            q, k, v, kvm, prefix_k, prefix_v, pm, order, starts, bstarts, part_out, part_lse,
            *q.stride(), *k.stride(), *v.stride(), smb, smn, *prefix_k.stride(), *prefix_v.stride(), spmg, spmn,
            B, Hq, Hkv, Lq, T, P, group, G, qk_scale, p_per, o_per, p_splits, S,
            G.bit_length(), row_blocks, n_prefix, n_own, B * Hkv, o_splits,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, P_BLOCK_M=blk.prefix_m, P_BLOCK_N=blk.prefix_n,
            O_BLOCK_M=blk.own_m, O_BLOCK_N=blk.own_n, HAS_PIDX=has_pidx, HAS_KV_MASK=kv_mask is not None,
            CAUSAL=bool(causal), PRECISION=precision_, HAS_PREFIX_MASK=has_pm, WIDE=wide,
            num_warps=blk.warps, num_stages=blk.stages,
        )
    else:
        if n_prefix > 0:
            decode_prefix_kernel[(row_blocks, Hkv, p_splits)](
                q, prefix_k, prefix_v, pm, order, starts, bstarts, part_out, part_lse,
                *q.stride(), *prefix_k.stride(), *prefix_v.stride(), spmg, spmn,
                B, Hq, Lq, P, group, G, qk_scale, p_per, 0, S, G.bit_length(),
                HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=blk.prefix_m, BLOCK_N=blk.prefix_n,
                HAS_PIDX=has_pidx, PRECISION=precision_, HAS_PREFIX_MASK=has_pm, WIDE=wide,
                num_warps=blk.warps, num_stages=blk.stages,
            )
        if n_own > 0:
            # With MERGE this launch comes after the prefix launch on the same stream: every
            # prefix partial it reads is written.
            decode_own_kernel[(B * Hkv, o_splits, own_row_blocks)](
                q, k, v, kvm, part_out, part_lse, out, lse,
                *q.stride(), *k.stride(), *v.stride(), smb, smn, *out.stride(),
                Hq, Hkv, Lq, T, group, qk_scale, o_per, p_splits, S,
                HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=blk.own_m, BLOCK_N=blk.own_n,
                HAS_KV_MASK=kv_mask is not None, CAUSAL=bool(causal), PRECISION=precision_, WIDE=wide,
                MERGE=merge, num_warps=blk.warps, num_stages=blk.stages,
            )
    if merge:
        return out, lse
    block_s = min(16, triton.next_power_of_2(S))
    decode_merge_kernel[(rows,)](
        part_out, part_lse, out, lse, Hq, Lq, S, *out.stride(),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=block_s, num_warps=4 if BLOCK_D * block_s >= 2048 else 2,
    )
    return out, lse
