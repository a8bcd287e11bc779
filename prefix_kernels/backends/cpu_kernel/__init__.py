"""The one-pass CPU kernel (csrc/prefix_attention_cpu.cpp): float32 CPU tensors, forward and backward.

Each query row reads its prefix and its own keys in one pass (prefix_mask, kv_mask and causal
masking applied in that pass; a padded prefix's keys outside its visible span are not read); the prefix gradient is summed in
one partial per thread and reduced in a fixed order. Its matrix products use MKL's SGEMM, which
torch's x86-64 wheels export, and a plain loop elsewhere.

Built just in time by prefix_kernels.jit on the first float32 CPU call (about 10-15 s on 2 cores,
announced once; no pybind11, so the build is short) and loaded, which registers
torch.ops.prefix_kernels_cpu.fwd / .bwd. Nothing happens at import. Where the build is impossible
(no compiler, no ninja) the backend declines with the reason, and the torch split path runs.

Cache:   prefix_kernels.jit's cache / <package version> / cpu-<ATen CPU capability> / <torch tag>
Off:     PREFIX_KERNELS_DISABLE_CPU_KERNEL=1 (anything but "" and "0").
Flags:   -O3 -fno-math-errno -fno-trapping-math (so the exp and softmax loops vectorise; neither
         changes NaN or Inf results), plus -mavx2 -mfma where ATen reports AVX2 or AVX512.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import torch

from ... import jit
from ..._core import env
from ..._core.problem import Problem
from ..base import Backend, functions_of

NAME = "cpu_kernel"
EXTENSION = "prefix_kernels_cpu"  # the TORCH_LIBRARY namespace of the source
SOURCE = "prefix_attention_cpu.cpp"
ENV_DISABLE = env.DISABLE_CPU_KERNEL


def disabled() -> bool:
    return env.flag(ENV_DISABLE)


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return "DEFAULT"


def _arch_flags(capability: str) -> list[str]:
    return ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []


def _registered() -> bool:
    return jit.op_registered(EXTENSION, "fwd")


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    src = jit.csrc_dir((SOURCE,))
    if src is None:
        raise jit.BuildError(f"{SOURCE} not found (neither prefix_kernels/_csrc nor the checkout's csrc/)")
    if not cpp_extension.is_ninja_available():
        raise jit.BuildError("ninja not found; torch's extension builder needs it (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")  # what torch's builder calls
    if shutil.which(compiler) is None:
        raise jit.BuildError(f"no C++ compiler: {compiler!r} not found (install g++, or set CXX)")
    capability = _capability()
    directory = jit.cache_dir(f"cpu-{capability}")
    directory.mkdir(parents=True, exist_ok=True)
    jit.load_locked(
        directory,
        announce="building the float32 CPU kernel with the C++ compiler (about 15 s)",
        name=EXTENSION,
        sources=[str(src / SOURCE)],
        extra_cflags=["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", *_arch_flags(capability)],
        extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP in the headers
    )
    if not _registered():
        raise jit.BuildError(f"the built library did not register torch.ops.{EXTENSION}.fwd")


_BUILD = jit.OnceBuild(lambda: _build_and_load(), lambda: _registered(),
                       "one-pass CPU kernel unavailable, the split CPU path is used")


def unavailable() -> Optional[str]:
    """None when torch.ops.prefix_kernels_cpu is loaded (built now, or taken from the cache), else
    why not, in one line. Builds at most once per process; never raises."""
    if disabled():  # checked on every call, so it also acts after a build
        return f"disabled by {ENV_DISABLE}={os.environ.get(ENV_DISABLE)}"
    return _BUILD.ensure()


@torch.compiler.assume_constant_result
def _unavailable_constant() -> str:
    return unavailable() or ""


def reasons(p: Problem) -> list[str]:
    """Why the kernel cannot take this case ([]: it can)."""
    out = []
    if p.device.type != "cpu":
        out.append(f"CPU tensors only, got {p.device.type}")
    if p.dtype != torch.float32:
        out.append(f"float32 only, got {p.dtype}")
    if out:
        return out
    why = _unavailable_constant() if torch.compiler.is_compiling() else unavailable()
    return [why] if why else []


def _blas_rows(x):
    """x with a contiguous last dim and rows that do not overlap (a BLAS leading dimension >= D),
    copied only where it has neither (transformers' views and this package's layouts have both)."""
    if x.stride(-1) == 1 and (x.shape[2] <= 1 or x.stride(2) >= x.shape[3]):
        return x
    return x.contiguous()


def _ops():
    """torch.ops.prefix_kernels_cpu, built first if no call has built it yet."""
    why = unavailable()
    if why:
        raise RuntimeError(f"prefix_kernels: the one-pass CPU kernel is unavailable: {why}")
    return torch.ops.prefix_kernels_cpu


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal: bool, scale: float, prefix_mask=None):
    """out (B, Hq, Lq, D) float32 and the natural-log lse (B, Hq, Lq). prefix_mask (G, P) bool, when
    given: prefix key j of prefix g is visible iff prefix_mask[g, j] (a row that sees no key gets
    out 0 and lse -inf)."""
    return _ops().fwd(
        *(_blas_rows(t) for t in (q, k, v, prefix_k, prefix_v)),
        None if prefix_index is None else prefix_index.long(), kv_mask, bool(causal), float(scale), prefix_mask)


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
             prefix_mask=None):
    """(dq, dk, dv, dprefix_k, dprefix_v), the prefix gradients reduced over the batch (exactly 0
    for the prefix keys prefix_mask hides)."""
    return _ops().bwd(
        _blas_rows(dout.to(q.dtype)), dlse, *(_blas_rows(t) for t in (q, k, v, prefix_k, prefix_v)),
        None if prefix_index is None else prefix_index.long(), kv_mask, _blas_rows(out), lse,
        bool(causal), float(scale), prefix_mask)


decode_forward = forward  # the same kernel serves a decode step

BACKEND = Backend(NAME, "torch", function=functions_of(sys.modules[__name__]), train_reasons=reasons,
                  decode_reasons=reasons)
