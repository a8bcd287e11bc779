"""CUDA C++ backend of shared-prefix decoding (csrc/), built just in time on first use.

Two functions for the registry (BACKEND, below):

    decode_reasons(problem)  -> list[str]    why these kernels cannot take the case ([]: they can)
    decode_forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, fuse_parts,
                   prefix_mask=None)
                             -> (out, lse)   out (B, Hq, Lq, D) in q's dtype (memory (B, Lq, Hq, D)),
                                             lse (B, Hq, Lq) float32, natural log

decode_forward runs the custom op ``torch.ops.prefix_kernels.decode_cuda`` (registered here with a
fake implementation, so torch.compile traces it as one node), which calls the compiled
``torch.ops.prefix_kernels_cuda.decode``. Importing this module builds nothing and does not touch
the GPU; see build.py for the cache, the lock and the environment variables.

Preconditions the public op checks and these kernels trust: prefix_index values in [0, G), all
five tensors on one CUDA device with one dtype. Forward only (no autograd formula).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from ..._core import config
from ..._core import env as config_env
from ..._core.layout import bhld
from ..._core.problem import MAX_DECODE_LQ
from ..base import Backend, functions_of
from . import build

__all__ = ["decode_reasons", "decode_forward"]

HEAD_DIMS = (64, 80, 96, 128, 256)  # SPD_FOR_EACH_HEAD_DIM in csrc/shared_prefix_decode.cu
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_LQ = MAX_DECODE_LQ  # SPD_MAX_LQ in csrc/shared_prefix_decode.h: the two must agree
_INT32_MAX = 2**31 - 1
_GRID_YZ_MAX = 65535


def _reasons(p) -> list[str]:
    reasons = []
    if p.device.type != "cuda":
        reasons.append(f"not CUDA tensors (device {p.device})")
    if build.disabled():
        reasons.append(f"disabled by {config_env.DISABLE_CUDA}={os.environ.get(config_env.DISABLE_CUDA)}")
    if p.dtype not in DTYPES:
        reasons.append(f"dtype {p.dtype} is not float16, bfloat16 or float32")
    if p.D not in HEAD_DIMS:
        reasons.append(f"head dim {p.D} is not compiled (only {', '.join(map(str, HEAD_DIMS))})")
    if not 1 <= p.Lq <= MAX_LQ:
        reasons.append(f"Lq={p.Lq} query rows per request: the decode kernels take 1..{MAX_LQ}")
    if p.Hkv < 1 or p.Hq % p.Hkv != 0:
        reasons.append(f"Hq={p.Hq} is not a multiple of Hkv={p.Hkv}")
    elif p.Hkv > _GRID_YZ_MAX:
        reasons.append(f"Hkv={p.Hkv} kv heads exceed the {_GRID_YZ_MAX} limit of a grid axis")
    if p.B * p.Hq * p.Lq > _INT32_MAX or p.Lk > _INT32_MAX - 64 or p.P > _INT32_MAX - 64 or p.G >= _INT32_MAX:
        reasons.append("sizes exceed the 32-bit range of the decode kernels")
    if reasons:
        return reasons  # no GPU query and no build for a case that is declined anyway
    why = _device_unavailable(str(p.device))
    return [why] if why else []


@torch.compiler.assume_constant_result
def _device_unavailable(device: str) -> str:
    """Why the kernels cannot run on this GPU ('' when they can), building them on first use.

    A constant for torch.compile: the capability query and the build (a file lock, nvcc) run
    once when a compiled function is traced, and are never traced themselves."""
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < (8, 0):
        return f"needs compute capability 8.0 or newer (mma.sync bf16, cp.async); the GPU has {major}.{minor}"
    return build.ensure_loaded() or ""  # nvcc / ninja missing, or a failed build


def decode_reasons(problem) -> list[str]:
    """Why the CUDA decode kernels cannot compute this case; [] when they can.

    `problem` is a prefix_kernels._core.problem.Problem (B, Hq, Hkv, Lq, Lk, D, G, P, dtype, device).
    For a case they could take, the first call builds (or loads from the cache) the extension,
    which can take a minute. Never raises: an unexpected error becomes a reason.
    """
    try:
        return _reasons(problem)
    except Exception as exc:  # e.g. a CPU-only torch asked about a CUDA device
        return [f"CUDA decode backend could not check this case ({type(exc).__name__}: {exc})"]


def _decode_impl(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, fuse_parts=False,
                 prefix_mask=None):
    why = build.ensure_loaded()
    if why:
        raise RuntimeError(f"prefix_kernels: the CUDA decode kernels are unavailable: {why}")
    op = getattr(torch.ops, build.EXTENSION).decode
    return op(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, fuse_parts, prefix_mask)


# prefix_mask comes last, with a default, so that calls written before it existed still work.
@torch.library.custom_op("prefix_kernels::decode_cuda", mutates_args=(), device_types="cuda")
def _decode_cuda(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
    prefix_index: Optional[Tensor], kv_mask: Optional[Tensor], causal: bool, scale: float,
    fuse_parts: bool = False, prefix_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    return _decode_impl(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, fuse_parts, prefix_mask)


@_decode_cuda.register_fake
def _decode_cuda_fake(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, fuse_parts=False,
                      prefix_mask=None):
    B, Hq, Lq, D = q.shape
    return bhld(B, Hq, Lq, D, q), q.new_empty((B, Hq, Lq), dtype=torch.float32)


def decode_forward(q, k, v, prefix_k, prefix_v, prefix_index=None, kv_mask=None, causal=True, scale=None,
                   fuse_parts=None, prefix_mask=None):
    """Shared-prefix decode attention with the CUDA kernels (forward only).

    q (B, Hq, Lq, D), Lq in 1..16; k, v (B, Hkv, T, D), any strides; prefix_k, prefix_v
    (G, Hkv, P, D); prefix_index (B,) integer tensor with values in [0, G), or None (prefix 0 for
    all); kv_mask (B, T) bool/uint8, True = may attend, or None; causal: own key j visible to
    query i iff j <= i + (T - Lq); prefix_mask (G, P) bool/uint8, True = prefix key j of prefix g
    may be attended (by every query row), or None (every prefix key visible); a masked key of
    either mask is never read; scale default 1 / sqrt(D).
    Returns out (B, Hq, Lq, D) in q's dtype and lse (B, Hq, Lq) float32, natural log; a row with
    no visible key gets out 0 and lse -inf. Call decode_reasons first: this raises when the
    extension cannot be built. fuse_parts: the prefix and per-request kernels as one launch with
    interleaved blocks (parts_kernel; same result); None: _core.config.fuse_parts (FUSE_PARTS["cuda"]).
    """
    if fuse_parts is None:
        fuse_parts = config.fuse_parts("cuda", q, k.shape[2], prefix_k.shape[2], prefix_k.shape[0], k.shape[1])
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if prefix_index is not None and prefix_index.dtype not in (torch.int32, torch.int64):
        prefix_index = prefix_index.to(torch.int32)  # the public op also takes int8/int16/uint8
    args = (q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, bool(causal), float(scale), bool(fuse_parts))
    if prefix_mask is None:  # the call as it was before prefix_mask existed
        return torch.ops.prefix_kernels.decode_cuda(*args)
    return torch.ops.prefix_kernels.decode_cuda(*args, prefix_mask)


NAME = "cuda"
BACKEND = Backend(NAME, NAME, function=functions_of(sys.modules[__name__]), decode_reasons=decode_reasons)
