"""Backward kernels of shared-prefix attention (only @triton.jit code).

With p = exp(s - lse) the probabilities of the forward, and delta = rowsum(dO * O) - dlse:
  dV = p^T dO,  ds = p * (dO V^T - delta),  dQ = scale * ds K,  dK = scale * ds^T Q.
Three kernels, none with atomics, so every run gives bitwise the same gradients:
- dq:            one program per (query block, b, h); streams the prefix, then the own keys.
- own_dkdv:      one program per (key block, b, kv head); loops over the group's query heads.
- prefix_dkdv:   one program per (prefix block, kv head, prefix g, split s); loops over the
                 requests of split s that use prefix g, so the batch reduction of the prefix
                 gradient happens in registers. With S > 1 splits, each writes an fp32 partial
                 (S, G, Hkv, P, D) that the launcher sums in a fixed order.
With HAS_PREFIX_MASK, prefix_mask's row g masks the prefix keys in the dq and prefix_dkdv kernels
as kv_mask masks the own keys: a masked key's p is 0, so its gradient is exactly 0, and a prefix
block whose keys are all masked skips its loop over the requests.
lse arrives in natural log and is turned into log2 units here (scores are in log2 units).

Row renormalisation. p = exp2(s - lse2) inherits the rounding of lse2 as a factor common to the
row: at |lse| ~ 1e4 one fp32 ulp of lse is ~1e-3, which every p, and so every gradient, of
that row carries (measured: ~1e-3 relative gradient error in fp32, against ~1e-6 for a float32
reference that normalises its softmax). The dq kernel visits every key of its rows anyway, so
it also sums its p: 1 in exact arithmetic. It divides its dq by that sum and stores the
correction 1 / sum per row in CORR, which the dK/dV kernels multiply their p by. The per-key
error left is that of s itself, as in any float32 softmax. Only float32 (PRECISION "ieee") does
this: in 16-bit inputs the rounding of the inputs and of p itself is ~10x that of lse.
"""

import triton
import triton.language as tl

from .forward import _load_rows, _packed_rows, _visible

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _row_stats(LSE_ROW, DELTA_ROW, offs_m, Lq):
    """lse in log2 units (+inf for a row that sees nothing, so its p is 0) and delta."""
    lse = tl.load(LSE_ROW + offs_m, mask=offs_m < Lq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA_ROW + offs_m, mask=offs_m < Lq, other=0.0)
    return lse, delta


@triton.jit
def _renormaliser(psum):
    """1 / psum where psum, the row's sum of p, is positive and finite; else 1 (a row that sees
    no key, or a NaN/Inf row, keeps what the unnormalised p gives)."""
    ok = (psum > 0.0) & (psum < float("inf"))
    return tl.where(ok, 1.0 / tl.where(ok, psum, 1.0), 1.0)


@triton.jit
def _dq_segment(dq, psum, q, do, lse2, delta, K_BASE, V_BASE, skn, skd, svn, svd, L, hi,
                offs_m, offs_d, MASK_BASE, stride_mask, q_shift, qk_scale,
                CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K_BASE, skn, skd, offs_n, offs_d, L, HEAD_DIM)
        v = _load_rows(V_BASE, svn, svd, offs_n, offs_d, L, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _visible(offs_m, offs_n, L, MASK_BASE, stride_mask, q_shift, CAUSAL, HAS_KV_MASK)
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if PRECISION == "ieee":  # float32: the row renormalisation (module docstring)
            psum += tl.sum(p, 1)
    return dq, psum


@triton.jit
def shared_prefix_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    sob, soh, som, sod,
    sdob, sdoh, sdom, sdod,
    Hq, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse for BLOCK_M rows of one (request, head), fp32, into the
    contiguous (B, Hq, Lq) DELTA: one read of O and dO in any layout, instead of the fp32 copies
    and the product an eager expression materialises."""
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh, som, sod, offs_m, offs_d, Lq, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO + b * sdob + h * sdoh, sdom, sdod, offs_m, offs_d, Lq, HEAD_DIM).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def shared_prefix_bwd_dq_kernel(
    Q, K, V, PK, PV, PIDX, KVM, PM, DO, LSE, DELTA, DQ, CORR,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    spkg, spkh, spkn, spkd,
    spvg, spvh, spvn, spvd,
    smb, smn,
    spmg, spmn,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm,
    Hq, Lq, Lk, P, group, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PIDX: tl.constexpr, HAS_KV_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PREFIX_MASK: tl.constexpr, PACK: tl.constexpr,
):
    """dq of BLOCK_M query rows of PACK heads (forward._packed_rows): each K/V tile loaded serves
    PACK heads, and short queries still fill a large tile."""
    POS: tl.constexpr = BLOCK_M // PACK
    pid = tl.program_id(0).to(tl.int64)  # B * Hq / PACK on axis 0 (axes 1, 2 stop at 65535); 64-bit offsets
    pid_m = tl.program_id(1)
    b, hk, h, pos, offs_d, row_ok, ld, rows = _packed_rows(pid, pid_m, Hq, group, Lq, HEAD_DIM, BLOCK_D, BLOCK_M,
                                                           PACK)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + rows * sqm + offs_d[None, :] * sqd, mask=ld, other=0.0)
    do = tl.load(DO + b * sdob + h[:, None] * sdoh + rows * sdom + offs_d[None, :] * sdod, mask=ld, other=0.0)
    bh = b * Hq + h  # per row
    lse2, delta = _row_stats(LSE + bh * Lq, DELTA + bh * Lq, pos, Lq)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    psum = tl.zeros([BLOCK_M], dtype=tl.float32)

    if HAS_PIDX:
        g = tl.load(PIDX + b).to(tl.int64)
    else:
        g = 0
    dq, psum = _dq_segment(
        dq, psum, q, do, lse2, delta, PK + g * spkg + hk * spkh, PV + g * spvg + hk * spvh, spkn, spkd, spvn, spvd,
        P, P, pos, offs_d, PM + g * spmg, spmn, 0, qk_scale, False, HAS_PREFIX_MASK, HEAD_DIM, BLOCK_N,
        PRECISION,
    )
    q_shift = Lk - Lq
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (pid_m + 1) * POS + q_shift)
    dq, psum = _dq_segment(
        dq, psum, q, do, lse2, delta, K + b * skb + hk * skh, V + b * svb + hk * svh, skn, skd, svn, svd,
        Lk, hi, pos, offs_d, KVM + b * smb, smn, q_shift, qk_scale,
        CAUSAL, HAS_KV_MASK, HEAD_DIM, BLOCK_N, PRECISION,
    )
    if PRECISION == "ieee":  # float32: the row renormalisation (module docstring)
        corr = _renormaliser(psum)
        dq = dq * corr[:, None]
        tl.store(CORR + bh * Lq + pos, corr, mask=row_ok)  # fp32 (B, Hq, Lq), contiguous
    # DQ is a fresh (B, Hq, Lq, D) tensor, unit stride along D.
    dq_ptrs = DQ + b * sdqb + h[:, None] * sdqh + rows * sdqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=ld)


@triton.jit
def _dkdv_rows(dk, dv, k, v, Q_ROW, DO_ROW, LSE_ROW, DELTA_ROW, CORR_ROW, sqm, sqd, sdom, sdod, Lq, m_lo,
               offs_n, offs_d, L, MASK_BASE, stride_mask, q_shift, qk_scale,
               CAUSAL: tl.constexpr, HAS_KV_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate one query head's contribution, query rows [m_lo, Lq), to a key block's dK, dV.

    Works on the transposed problem (keys as rows) so that dK and dV stay (BLOCK_N, BLOCK_D).
    """
    for start in range(m_lo, Lq, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = _load_rows(Q_ROW, sqm, sqd, offs_m, offs_d, Lq, HEAD_DIM)
        do = _load_rows(DO_ROW, sdom, sdod, offs_m, offs_d, Lq, HEAD_DIM)
        lse2, delta = _row_stats(LSE_ROW, DELTA_ROW, offs_m, Lq)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        ok = tl.trans(_visible(offs_m, offs_n, L, MASK_BASE, stride_mask, q_shift, CAUSAL, HAS_KV_MASK))
        pt = tl.exp2(st - lse2[None, :])
        if PRECISION == "ieee":  # float32: the row renormalisation (module docstring)
            pt = pt * tl.load(CORR_ROW + offs_m, mask=offs_m < Lq, other=1.0)[None, :]
        pt = tl.where(ok, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def shared_prefix_bwd_own_dkdv_kernel(
    Q, K, V, KVM, DO, LSE, DELTA, CORR, DK, DV,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smn,
    sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn,
    Hq, Hkv, Lq, Lk, group, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    bhk = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + hk * skh, skn, skd, offs_n, offs_d, Lk, HEAD_DIM)
    v = _load_rows(V + b * svb + hk * svh, svn, svd, offs_n, offs_d, Lk, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_shift = Lk - Lq
    m_lo = 0
    if CAUSAL:
        # Query i sees key j iff i >= j - q_shift: rows before the block's first key are skipped.
        m_lo = tl.maximum(0, pid_n * BLOCK_N - q_shift) // BLOCK_M * BLOCK_M
    for j in range(0, group):
        h = hk * group + j
        bh = b * Hq + h
        dk, dv = _dkdv_rows(
            dk, dv, k, v, Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + bh * Lq, DELTA + bh * Lq,
            CORR + bh * Lq, sqm, sqd, sdom, sdod, Lq, m_lo, offs_n, offs_d, Lk, KVM + b * smb, smn, q_shift, qk_scale,
            CAUSAL, HAS_KV_MASK, HEAD_DIM, BLOCK_M, PRECISION,
        )
    # DK and DV are fresh (B, Hkv, Lk, D) tensors of one layout, unit stride along D.
    offs = b * sdkb + hk * sdkh + offs_n.to(tl.int64)[:, None] * sdkn + offs_d[None, :]
    mask = (offs_n < Lk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def shared_prefix_bwd_prefix_dkdv_kernel(
    Q, PK, PV, PM, ORDER, STARTS, DO, LSE, DELTA, CORR, DPK, DPV,
    sqb, sqh, sqm, sqd,
    spkg, spkh, spkn, spkd,
    spvg, spvh, spvn, spvd,
    spmg, spmn,
    sdob, sdoh, sdom, sdod,
    Hq, Hkv, Lq, P, group, G, qk_scale, scale,
    SPLITS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HAS_PREFIX_MASK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    gs = tl.program_id(2).to(tl.int64)
    g = gs // SPLITS
    split = gs % SPLITS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(PK + g * spkg + hk * spkh, spkn, spkd, offs_n, offs_d, P, HEAD_DIM)
    v = _load_rows(PV + g * spvg + hk * spvh, spvn, spvd, offs_n, offs_d, P, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Requests sorted by prefix: ORDER[STARTS[g]:STARTS[g + 1]] use prefix g. The work of prefix
    # g is count * group units (a request and one query head of kv head hk); split `split` takes
    # a contiguous run of them, the runs balanced to within one unit, always in the same order.
    first = tl.load(STARTS + g)
    units = (tl.load(STARTS + g + 1) - first) * group
    lo = split * units // SPLITS
    hi = (split + 1) * units // SPLITS
    if HAS_PREFIX_MASK:
        # A block whose keys are all masked (the padding of a short prompt) has a zero gradient:
        # skip its requests. Otherwise masked keys get p = 0 in _dkdv_rows.
        keep = tl.load(PM + g * spmg + offs_n * spmn, mask=offs_n < P, other=0)
        hi = tl.where(tl.max(keep.to(tl.int32), 0) > 0, hi, lo)
    for u in range(lo, hi):
        b = tl.load(ORDER + first + u // group).to(tl.int64)
        h = hk * group + u % group
        bh = b * Hq + h
        dk, dv = _dkdv_rows(
            dk, dv, k, v, Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + bh * Lq, DELTA + bh * Lq,
            CORR + bh * Lq, sqm, sqd, sdom, sdod, Lq, 0, offs_n, offs_d, P, PM + g * spmg, spmn, 0, qk_scale,
            False, HAS_PREFIX_MASK, HEAD_DIM, BLOCK_M, PRECISION,
        )
    # DPK and DPV are fresh contiguous (SPLITS, G, Hkv, P, D) tensors (SPLITS == 1: the gradient).
    offs = ((split * G + g) * Hkv + hk) * P * HEAD_DIM + offs_n.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    mask = (offs_n < P)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DPK + offs, (dk * scale).to(DPK.dtype.element_ty), mask=mask)
    tl.store(DPV + offs, dv.to(DPV.dtype.element_ty), mask=mask)
