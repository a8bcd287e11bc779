"""The log-sum-exp merge of the two parts in one Triton kernel (CUDA tensors).

Eagerly the merge is about eight passes over the (B, Hq, Lq, D) outputs in float32 (two casts,
two exponentials broadcast, two products, a sum, a cast back): on a GPU more bytes than the
attention calls themselves move. This kernel reads each part once and writes the result once.
Imported only where it runs (triton is not needed on a CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._core.layout import bhld_like


@triton.jit
def merge_parts_kernel(
    OP, LP, OR, LR, O, L,
    sopb, soph, sopm, sopd, slpb, slph, slpm,
    sorb, sorh, sorm, sord, slrb, slrh, slrm,
    sob, soh, som, sod,
    Hq, Lq, rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """BLOCK_R rows (b, h, i) of out = w_p out_p + w_r out_r with w = exp(lse_part - lse) and
    lse = logaddexp(lse_p, lse_r), natural log; a part a row cannot see has lse -inf and weight
    0, and a row that sees neither gets out 0 and lse -inf."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < rows
    i = r % Lq
    bh = r // Lq
    h = bh % Hq
    b = bh // Hq
    lp = tl.load(LP + b * slpb + h * slph + i * slpm, mask=ok, other=float("-inf"))
    lr = tl.load(LR + b * slrb + h * slrh + i * slrm, mask=ok, other=float("-inf"))
    m = tl.maximum(lp, lr)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    ep = tl.exp(lp - m_safe)
    er = tl.exp(lr - m_safe)
    total = ep + er
    empty = total == 0.0
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    d = tl.arange(0, BLOCK_D)
    ld = ok[:, None] & (d < HEAD_DIM)[None, :]
    op = tl.load(OP + (b * sopb + h * soph + i * sopm)[:, None] + d[None, :] * sopd, mask=ld, other=0.0)
    orr = tl.load(OR + (b * sorb + h * sorh + i * sorm)[:, None] + d[None, :] * sord, mask=ld, other=0.0)
    out = (op.to(tl.float32) * (ep * inv)[:, None]) + (orr.to(tl.float32) * (er * inv)[:, None])
    tl.store(O + (b * sob + h * soh + i * som)[:, None] + d[None, :] * sod, out.to(O.dtype.element_ty), mask=ld)
    tl.store(L + r, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))), mask=ok)


def merge(q, out_p, lse_p, out_r, lse_r):
    """(out (B, Hq, Lq, D) in q's dtype and the package's layout, lse (B, Hq, Lq) float32
    contiguous): the merge of compose.merge, in one kernel. Any strides of the inputs."""
    B, Hq, Lq, D = q.shape
    out = bhld_like(q)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    rows = B * Hq * Lq
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(1, min(64, 4096 // block_d))
    lse_p, lse_r = lse_p.float(), lse_r.float()
    merge_parts_kernel[(triton.cdiv(rows, block_r),)](
        out_p, lse_p, out_r, lse_r, out, lse,
        *out_p.stride(), *lse_p.stride(), *out_r.stride(), *lse_r.stride(), *out.stride(),
        Hq, Lq, rows, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4,
    )
    return out, lse
