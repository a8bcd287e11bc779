"""Decode kernels of shared-prefix attention (only @triton.jit code).

A decode step (Lq = 1..16 new tokens per request) is split in three launches:

  decode_prefix_kernel  the prefix part. For prefix g and kv head hk, the query rows of every
                        request that uses g, times the `group` query heads of hk, times Lq, are
                        one stacked matrix (requests in the order ORDER[STARTS[g]:STARTS[g+1]]).
                        A program owns BLOCK_M stacked rows and one split of the prefix keys, so
                        each prefix tile is read once per BLOCK_M stacked rows, not once per
                        request and query head.
  decode_own_kernel     each request's own cache, split along the keys (flash-decoding): one
                        program per (request b, kv head hk, key split, row block) takes all
                        group * Lq rows of b and hk, so the GQA heads share each K/V tile.
  decode_merge_kernel   combines the partial (out, lse) of every split by log-sum-exp.

decode_parts_kernel runs the first two as one launch, their programs interleaved (the launcher's
fuse_parts; see its docstring for why). decode_own_kernel with MERGE does the merge itself when
the own part has one split and the prefix kernel ran before it on the stream: each program merges
its rows' in-register state with their prefix partials and writes the final out and lse, so the
own partial and the merge launch are not needed (the launcher's merge_in_own says when).

With HAS_PREFIX_MASK, prefix_mask's row g hides prefix keys in the prefix part as kv_mask hides
own keys in the own part (the hidden keys are not loaded).

Inside a split, scores are in log2 units (scale * log2(e) folded into one multiply, exp2 does the
work), as in the forward kernel. Every partial lse written to memory, and the final lse, is in
natural log; a split that sees no key writes out = 0 and lse = -inf.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # natural log = log2 * ln(2)


@triton.jit
def _softmax_tiles(acc, m_i, l_i, q, K_BASE, V_BASE, skn, skd, svn, svd, lo, hi,
                   row_ok, row_i, offs_d, MASK_BASE, stride_mask, q_shift, qk_scale,
                   CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """Online softmax of the rows in q over the keys [lo, hi) of one (L, HEAD_DIM) segment.

    A key is visible when it lies in [lo, hi), is not masked out by kv_mask (HAS_KV_MASK) and,
    with CAUSAL, is not after the row's query position row_i shifted by q_shift. Keys that
    kv_mask hides are not loaded at all (their lanes are predicated off), so the padding of a
    left-padded cache costs no memory traffic.
    """
    d_ok = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        if HAS_KV_MASK:
            keep = tl.load(MASK_BASE + offs_n * stride_mask, mask=key_ok, other=0)
            key_ok = key_ok & (keep != 0)
        ld_mask = key_ok[:, None] & d_ok[None, :]
        if WIDE:  # row offsets past 2**31 (a long cache): 64-bit, at the cost of registers
            rows = offs_n.to(tl.int64)[:, None]
        else:
            rows = offs_n[:, None]
        k = tl.load(K_BASE + rows * skn + offs_d[None, :] * skd, mask=ld_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= row_i[:, None] + q_shift)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; exponentiate against 0 instead, so that
        # exp2(-inf - -inf) never produces a NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_BASE + rows * svn + offs_d[None, :] * svd, mask=ld_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _split_softmax(Q_ROWS, sqd, K_BASE, V_BASE, skn, skd, svn, svd, lo, hi,
                   row_ok, row_i, offs_d, MASK_BASE, stride_mask, q_shift, qk_scale,
                   CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """One split of either part: load the rows' queries (Q_ROWS: a pointer per row), then the
    online softmax over keys [lo, hi) from an empty state. Returns (acc, m_i, l_i)."""
    q = tl.load(Q_ROWS[:, None] + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    return _softmax_tiles(acc, m_i, l_i, q, K_BASE, V_BASE, skn, skd, svn, svd, lo, hi,
                          row_ok, row_i, offs_d, MASK_BASE, stride_mask, q_shift, qk_scale,
                          CAUSAL, HAS_KV_MASK, HEAD_DIM, BLOCK_N, PRECISION, WIDE)


@triton.jit
def _normalised(acc, m_i, l_i):
    """A split's state (acc, m_i in log2 units, l_i) as its partial: (out = acc / l_i, natural-log
    lse). A row with nothing visible in the split gets out 0 and lse -inf, so a merge weighs it 0."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    return out, lse


@triton.jit
def _store_partial(OP, LP, row_id, slot, S_total, acc, m_i, l_i, row_ok, offs_d, HEAD_DIM: tl.constexpr):
    """Write one split's normalised partial out (fp32) and natural-log lse for each row.

    OP is a contiguous (rows, S_total, HEAD_DIM) fp32 buffer, LP a (rows, S_total) one; row_id
    is the row's index (b * Hq + h) * Lq + i (int64), slot the split's index in [0, S_total).
    """
    out, lse = _normalised(acc, m_i, l_i)
    cell = row_id * S_total + slot
    o_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(OP + cell[:, None] * HEAD_DIM + offs_d[None, :], out, mask=o_mask)
    tl.store(LP + cell, lse, mask=row_ok)


@triton.jit
def _store_merged(OP, LP, O, LSE, row_id, out_rows, sod, S_total, acc, m_i, l_i, row_ok, offs_d,
                  HEAD_DIM: tl.constexpr):
    """Merge one split's state (acc, m_i in log2 units, l_i: the own part's only split) with the
    S_total partials already in OP, LP for each row, and write the final out and lse.

    The arithmetic of decode_merge_kernel, with this split's partial taken from registers instead
    of memory: out = sum_s exp(lse_s - m) out_s / sum_s exp(lse_s - m), lse = m + log(sum ...),
    m the largest lse_s, in a fixed order (this split, then slots 0..S_total-1: deterministic).
    A split that sees no key (lse -inf) weighs exactly 0; a row that sees none at all gets out 0
    and lse -inf, with no NaN. OP, LP: as in _store_partial (natural-log lse); out_rows: the
    pointer of each row's output in O (q's dtype, any strides; sod along D); LSE: (rows,) fp32.
    """
    d_ok = offs_d < HEAD_DIM
    own_out, own_lse = _normalised(acc, m_i, l_i)
    cells = row_id * S_total
    # Two passes as in decode_merge_kernel: the largest lse first (lse loads only), so that no
    # weight exceeds 1 and the sums need no rescaling.
    m = own_lse
    for s in range(0, S_total):
        m = tl.maximum(m, tl.load(LP + cells + s, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # exp(-inf - -inf) would be NaN
    w = tl.exp(own_lse - m_safe)
    acc = own_out * w[:, None]
    den = w
    for s in range(0, S_total):
        w = tl.exp(tl.load(LP + cells + s, mask=row_ok, other=float("-inf")) - m_safe)
        o = tl.load(OP + (cells + s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # One fma, not acc += w * o: written as a product then a sum, Triton computed the
        # product in the score tile's layout (w's) and converted it to acc's, two conversions of
        # a (BLOCK_M, BLOCK_D) fp32 tile that spilled at 64 x 256 on sm_90; the fma converts o alone.
        acc = tl.fma(o, w[:, None], acc)
        den += w
    empty = den == 0.0
    out = acc / tl.where(empty, 1.0, den)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, den)))
    tl.store(out_rows[:, None] + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + row_id, lse, mask=row_ok)


@triton.jit
def _prefix_program(
    t, hk, split, Q, PK, PV, PM, ORDER, STARTS, BSTARTS, OP, LP,
    sqb, sqh, sqm, sqd,
    spkg, spkh, spkn, spkd,
    spvg, spvh, spvn, spvd,
    spmg, spmn,
    B, Hq, Lq, P, group, G, qk_scale, keys_per_split, slot0, S_total, search_steps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PIDX: tl.constexpr, PRECISION: tl.constexpr, HAS_PREFIX_MASK: tl.constexpr, WIDE: tl.constexpr,
):
    """The prefix part's program (t: row block, int64; hk: kv head, int64; split).

    HAS_PIDX: requests are sorted by prefix (ORDER, STARTS as in the backward's prefix kernel)
    and BSTARTS[g] is the first row block of prefix g (BSTARTS[G]: their total). A program finds
    its prefix by binary search over BSTARTS; the launcher's grid is an upper bound on the total,
    so surplus programs find no rows and do nothing. Without HAS_PIDX every request uses prefix 0
    in batch order. HAS_PREFIX_MASK: PM (uint8 (G, P), strides spmg, spmn) masks prefix g's keys.
    """
    R = group * Lq  # stacked rows per request
    if HAS_PIDX:
        lo_g = t * 0  # the largest g in [0, G) with BSTARTS[g] <= t
        hi_g = lo_g + G
        for _ in range(0, search_steps):
            mid = (lo_g + hi_g) // 2
            go = tl.load(BSTARTS + mid) <= t
            lo_g = tl.where(go, mid, lo_g)
            hi_g = tl.where(go, hi_g, mid)
        g = lo_g
        active = t < tl.load(BSTARTS + G)
        local = t - tl.load(BSTARTS + g)
        first = tl.load(STARTS + g)
        n_req = tl.load(STARTS + g + 1) - first
    else:
        g = 0
        active = t >= 0
        local = t
        first = 0
        n_req = B

    offs_r = local * BLOCK_M + tl.arange(0, BLOCK_M)  # stacked row within prefix g and head hk
    # (Not `& active`: the interpreter of triton 3.9 turns a block & a scalar bool into int32.)
    row_ok = offs_r < tl.where(active, n_req * R, 0)
    pos = offs_r // R  # which of g's requests
    within = offs_r % R
    j = within // Lq  # query head within the kv group
    row_i = within % Lq  # query position
    if HAS_PIDX:
        b = tl.load(ORDER + first + pos, mask=row_ok, other=0).to(tl.int64)
    else:
        b = pos
    h = hk * group + j
    offs_d = tl.arange(0, BLOCK_D)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, P)
    hi = tl.where(active, hi, lo)  # a surplus program loads nothing
    acc, m_i, l_i = _split_softmax(
        Q + b * sqb + h * sqh + row_i * sqm, sqd,
        PK + g * spkg + hk * spkh, PV + g * spvg + hk * spvh, spkn, spkd, spvn, spvd,
        lo, hi, row_ok, row_i, offs_d, PM + g * spmg, spmn, 0, qk_scale,
        False, HAS_PREFIX_MASK, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, PRECISION, WIDE,
    )
    row_id = (b * Hq + h) * Lq + row_i
    _store_partial(OP, LP, row_id, slot0 + split, S_total, acc, m_i, l_i, row_ok, offs_d, HEAD_DIM)


@triton.jit
def decode_prefix_kernel(
    Q, PK, PV, PM, ORDER, STARTS, BSTARTS, OP, LP,
    sqb, sqh, sqm, sqd,
    spkg, spkh, spkn, spkd,
    spvg, spvh, spvn, spvd,
    spmg, spmn,
    B, Hq, Lq, P, group, G, qk_scale, keys_per_split, slot0, S_total, search_steps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PIDX: tl.constexpr, PRECISION: tl.constexpr, HAS_PREFIX_MASK: tl.constexpr, WIDE: tl.constexpr,
):
    """Grid (row blocks, Hkv, prefix splits); row blocks on axis 0, which has no 65535 limit."""
    _prefix_program(
        tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2),
        Q, PK, PV, PM, ORDER, STARTS, BSTARTS, OP, LP,
        sqb, sqh, sqm, sqd, spkg, spkh, spkn, spkd, spvg, spvh, spvn, spvd, spmg, spmn,
        B, Hq, Lq, P, group, G, qk_scale, keys_per_split, slot0, S_total, search_steps,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_PIDX, PRECISION, HAS_PREFIX_MASK, WIDE,
    )


@triton.jit
def _own_split(
    bk, split, rb, Q, K, V, KVM,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smn,
    Hkv, Lq, T, group, qk_scale, keys_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
):
    """One split of the own part (bk = b * Hkv + hk, int64; split; rb: row block): returns the
    split's state (acc (BLOCK_M, BLOCK_D), m_i in log2 units, l_i) and its rows (b, h, row_i,
    row_ok), which the caller stores as a partial or merges.

    Row r of a program's block is query head hk * group + r // Lq at position r % Lq: the GQA heads
    of one kv head share every K/V tile. Causal is bottom-right aligned: position i sees own key
    j iff j <= i + (T - Lq).
    """
    b = bk // Hkv
    hk = bk % Hkv
    offs_r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < group * Lq
    j = offs_r // Lq
    row_i = offs_r % Lq
    h = hk * group + j
    offs_d = tl.arange(0, BLOCK_D)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, T)
    acc, m_i, l_i = _split_softmax(
        Q + b * sqb + h * sqh + row_i * sqm, sqd,
        K + b * skb + hk * skh, V + b * svb + hk * svh, skn, skd, svn, svd,
        lo, hi, row_ok, row_i, offs_d, KVM + b * smb, smn, T - Lq, qk_scale,
        CAUSAL, HAS_KV_MASK, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, PRECISION, WIDE,
    )
    return acc, m_i, l_i, b, h, row_i, row_ok


@triton.jit
def _own_program(
    bk, split, rb, Q, K, V, KVM, OP, LP,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smn,
    Hq, Hkv, Lq, T, group, qk_scale, keys_per_split, slot0, S_total,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
):
    """The own part's program that writes its split's partial to slot slot0 + split (see _own_split)."""
    acc, m_i, l_i, b, h, row_i, row_ok = _own_split(
        bk, split, rb, Q, K, V, KVM,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
        Hkv, Lq, T, group, qk_scale, keys_per_split,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_KV_MASK, CAUSAL, PRECISION, WIDE,
    )
    row_id = (b * Hq + h) * Lq + row_i
    _store_partial(OP, LP, row_id, slot0 + split, S_total, acc, m_i, l_i, row_ok, tl.arange(0, BLOCK_D), HEAD_DIM)


@triton.jit
def decode_own_kernel(
    Q, K, V, KVM, OP, LP, O, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smn,
    sob, soh, som, sod,
    Hq, Hkv, Lq, T, group, qk_scale, keys_per_split, slot0, S_total,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
    MERGE: tl.constexpr,
):
    """Grid (B * Hkv, key splits, row blocks of group * Lq); B * Hkv on axis 0 (no 65535 limit).

    MERGE False: each split writes its partial to slot slot0 + split of OP, LP (S_total slots);
    O, LSE and their strides are unused. MERGE True (one split, launched after the prefix kernel
    on the same stream, so every prefix partial is written): OP, LP hold the S_total prefix
    partials of each row, and each program writes its rows' merged out to O (q's dtype, strides
    sob, soh, som, sod) and natural-log lse to LSE (B, Hq, Lq) fp32; slot0 is unused.
    """
    bk = tl.program_id(0).to(tl.int64)
    if MERGE:
        acc, m_i, l_i, b, h, row_i, row_ok = _own_split(
            bk, 0, tl.program_id(2), Q, K, V, KVM,
            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
            Hkv, Lq, T, group, qk_scale, keys_per_split,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_KV_MASK, CAUSAL, PRECISION, WIDE,
        )
        row_id = (b * Hq + h) * Lq + row_i
        _store_merged(OP, LP, O, LSE, row_id, O + b * sob + h * soh + row_i * som, sod, S_total,
                      acc, m_i, l_i, row_ok, tl.arange(0, BLOCK_D), HEAD_DIM)
    else:
        _own_program(
            bk, tl.program_id(1), tl.program_id(2),
            Q, K, V, KVM, OP, LP,
            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
            Hq, Hkv, Lq, T, group, qk_scale, keys_per_split, slot0, S_total,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_KV_MASK, CAUSAL, PRECISION, WIDE,
        )


@triton.jit
def decode_parts_kernel(
    Q, K, V, KVM, PK, PV, PM, ORDER, STARTS, BSTARTS, OP, LP,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smn,
    spkg, spkh, spkn, spkd,
    spvg, spvh, spvn, spvd,
    spmg, spmn,
    B, Hq, Hkv, Lq, T, P, group, G, qk_scale, p_keys_per_split, o_keys_per_split, p_splits, S_total,
    search_steps, p_row_blocks, n_prefix, n_own, own_grid0, own_grid1,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    P_BLOCK_M: tl.constexpr, P_BLOCK_N: tl.constexpr, O_BLOCK_M: tl.constexpr, O_BLOCK_N: tl.constexpr,
    HAS_PIDX: tl.constexpr, HAS_KV_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PREFIX_MASK: tl.constexpr, WIDE: tl.constexpr,
):
    """Both parts in one grid of n_prefix + n_own programs, alternating while both have work.

    Why: from B of about 74 on an H100 the prefix part is compute-bound (4B flop per byte) while
    the own part is memory-bound; run one after the other they cannot beat the sum of the two
    times (benchmarks/NOTES.md: 1.49x the byte floor at B = 256, P = 16384). Interleaved program
    ids let the scheduler place a prefix program and an own-cache program side by side, so the
    prefix's matrix products can hide under the own caches' reads. Each part's programs keep the
    order of their own launch (row blocks, then kv heads, then splits; requests x kv heads, then
    splits, then row blocks), so concurrent programs still share prefix tiles in L2.
    """
    pid = tl.program_id(0)
    both = tl.minimum(n_prefix, n_own)
    paired = pid < 2 * both
    is_prefix = tl.where(paired, pid % 2 == 0, n_prefix > n_own)
    idx = tl.where(paired, pid // 2, pid - both)
    if is_prefix:
        _prefix_program(
            (idx % p_row_blocks).to(tl.int64), ((idx // p_row_blocks) % Hkv).to(tl.int64),
            idx // (p_row_blocks * Hkv),
            Q, PK, PV, PM, ORDER, STARTS, BSTARTS, OP, LP,
            sqb, sqh, sqm, sqd, spkg, spkh, spkn, spkd, spvg, spvh, spvn, spvd, spmg, spmn,
            B, Hq, Lq, P, group, G, qk_scale, p_keys_per_split, 0, S_total, search_steps,
            HEAD_DIM, BLOCK_D, P_BLOCK_M, P_BLOCK_N, HAS_PIDX, PRECISION, HAS_PREFIX_MASK, WIDE,
        )
    else:
        _own_program(
            (idx % own_grid0).to(tl.int64), (idx // own_grid0) % own_grid1, idx // (own_grid0 * own_grid1),
            Q, K, V, KVM, OP, LP,
            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
            Hq, Hkv, Lq, T, group, qk_scale, o_keys_per_split, p_splits, S_total,
            HEAD_DIM, BLOCK_D, O_BLOCK_M, O_BLOCK_N, HAS_KV_MASK, CAUSAL, PRECISION, WIDE,
        )


@triton.jit
def decode_merge_kernel(
    OP, LP, O, LSE, Hq, Lq, S_total,
    sob, soh, som, sod,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid (B * Hq * Lq,): one program per query row merges its S_total partials.

    out = sum_s exp(lse_s - lse) out_s with lse = log(sum_s exp(lse_s)), in a fixed order
    (deterministic). A row whose partials are all empty gets out 0 and lse -inf, with no NaN.
    """
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Lq + i, the index into LSE (B, Hq, Lq)
    b = row // (Hq * Lq)
    h = (row // Lq) % Hq
    i = row % Lq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, S_total, BLOCK_S):
        lse_s = tl.load(LP + row * S_total + s0 + offs_s, mask=s0 + offs_s < S_total, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse_s)
    m = tl.max(m_vec, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    den_vec = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S_total, BLOCK_S):
        s_ok = s0 + offs_s < S_total
        lse_s = tl.load(LP + row * S_total + s0 + offs_s, mask=s_ok, other=float("-inf"))
        w = tl.exp(lse_s - m_safe)  # an empty split (lse -inf) weighs exactly 0
        cell = row * S_total + s0 + offs_s
        o = tl.load(OP + cell[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        den_vec += w
    den = tl.sum(den_vec, 0)
    empty = den == 0.0
    out = acc / tl.where(empty, 1.0, den)
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, den)))
    tl.store(O + b * sob + h * soh + i * som + offs_d * sod, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + row, lse)
