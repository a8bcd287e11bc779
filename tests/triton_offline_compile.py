"""Compiles every Triton kernel for a GPU architecture on a machine without a GPU.

The interpreter (the CPU test lane) runs the kernels' arithmetic but not Triton's compiler: a
kernel can pass every interpreted test and still fail to compile for a GPU (a layout the
backend rejects, a dtype mix tl.dot refuses), or compile to more shared memory than the card
has, so that its first launch fails. This script runs the real launchers (the same block sizes,
splits and constexprs a GPU run would pick: `tiles.on_gpu` is made to say yes) on small CPU
tensors, with a stand-in Triton driver that reports the target architecture, and compiles each
launch to a cubin with the wheel's own ptxas instead of launching it. Nothing here needs or
touches a GPU.

Run it in a process where TRITON_INTERPRET is unset (kernels decide at import whether they are
interpreted):

    python tests/triton_offline_compile.py --arch 90 --out compiled.json

It prints one JSON object: the triton version and, per launch, the kernel, its constexprs, the
shared memory the compiled kernel asks for, its registers and its stack bytes per thread
(spilled registers live there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET unset: interpreted kernels are not compiled")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction, MockTensor

# Multiprocessor counts of the cards the launchers size their splits for (the split count is
# a runtime argument, so the count only changes which grids are built, not what compiles).
SM_COUNT = {80: 108, 90: 132}
# Dynamic shared memory a block may opt into: A100 163 KB, H100 227 KB (CUDA programming
# guide, compute capability table).
MAX_SHARED = {80: 166912, 90: 232448}


class _OfflineDriver:
    """The three calls JITFunction.run makes before it compiles; launching is never reached."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _install(capability: int, compiled: list):
    """Routes every kernel[grid](...) to a compile-only run that records what it built."""
    driver.set_active(_OfflineDriver(capability))
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
        compiled.append((self.__name__, constexprs, kwargs.get("num_warps"), kwargs.get("num_stages"), kernel))
        return kernel

    JITFunction.run = compile_only


def _cubin_usage(kernel) -> dict:
    """Registers per thread and stack bytes per thread (register spills land on the stack) of
    the cubin Triton built, read with the wheel's own cuobjdump."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = Path(get_ptxas(kernel.metadata.target.arch).path).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", out).group(1)),
            "stack_bytes": int(re.search(r"STACK:(\d+)", out).group(1))}


ALL_ON = dict(pidx=True, mask=True, causal=True, prefix_mask=True)
# Every flag but prefix_mask: the unmasked kernels as they were before HAS_PREFIX_MASK existed.
NO_PREFIX_MASK = dict(ALL_ON, prefix_mask=False)
ALL_OFF = dict(pidx=False, mask=False, causal=False, prefix_mask=False)


def _training_cases():
    """(dtype, D, flags): every block-size branch of tiles.blocks (D = 80 is padded to a
    128-wide block), each with every constexpr flag on (prefix_mask too: the heaviest variant),
    one with every flag but prefix_mask, and one with them all off."""
    for dtype, D in itertools.product((torch.float16, torch.bfloat16, torch.float32), (16, 64, 80, 128, 256)):
        yield dtype, D, ALL_ON
    yield torch.bfloat16, 128, NO_PREFIX_MASK
    yield torch.bfloat16, 128, ALL_OFF


def _decode_cases():
    """(dtype, D, Lq, flags): the decode tiles follow the forward's, and Lq sets the own
    kernel's row block (group * Lq rows: 4 and 64 here)."""
    for dtype, D in itertools.product((torch.float16, torch.bfloat16, torch.float32), (16, 64, 128, 256)):
        for Lq in (1, 16):
            yield dtype, D, Lq, ALL_ON
    yield torch.bfloat16, 128, 4, NO_PREFIX_MASK
    yield torch.bfloat16, 128, 4, ALL_OFF


# The own cache's length for the fused-merge variant (decode_own_kernel with MERGE): at most 128
# keys is one own split on a GPU (tiles.MIN_KEYS_PER_SPLIT), which FUSE_MERGE needs; 300 keys
# (the other decode launches) are split two or three ways, which keeps the merge launch.
MERGE_T = 100


def _merge_heads(Lq):
    """Query heads (of 2 kv heads) for the fused-merge compiles at Lq: the decode cases' 8, and at
    Lq = 16 also 4 (32-row blocks: the largest tiles.merge_fits lets merge at D = 128; 64 rows,
    as with 8 heads, keep the merge launch there)."""
    return (8, 4) if Lq == 16 else (8,)


def _fused_case(dtype, D, flags) -> bool:
    """Which decode cases also compile the fused launch (decode_parts_kernel): bf16 at every
    head dim, fp32 at D = 128 and the flags-off case; a subset, as each costs ~1.6 s a compile."""
    return dtype == torch.bfloat16 or (dtype == torch.float32 and D == 128)


def _inputs(dtype, D, Lq, Lk, flags, *, B=4, Hq=8, Hkv=2, P=300, G=2):
    dev = "cpu"
    q = torch.empty(B, Lq, Hq, D, dtype=dtype, device=dev).transpose(1, 2)
    k = torch.empty(B, Lk, Hkv, D, dtype=dtype, device=dev).transpose(1, 2)
    v = torch.empty_like(k)
    pk = torch.empty(G, Hkv, P, D, dtype=dtype, device=dev)
    pv = torch.empty_like(pk)
    pidx = torch.zeros(B, dtype=torch.long, device=dev) if flags["pidx"] else None
    mask = torch.ones(B, Lk, dtype=torch.bool, device=dev) if flags["mask"] else None
    # The launchers receive prefix_mask only when there is one, as a keyword (ops._masked).
    extra = {"prefix_mask": torch.ones(G, P, dtype=torch.bool, device=dev)} if flags["prefix_mask"] else {}
    return q, k, v, pk, pv, pidx, mask, extra


def run(capability: int) -> dict:
    from prefix_kernels.backends.triton import decode, tiles
    from prefix_kernels.backends.triton import train as attention

    compiled: list = []
    _install(capability, compiled)
    tiles.on_gpu = lambda device: True
    tiles.sm_count = lambda device: SM_COUNT[capability]
    for dtype, D, flags in _training_cases():
        q, k, v, pk, pv, pidx, mask, extra = _inputs(dtype, D, 200, 200, flags)
        out, lse = attention.forward(q, k, v, pk, pv, pidx, mask, flags["causal"], D ** -0.5, **extra)
        attention.backward(torch.empty_like(out), None, q, k, v, pk, pv, pidx, mask, flags["causal"],
                           D ** -0.5, out, lse, **extra)
    for dtype, D, Lq, flags in _decode_cases():
        q, k, v, pk, pv, pidx, mask, extra = _inputs(dtype, D, Lq, 300, flags)
        # The three launches (the merge in a launch of its own), whatever the own splits.
        decode.forward(q, k, v, pk, pv, pidx, mask, flags["causal"], D ** -0.5, fuse_merge=False, **extra)
        if _fused_case(dtype, D, flags):
            decode.forward(q, k, v, pk, pv, pidx, mask, flags["causal"], D ** -0.5, fuse_parts=True, **extra)
        # One own split: the own kernel merges (MERGE) where the row block fits (the default
        # serving path), else the three launches.
        for Hq in _merge_heads(Lq):
            q, k, v, pk, pv, pidx, mask, extra = _inputs(dtype, D, Lq, MERGE_T, flags, Hq=Hq)
            decode.forward(q, k, v, pk, pv, pidx, mask, flags["causal"], D ** -0.5, fuse_merge=True, **extra)
    from prefix_kernels.backends.vendor import merge_kernel  # the composed backend's merge

    for dtype, D in itertools.product((torch.float16, torch.bfloat16, torch.float32), (64, 128, 256)):
        q = torch.empty(4, 200, 8, D, dtype=dtype).transpose(1, 2)
        lse = torch.empty(4, 8, 200, dtype=torch.float32)
        merge_kernel.merge(q, q, lse, q, lse)
    rows, seen = [], set()
    for name, constexprs, warps, stages, kernel in compiled:
        if id(kernel) in seen:  # the same specialisation again (the JIT cache returned it)
            continue
        seen.add(id(kernel))
        rows.append({"kernel": name, "constexprs": {k: str(v) for k, v in constexprs.items()},
                     "num_warps": warps, "num_stages": stages,
                     "shared_bytes": kernel.metadata.shared, "max_shared_bytes": MAX_SHARED[capability],
                     **_cubin_usage(kernel)})
    return {"triton": triton.__version__, "torch": torch.__version__, "capability": capability,
            "commit": _commit(), "launches": rows}


# What the candidates' search keeps: no more shared memory than the card has and at most this
# many stack bytes per thread (tests/test_triton_gpu_compile.py's limit for the defaults).
STACK_LIMIT = 256
KIND_OF = {"shared_prefix_fwd_kernel": "forward", "shared_prefix_bwd_dq_kernel": "dq",
           "shared_prefix_bwd_own_dkdv_kernel": "dkdv", "shared_prefix_bwd_prefix_dkdv_kernel": "dkdv"}


def run_candidates(capability: int) -> dict:
    """Compile every tile candidate (tiles.CANDIDATES) of the forward, dq and dK/dV launches at
    each head-dim block, with every constexpr flag on (the heaviest variant), and keep those
    that fit: {"capability", "allowed": {"<dtype class>/<block_d>/<kind>": [[m, n, warps,
    stages], ...]}, "rejected": {key: ["m,n,w,s: why", ...]}}."""
    from prefix_kernels.backends.triton import tiles
    from prefix_kernels.backends.triton import train as attention

    compiled: list = []
    _install(capability, compiled)
    tiles.on_gpu = lambda device: True
    tiles.sm_count = lambda device: SM_COUNT[capability]
    default_kernel_blocks = tiles.kernel_blocks
    allowed, rejected = {}, {}
    for dtype, D in itertools.product((torch.bfloat16, torch.float32), (64, 128, 256)):
        cls = tiles.dtype_class(dtype)
        lists = tiles.CANDIDATES[cls]
        for i in range(max(map(len, lists.values()))):
            def pick(kind, D_, dtype_, device, i=i):
                options = lists[kind]
                return tiles.Blocks(*options[i]) if i < len(options) else default_kernel_blocks(kind, D_, dtype_, device)
            tiles.kernel_blocks = pick
            compiled.clear()
            q, k, v, pk, pv, pidx, mask, extra = _inputs(dtype, D, 300, 300, ALL_ON)
            out, lse = attention.forward(q, k, v, pk, pv, pidx, mask, True, D ** -0.5, **extra)
            attention.backward(torch.empty_like(out), None, q, k, v, pk, pv, pidx, mask, True, D ** -0.5, out, lse,
                               **extra)
            verdict = {}
            for name, constexprs, warps, stages, kernel in compiled:
                kind = KIND_OF.get(name)
                if kind is None or i >= len(lists[kind]):
                    continue
                usage = _cubin_usage(kernel)
                why = []
                if kernel.metadata.shared > MAX_SHARED[capability]:
                    why.append(f"shared memory {kernel.metadata.shared} B > {MAX_SHARED[capability]}")
                if usage["stack_bytes"] > STACK_LIMIT:
                    why.append(f"{name}: stack {usage['stack_bytes']} B/thread (spills)")
                verdict.setdefault(kind, []).extend(why)
            for kind, why in verdict.items():
                key = f"{cls}/{tiles.block_d(D)}/{kind}"
                config = list(lists[kind][i])
                if why:
                    rejected.setdefault(key, []).append(",".join(map(str, config)) + ": " + "; ".join(why))
                else:
                    allowed.setdefault(key, []).append(config)
    tiles.kernel_blocks = default_kernel_blocks
    return {"capability": capability, "triton": triton.__version__, "allowed": allowed, "rejected": rejected}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, choices=sorted(SM_COUNT), required=True, help="compute capability x10")
    ap.add_argument("--out", type=Path, help="write the JSON here as well as to stdout")
    ap.add_argument("--candidates", action="store_true",
                    help="compile the tile candidates (tiles.CANDIDATES) instead, and say which fit")
    args = ap.parse_args(argv)
    result = run_candidates(args.arch) if args.candidates else run(args.arch)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
