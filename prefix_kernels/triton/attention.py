"""Launchers of the shared-prefix attention kernels: strides, grids, block sizes, allocation.

Inputs arrive checked by prefix_kernels.checks. Any strides are accepted (each tensor's four
strides are passed to the kernels), so transformers' transposed (B, H, L, D) views are read in
place. Outputs are fresh contiguous tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton

from .kernels.backward import (
    shared_prefix_bwd_dq_kernel,
    shared_prefix_bwd_own_dkdv_kernel,
    shared_prefix_bwd_prefix_dkdv_kernel,
)
from ..ops import out_layout
from .kernels.forward import shared_prefix_fwd_kernel

# triton.jit decides at decoration time whether kernels are interpreted (TRITON_INTERPRET=1 set
# before this module was imported); the dispatcher reads this to accept CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634


def _on_gpu(device: torch.device) -> bool:
    """Whether launches on `device` take GPU tile sizes and splits; off a GPU (the interpreter)
    they take small fixed ones. tests/triton_offline_compile.py replaces this to build the GPU
    launches from CPU tensors."""
    return device.type == "cuda"


@dataclass(frozen=True)
class Blocks:
    m: int  # query rows per program (forward, dq) / per inner step (dk, dv)
    n: int  # keys per inner step (forward, dq) / per program (dk, dv)
    warps: int
    stages: int


def _blocks(D: int, dtype: torch.dtype, device: torch.device, backward: bool) -> Blocks:
    """Tile sizes, chosen to fit shared memory and registers rather than tuned (no GPU was at
    hand when they were set; autotuning on a GPU is owed). Forward at D = 128 in 16-bit:
    Q 64x128x2 B = 16 KB plus K and V 64x128x2 B x 2 x 3 stages = 96 KB, inside an A100's 164 KB.
    Backward programs keep two fp32 accumulators of (BLOCK, D), hence its smaller tiles.

    Registers were checked by compiling every launch offline for sm_80 and sm_90 with triton
    3.6 and 3.9 (tests/triton_offline_compile.py; table in benchmarks/NOTES.md):
    - fp32 takes exact products (PRECISION "ieee"), which Triton does with FMAs that hold whole
      operand tiles in registers: the earlier 64x32 tiles on 4 warps spilled 4-7 KB per thread
      at D >= 80 (ptxas fell back to 32 registers and the stack). 32x16 tiles on 8 warps keep
      the stack at <= 56 B per thread at every D (registers <= 128 on sm_80, up to 255 on sm_90);
    - 16-bit D > 128: 4 warps spilled 440-1500 B per thread in the decode prefix kernel (which
      takes these tiles); on 8 warps at most 24 B.
    Under the interpreter 16 x 16 tiles make every test shape cross several blocks in a few steps."""
    if not _on_gpu(device):
        return Blocks(16, 16, 1, 1)
    wide = D > 128
    if dtype == torch.float32:
        if backward:
            return Blocks(32, 16, 8, 1)
        return Blocks(32, 32, 8, 2) if D <= 64 else Blocks(32, 16, 8, 2)
    if backward:
        return Blocks(16, 32, 4, 1) if wide else Blocks(32, 64, 4, 2)
    if D <= 64:
        return Blocks(128, 64, 4, 3)
    return Blocks(64, 32, 8, 2) if wide else Blocks(64, 64, 4, 3)


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prefix_splits(B: int, G: int, kv_programs: int, device: torch.device) -> int:
    """How many splits of the batch reduce each prefix block's gradient.

    A grid over prefix blocks alone has cdiv(P, BLOCK_N) * Hkv * G programs: 8 for P = 16,
    Hkv = 8, far below an H100's 132 SMs. Splitting each prefix's requests S ways fills the GPU;
    the (S, G, Hkv, P, D) fp32 partials are then summed in a fixed order. S <= B / (2 G), so the
    partial buffer never reaches the (B, Hkv, P, D) size of a per-request copy.
    """
    cap = max(1, B // (2 * G))
    if not _on_gpu(device):
        return min(2, cap)  # exercise the split-and-sum path under the interpreter
    target = 2 * _sm_count(device)
    return max(1, min(cap, triton.cdiv(target, kv_programs), 65535 // G))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products: TF32 would be 1000x less accurate than the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(kv_mask, dummy):
    if kv_mask is None:
        return dummy, 0, 0
    m = kv_mask.view(torch.uint8)  # bool and uint8 share a layout; no copy
    return m, m.stride(0), m.stride(1)


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal: bool, scale: float):
    """Returns out (B, Hq, Lq, D) in q's dtype (a (B, Lq, Hq, D) tensor transposed) and the natural-log lse (B, Hq, Lq) fp32."""
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    out = out_layout(B, Hq, Lq, D, q)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    blk = _blocks(D, q.dtype, q.device, backward=False)
    kvm, smb, smn = _mask_args(kv_mask, q)
    grid = (B * Hq, triton.cdiv(Lq, blk.m))
    shared_prefix_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, q if prefix_index is None else prefix_index.contiguous(), kvm, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), smb, smn, *out.stride(),
        Hq, Lq, Lk, P, Hq // Hkv, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=blk.m, BLOCK_N=blk.n,
        HAS_PIDX=prefix_index is not None, HAS_KV_MASK=kv_mask is not None, CAUSAL=causal,
        PRECISION=_precision(q.dtype), num_warps=blk.warps, num_stages=blk.stages,
    )
    return out, lse


def _requests_sorted_by_prefix(prefix_index, B: int, G: int, device):
    """(order, starts): order[starts[g]:starts[g+1]] are the requests using prefix g, in batch order.

    Built on the device with no host sync: a stable sort, then each prefix's first position by
    binary search (bincount would read the maximum back to size its output: a sync on CUDA).
    """
    if prefix_index is None:  # all requests use prefix 0; prefixes 1.. G-1 get zero gradient
        starts = torch.full((G + 1,), B, dtype=torch.int32, device=device)
        starts[0] = 0
        return torch.arange(B, dtype=torch.int32, device=device), starts
    sorted_idx, order = torch.sort(prefix_index.long(), stable=True)
    starts = torch.searchsorted(sorted_idx, torch.arange(G + 1, device=device))  # count of values < g
    return order.to(torch.int32), starts.to(torch.int32)


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) in the inputs' dtypes; dq, dk, dv in the
    layout ops._in_grad_layout names ((B, L, H, D) memory), the prefix gradients contiguous."""
    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = prefix_k.shape
    Lk = k.shape[2]
    group = Hq // Hkv
    dev = q.device
    # delta = rowsum(dO * O) - dlse, fp32 (B, Hq, Lq) contiguous.
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    blk = _blocks(D, q.dtype, dev, backward=True)
    kvm, smb, smn = _mask_args(kv_mask, q)
    common = dict(
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=blk.m, BLOCK_N=blk.n,
        PRECISION=_precision(q.dtype), num_warps=blk.warps, num_stages=blk.stages,
    )
    qk_scale = scale * LOG2E

    dq = out_layout(B, Hq, Lq, D, q)
    corr = torch.empty_like(lse)  # per-row renormalisation of p, written by the dq kernel
    shared_prefix_bwd_dq_kernel[(B * Hq, triton.cdiv(Lq, blk.m))](
        q, k, v, prefix_k, prefix_v, q if prefix_index is None else prefix_index.contiguous(), kvm, dout, lse, delta, dq, corr,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), smb, smn, *dout.stride(),
        *dq.stride()[:3], Hq, Lq, Lk, P, group, qk_scale, scale,
        HAS_PIDX=prefix_index is not None, HAS_KV_MASK=kv_mask is not None, CAUSAL=causal, **common,
    )

    dk = out_layout(B, Hkv, Lk, D, k)
    dv = out_layout(B, Hkv, Lk, D, v)
    if Lk > 0:
        shared_prefix_bwd_own_dkdv_kernel[(B * Hkv, triton.cdiv(Lk, blk.n))](
            q, k, v, kvm, dout, lse, delta, corr, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), smb, smn, *dout.stride(),
            *dk.stride()[:3], Hq, Hkv, Lq, Lk, group, qk_scale, scale,
            HAS_KV_MASK=kv_mask is not None, CAUSAL=causal, **common,
        )

    if P == 0:
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    p_blocks = triton.cdiv(P, blk.n)
    splits = _prefix_splits(B, G, p_blocks * Hkv * G, dev)
    order, starts = _requests_sorted_by_prefix(prefix_index, B, G, dev)
    if splits == 1:
        dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=dev)
        dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=dev)
    else:
        dpk = torch.empty((splits, G, Hkv, P, D), dtype=torch.float32, device=dev)
        dpv = torch.empty_like(dpk)
    shared_prefix_bwd_prefix_dkdv_kernel[(p_blocks, Hkv, G * splits)](
        q, prefix_k, prefix_v, order, starts, dout, lse, delta, corr, dpk, dpv,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(),
        Hq, Hkv, Lq, P, group, G, qk_scale, scale,
        splits, **common,
    )
    if splits > 1:
        # A fixed-order sum over the split axis: the same bits on every run, unlike atomics.
        dpk = dpk.sum(0).to(prefix_k.dtype)
        dpv = dpv.sum(0).to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv
