"""The CUDA decode kernels (csrc/) built for the host emulation and called on CPU tensors.

`decode(...)` does what csrc/torch_binding.cpp does (tables of requests by prefix, workspace,
the C launcher API) through ctypes, on a shared library compiled by g++ from the unchanged
csrc/shared_prefix_decode.cu with -DSPD_EMULATE and tests/cuda_emu/include ahead of CUDA's
headers. Tests only: see include/cuda_runtime.h for what the emulation covers.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
SOURCES = [CSRC / "shared_prefix_decode.cu", CSRC / "shared_prefix_decode.cuh", CSRC / "shared_prefix_decode.h",
           HERE / "include" / "cuda_runtime.h"]
H100_SMS = 132
DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

I64x4 = ctypes.c_int64 * 4


class Problem(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int)] + [(n, ctypes.c_int64) for n in ("B", "Hq", "Hkv", "Lq", "T", "D", "G", "P")]


class Plan(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in (
        "rows_per_block", "keys_per_tile", "group_rows", "prefix_splits", "prefix_chunk", "prefix_grid_x",
        "request_splits", "request_chunk", "request_row_blocks", "rows_total", "ws_out_elems", "ws_lse_elems",
        "smem_bytes", "group_ws_elems")]


class Args(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("q_stride", I64x4),
        ("k", ctypes.c_void_p), ("k_stride", I64x4),
        ("v", ctypes.c_void_p), ("v_stride", I64x4),
        ("pk", ctypes.c_void_p), ("pk_stride", I64x4),
        ("pv", ctypes.c_void_p), ("pv_stride", I64x4),
        ("kv_mask", ctypes.c_void_p), ("kv_mask_stride", ctypes.c_int64 * 2),
        ("out", ctypes.c_void_p), ("out_stride", I64x4),
        ("lse", ctypes.c_void_p),
        ("order", ctypes.c_void_p), ("starts", ctypes.c_void_p), ("block_starts", ctypes.c_void_p),
        ("ws_out", ctypes.c_void_p), ("ws_lse", ctypes.c_void_p),
        ("causal", ctypes.c_int), ("scale", ctypes.c_float), ("fuse_parts", ctypes.c_int),
        ("prefix_mask", ctypes.c_void_p), ("prefix_mask_stride", ctypes.c_int64 * 2),
        ("prefix_index", ctypes.c_void_p), ("prefix_index_is_int64", ctypes.c_int),
        ("prefix_index_stride", ctypes.c_int64), ("group_ws", ctypes.c_void_p),
    ]


def compiler() -> str | None:
    return shutil.which("g++")


def build() -> ctypes.CDLL:
    """Compiles (once per source content) and loads the emulated library."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    lib = Path(tempfile.gettempdir()) / "prefix_kernels_cuda_emu" / f"spd_emu_{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler(), "-std=c++20", "-O2", "-shared", "-fPIC", "-DSPD_EMULATE", f"-I{HERE / 'include'}",
               f"-I{CSRC}", "-x", "c++", str(SOURCES[0]), "-o", str(tmp), "-lpthread"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulation build failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, lib)  # atomic: a concurrent build writes its own temporary file
    dll = ctypes.CDLL(str(lib))
    dll.spd_make_plan.restype = ctypes.c_char_p
    dll.spd_make_plan.argtypes = [ctypes.POINTER(Problem), ctypes.c_int, ctypes.POINTER(Plan)]
    dll.spd_launch.restype = ctypes.c_int
    dll.spd_launch.argtypes = [ctypes.POINTER(Problem), ctypes.POINTER(Plan), ctypes.POINTER(Args), ctypes.c_void_p]
    dll.spd_error_string.restype = ctypes.c_char_p
    return dll


def decode(dll, q, k, v, pk, pv, prefix_index, kv_mask, causal: bool, scale: float, sms: int = H100_SMS,
           fuse_parts: bool = False, prefix_mask=None, tables: bool = False, group_ws=None):
    """(out (B, Hq, Lq, D) in q's dtype, memory (B, Lq, Hq, D); lse (B, Hq, Lq) float32, natural log).

    prefix_mask: (G, P) bool/uint8 or None, any strides (passed as they are, like kv_mask).
    As the binding does, the requests are grouped by prefix inside spd_launch (group_kernel from
    prefix_index; no table without it). tables=True instead passes order, starts and block_starts
    built here with prefix_kernels._core.grouping (the caller-tables path of the C API).
    group_ws: a list that receives the grouping workspace tensor, for tests that read it."""
    from prefix_kernels._core.grouping import row_block_starts as _block_starts, sorted_by_prefix

    B, Hq, Lq, D = q.shape
    G, Hkv, P, _ = pk.shape
    T = k.shape[2]
    problem = Problem(DTYPES[q.dtype], B, Hq, Hkv, Lq, T, D, G, P)
    plan = Plan()
    why = dll.spd_make_plan(ctypes.byref(problem), sms, ctypes.byref(plan))
    if why is not None:
        raise ValueError(why.decode())
    out = torch.full((B, Lq, Hq, D), float("nan"), dtype=q.dtype).transpose(1, 2)  # NaN: unwritten shows
    lse = torch.full((B, Hq, Lq), float("nan"), dtype=torch.float32)
    if prefix_index is not None and prefix_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"prefix_index must be int32 or int64 (as for the binding), got {prefix_index.dtype}")
    order = starts = block_starts = None
    if tables:
        index = torch.zeros(B, dtype=torch.long) if prefix_index is None else prefix_index
        order, starts = sorted_by_prefix(index, B, G, index.device)
        block_starts = _block_starts(starts, plan.group_rows, plan.rows_per_block, G)
    # NaN-free but wrong-looking fill (-7): a table entry the kernel forgets to write shows.
    gws = torch.full((max(1, plan.group_ws_elems),), -7, dtype=torch.int32)
    if group_ws is not None:
        group_ws.append(gws)
    ws_out = torch.full((max(1, plan.ws_out_elems),), float("nan"))
    ws_lse = torch.full((max(1, plan.ws_lse_elems),), float("nan"))
    mask = None if kv_mask is None else kv_mask.view(torch.uint8)
    pmask = None if prefix_mask is None else prefix_mask.view(torch.uint8)
    args = Args(
        q.data_ptr(), I64x4(*q.stride()), k.data_ptr(), I64x4(*k.stride()), v.data_ptr(), I64x4(*v.stride()),
        pk.data_ptr(), I64x4(*pk.stride()), pv.data_ptr(), I64x4(*pv.stride()),
        None if mask is None else mask.data_ptr(), (ctypes.c_int64 * 2)(*(mask.stride() if mask is not None else (0, 0))),
        out.data_ptr(), I64x4(*out.stride()), lse.data_ptr(),
        *((None, None, None) if order is None else (order.data_ptr(), starts.data_ptr(), block_starts.data_ptr())),
        ws_out.data_ptr(), ws_lse.data_ptr(),
        int(causal), float(scale), int(fuse_parts),
        None if pmask is None else pmask.data_ptr(),
        (ctypes.c_int64 * 2)(*(pmask.stride() if pmask is not None else (0, 0))),
        None if prefix_index is None else prefix_index.data_ptr(),
        int(prefix_index is not None and prefix_index.dtype == torch.int64),
        0 if prefix_index is None else prefix_index.stride(0),
        gws.data_ptr(),
    )
    err = dll.spd_launch(ctypes.byref(problem), ctypes.byref(plan), ctypes.byref(args), None)
    if err != 0:
        raise RuntimeError(f"launch failed: {dll.spd_error_string(err).decode()}")
    return out, lse
