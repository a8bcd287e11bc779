"""Launchers of the shared-prefix attention kernels: strides, grids, block sizes, allocation.

Inputs arrive checked by _core.problem. Any strides are accepted (each tensor's four
strides are passed to the kernels), so transformers' transposed (B, H, L, D) views are read in
place. Outputs are fresh contiguous tensors.
"""

from __future__ import annotations

import torch
import triton

from .kernels.backward import (
    shared_prefix_bwd_dq_kernel,
    shared_prefix_bwd_preprocess_kernel,
    shared_prefix_bwd_own_dkdv_kernel,
    shared_prefix_bwd_prefix_dkdv_kernel,
)
from .kernels.forward import shared_prefix_fwd_kernel
from . import tiles
from ..._core import env
from ..._core.grouping import sorted_by_prefix
from ..._core.layout import bhld

# triton.jit decides at decoration time whether kernels are interpreted (TRITON_INTERPRET set
# before this module was imported, read as Triton reads it); the backend's reasons read this to
# accept CPU tensors.
INTERPRETED = env.triton_interpret_requested()

LOG2E = 1.4426950408889634


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products: TF32 would be 1000x less accurate than the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def mask_args(mask, dummy):
    """(pointer, stride 0, stride 1) of a 2-D bool mask (kv_mask (B, Lk) or prefix_mask (G, P)),
    read as uint8; (dummy, 0, 0) for no mask (the kernel's HAS_* constexpr is then False)."""
    if mask is None:
        return dummy, 0, 0
    m = mask.view(torch.uint8)  # bool and uint8 share a layout; no copy
    return m, m.stride(0), m.stride(1)


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal: bool, scale: float, prefix_mask=None):
    """Returns out (B, Hq, Lq, D) in q's dtype (a (B, Lq, Hq, D) tensor transposed) and the natural-log lse (B, Hq, Lq) fp32."""
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    out = bhld(B, Hq, Lq, D, q)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    blk = tiles.kernel_blocks("forward", D, q.dtype, q.device)
    kvm, smb, smn = mask_args(kv_mask, q)
    pm, spmg, spmn = mask_args(prefix_mask, q)
    pack = tiles.head_pack(Hq // Hkv, blk.m)
    grid = (B * Hq // pack, triton.cdiv(Lq, blk.m // pack))
    shared_prefix_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, q if prefix_index is None else prefix_index.contiguous(), kvm, pm, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), smb, smn, spmg, spmn,
        *out.stride(), Hq, Lq, Lk, P, Hq // Hkv, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=blk.m, BLOCK_N=blk.n,
        HAS_PIDX=prefix_index is not None, HAS_KV_MASK=kv_mask is not None, CAUSAL=causal,
        PRECISION=precision(q.dtype), HAS_PREFIX_MASK=prefix_mask is not None, PACK=pack,
        num_warps=blk.warps, num_stages=blk.stages,
    )
    return out, lse


def _delta(dout, out, dlse, D: int):
    """rowsum(dout * out) - dlse, fp32 (B, Hq, Lq) contiguous, in one kernel."""
    B, Hq, Lq, _ = out.shape
    delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=out.device)
    block_m = tiles.preprocess_rows(out.device, D)
    dlse_ = delta if dlse is None else dlse.float().contiguous()
    shared_prefix_bwd_preprocess_kernel[(B * Hq, triton.cdiv(Lq, block_m))](
        out, dout, dlse_, delta, *out.stride(), *dout.stride(), Hq, Lq,
        HEAD_DIM=D, BLOCK_D=tiles.block_d(D), BLOCK_M=block_m, HAS_DLSE=dlse is not None,
        num_warps=4 if tiles.on_gpu(out.device) else 1,
    )
    return delta


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
             prefix_mask=None):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) in the inputs' dtypes; dq, dk, dv in the
    layout _core.layout describes ((B, L, H, D) memory), the prefix gradients contiguous. The
    prefix gradient of a key that prefix_mask masks is exactly 0."""
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    group = Hq // Hkv
    dev = q.device
    lse = lse.contiguous()
    blk = tiles.kernel_blocks("dq", D, q.dtype, dev)
    kv_blk = tiles.kernel_blocks("dkdv", D, q.dtype, dev)
    delta = _delta(dout, out, dlse, D)
    kvm, smb, smn = mask_args(kv_mask, q)
    pm, spmg, spmn = mask_args(prefix_mask, q)
    has_pm = prefix_mask is not None
    common = dict(
        HEAD_DIM=D, BLOCK_D=tiles.block_d(D), BLOCK_M=blk.m, BLOCK_N=blk.n,
        PRECISION=precision(q.dtype), num_warps=blk.warps, num_stages=blk.stages,
    )
    kv_common = dict(common, BLOCK_M=kv_blk.m, BLOCK_N=kv_blk.n, num_warps=kv_blk.warps,
                     num_stages=kv_blk.stages)
    qk_scale = scale * LOG2E

    dq = bhld(B, Hq, Lq, D, q)
    corr = torch.empty_like(lse)  # per-row renormalisation of p, written by the dq kernel
    pack = tiles.head_pack(group, blk.m)
    shared_prefix_bwd_dq_kernel[(B * Hq // pack, triton.cdiv(Lq, blk.m // pack))](
        q, k, v, prefix_k, prefix_v, q if prefix_index is None else prefix_index.contiguous(), kvm, pm, dout, lse, delta,
        dq, corr,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), smb, smn, spmg, spmn,
        *dout.stride(), *dq.stride()[:3], Hq, Lq, Lk, P, group, qk_scale, scale,
        HAS_PIDX=prefix_index is not None, HAS_KV_MASK=kv_mask is not None, CAUSAL=causal,
        HAS_PREFIX_MASK=has_pm, PACK=pack, **common,
    )

    dk = bhld(B, Hkv, Lk, D, k)
    dv = bhld(B, Hkv, Lk, D, v)
    if Lk > 0:
        shared_prefix_bwd_own_dkdv_kernel[(B * Hkv, triton.cdiv(Lk, kv_blk.n))](
            q, k, v, kvm, dout, lse, delta, corr, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), smb, smn, *dout.stride(),
            *dk.stride()[:3], Hq, Hkv, Lq, Lk, group, qk_scale, scale,
            HAS_KV_MASK=kv_mask is not None, CAUSAL=causal, **kv_common,
        )

    if P == 0:
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    p_blocks = triton.cdiv(P, kv_blk.n)
    splits = tiles.prefix_splits(B, G, p_blocks * Hkv * G, dev, group)
    order, starts = sorted_by_prefix(prefix_index, B, G, dev)
    if splits == 1:
        dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=dev)
        dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=dev)
    else:
        dpk = torch.empty((splits, G, Hkv, P, D), dtype=torch.float32, device=dev)
        dpv = torch.empty_like(dpk)
    shared_prefix_bwd_prefix_dkdv_kernel[(p_blocks, Hkv, G * splits)](
        q, prefix_k, prefix_v, pm, order, starts, dout, lse, delta, corr, dpk, dpv,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), spmg, spmn, *dout.stride(),
        Hq, Hkv, Lq, P, group, G, qk_scale, scale,
        splits, HAS_PREFIX_MASK=has_pm, **kv_common,
    )
    if splits > 1:
        # A fixed-order sum over the split axis: the same bits on every run, unlike atomics.
        dpk = dpk.sum(0).to(prefix_k.dtype)
        dpv = dpv.sum(0).to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv
