"""Forward kernel of shared-prefix attention (only @triton.jit code).

One program owns BLOCK_M query rows of one (request b, query head h). It streams two key
segments through one online softmax: first the prefix prefix_index[b] (every key visible, or with
HAS_PREFIX_MASK the keys its row of prefix_mask keeps), then the request's own keys (causal
bottom-right and kv_mask). A row that sees no key at all (P = 0, or every prefix key masked, and
no visible own key) gets out 0 and lse -inf. Scores are kept in log2 units
(scale * log2(e) folded into one multiply, so exp2 does the work); the stored lse is converted
back to natural log.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)  # natural-log lse = log2-units lse * ln(2)


@triton.jit
def _load_rows(base, stride_l, stride_d, offs_l, offs_d, L, HEAD_DIM: tl.constexpr):
    """(len(offs_l), BLOCK_D) tile of a (L, HEAD_DIM) matrix, zero outside. Row offsets in 64
    bits: a row stride of H * D (transformers' layout) times a long L passes 2**31."""
    mask = (offs_l[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + offs_l.to(tl.int64)[:, None] * stride_l + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _visible(offs_m, offs_n, L, MASK_BASE, stride_mask, q_shift,
             CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key offs_n exists, is not padding, and is not in the future."""
    ok = (offs_n < L)[None, :] & (offs_m >= 0)[:, None]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + q_shift)
    if HAS_KV_MASK:
        keep = tl.load(MASK_BASE + offs_n * stride_mask, mask=offs_n < L, other=0)
        ok = ok & (keep != 0)[None, :]
    return ok


@triton.jit
def _packed_rows(pid, pid_m, Hq, group, Lq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 PACK: tl.constexpr):
    """The rows of a program that stacks PACK query heads of one kv head (they read the same keys
    and share one causal limit) x BLOCK_M / PACK query positions: row r is head h0 + r // POS at
    position pid_m * POS + r % POS, so each K/V tile loaded serves PACK heads. pid (int64) runs
    over B * Hq / PACK. Returns (b, hk, h, pos, offs_d, row_ok, ld: the (rows, BLOCK_D) load
    mask, rows: pos as an int64 column)."""
    POS: tl.constexpr = BLOCK_M // PACK
    packs = Hq // PACK
    b = pid // packs
    h0 = (pid % packs) * PACK
    offs_r = tl.arange(0, BLOCK_M)
    h = h0 + offs_r // POS
    pos = pid_m * POS + offs_r % POS
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = pos < Lq
    ld = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    return b, h0 // group, h, pos, offs_d, row_ok, ld, pos.to(tl.int64)[:, None]


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, K_BASE, V_BASE, skn, skd, svn, svd, L, lo, hi,
                 offs_m, offs_d, MASK_BASE, stride_mask, q_shift, qk_scale,
                 CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over keys [lo, hi) of one segment (prefix or per-request) of length L.
    MASKED=False: the caller guarantees every key of these tiles exists and is visible to every
    row (whole tiles, no mask, below the causal diagonal), so no mask is computed."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K_BASE, skn, skd, offs_n, offs_d, L, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            ok = _visible(offs_m, offs_n, L, MASK_BASE, stride_mask, q_shift, CAUSAL, HAS_KV_MASK)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; exponentiate against 0 instead so that
        # exp2(-inf - -inf) never produces a NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V_BASE, svn, svd, offs_n, offs_d, L, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def shared_prefix_fwd_kernel(
    Q, K, V, PK, PV, PIDX, KVM, PM, O, LSE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    spkg, spkh, spkn, spkd,
    spvg, spvh, spvn, spvd,
    smb, smn,
    spmg, spmn,
    sob, soh, som, sod,
    Hq, Lq, Lk, P, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PIDX: tl.constexpr, HAS_KV_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PREFIX_MASK: tl.constexpr, PACK: tl.constexpr,
):
    """BLOCK_M query rows of PACK heads (_packed_rows) through the prefix, then the own keys."""
    POS: tl.constexpr = BLOCK_M // PACK
    pid = tl.program_id(0).to(tl.int64)  # B * Hq / PACK on axis 0 (axes 1, 2 stop at 65535); 64-bit offsets
    pid_m = tl.program_id(1)
    if CAUSAL:  # the last query blocks see the most keys: launch them first
        pid_m = tl.num_programs(1) - 1 - pid_m
    b, hk, h, offs_m, offs_d, row_ok, ld, rows = _packed_rows(pid, pid_m, Hq, group, Lq, HEAD_DIM, BLOCK_D, BLOCK_M,
                                                              PACK)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + rows * sqm + offs_d[None, :] * sqd, mask=ld, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_PIDX:
        g = tl.load(PIDX + b).to(tl.int64)
    else:
        g = 0
    # The prefix segment: no causal mask; prefix_mask's row g (uint8, (G, P)), when given, is
    # the segment's key mask, read as kv_mask is for the own keys (0 outside P). Its whole tiles
    # need no mask without a prefix_mask; the last, partial one does.
    PK_G, PV_G = PK + g * spkg + hk * spkh, PV + g * spvg + hk * spvh
    p_full = 0
    if not HAS_PREFIX_MASK:
        p_full = (P // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_segment(
        acc, m_i, l_i, q, PK_G, PV_G, spkn, spkd, spvn, spvd, P, 0, p_full, offs_m, offs_d, PM + g * spmg, spmn, 0,
        qk_scale, False, False, HEAD_DIM, BLOCK_N, PRECISION, False,
    )
    acc, m_i, l_i = _fwd_segment(
        acc, m_i, l_i, q, PK_G, PV_G, spkn, spkd, spvn, spvd, P, p_full, P, offs_m, offs_d, PM + g * spmg, spmn, 0,
        qk_scale, False, HAS_PREFIX_MASK, HEAD_DIM, BLOCK_N, PRECISION, True,
    )
    q_shift = Lk - Lq  # bottom-right causal alignment: query i sees key j <= i + q_shift
    hi = Lk
    # Own keys every row of this block sees, in whole tiles: no mask there. Keys below the
    # block's first row's diagonal, without kv_mask; the tiles from there to hi are masked.
    full = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * POS + q_shift)
        full = tl.minimum(Lk, pid_m * POS + q_shift + 1)
    o_full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    if HAS_KV_MASK:
        o_full = 0
    K_B, V_B = K + b * skb + hk * skh, V + b * svb + hk * svh
    acc, m_i, l_i = _fwd_segment(
        acc, m_i, l_i, q, K_B, V_B, skn, skd, svn, svd, Lk, 0, o_full, offs_m, offs_d, KVM + b * smb, smn, q_shift,
        qk_scale, False, False, HEAD_DIM, BLOCK_N, PRECISION, False,
    )
    acc, m_i, l_i = _fwd_segment(
        acc, m_i, l_i, q, K_B, V_B, skn, skd, svn, svd, Lk, o_full, hi, offs_m, offs_d, KVM + b * smb, smn, q_shift,
        qk_scale, CAUSAL, HAS_KV_MASK, HEAD_DIM, BLOCK_N, PRECISION, True,
    )

    empty = l_i == 0.0  # no visible key (P == 0 or every prefix key masked, no own key): out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = O + b * sob + h[:, None] * soh + rows * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=ld)
    tl.store(LSE + (b * Hq + h) * Lq + offs_m, lse, mask=row_ok)
