"""Just-in-time build of the one-pass CPU kernel (csrc/prefix_attention_cpu.cpp), float32.

The torch backend calls `available()` for float32 CPU tensors; the first call compiles the source
with the host C++ compiler (about 10 s on 2 cores; no pybind11, so the build is short) into a
cache directory and loads it, which registers torch.ops.prefix_kernels_cpu.fwd / .bwd. Nothing
happens at import. Where the build is impossible (no compiler, no ninja) the torch backend keeps
its split path through ATen's fused kernel, with a one-time warning.

Cache:   the CUDA build's root (see cuda/build.py: $PREFIX_KERNELS_CACHE, else
         $XDG_CACHE_HOME/prefix_kernels, else ~/.cache/prefix_kernels)
         / <package version> / cpu-<ATen CPU capability> / <torch version>
Lock:    the same fcntl lock file scheme as the CUDA build.
Off:     PREFIX_KERNELS_DISABLE_CPU_KERNEL=1 (anything but "" and "0").
Flags:   -O3 -fno-math-errno -fno-trapping-math (so the exp and softmax loops vectorise; neither
         changes NaN or Inf results), plus -mavx2 -mfma where ATen reports AVX2 or AVX512.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from typing import Optional

from .cuda import build as _build

logger = logging.getLogger("prefix_kernels")

ENV_DISABLE = "PREFIX_KERNELS_DISABLE_CPU_KERNEL"
EXTENSION = "prefix_kernels_cpu"  # the TORCH_LIBRARY namespace of the source
SOURCE = "prefix_attention_cpu.cpp"

_lock = threading.Lock()
_loaded = False
_error: Optional[str] = None


def disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip() not in ("", "0")


def _capability() -> str:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return "DEFAULT"


def _arch_flags(capability: str) -> list[str]:
    return ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []


def _registered() -> bool:
    import torch

    try:
        return hasattr(torch.ops, EXTENSION) and hasattr(getattr(torch.ops, EXTENSION), "fwd")
    except Exception:
        return False


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    src = _build.csrc_dir((SOURCE,))
    if src is None:
        raise _build.BuildError(f"{SOURCE} not found (neither prefix_kernels/_csrc nor the checkout's csrc/)")
    if not cpp_extension.is_ninja_available():
        raise _build.BuildError("ninja not found; torch's extension builder needs it (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")  # what torch's builder calls
    if shutil.which(compiler) is None:
        raise _build.BuildError(f"no C++ compiler: {compiler!r} not found (install g++, or set CXX)")
    capability = _capability()
    directory = _build.cache_dir(f"cpu-{capability}")
    directory.mkdir(parents=True, exist_ok=True)
    _build.load_locked(
        directory,
        name=EXTENSION,
        sources=[str(src / SOURCE)],
        extra_cflags=["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", *_arch_flags(capability)],
        extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP in the headers
    )
    if not _registered():
        raise _build.BuildError(f"the built library did not register torch.ops.{EXTENSION}.fwd")


def unavailable() -> Optional[str]:
    """None when torch.ops.prefix_kernels_cpu is loaded (built now, or taken from the cache), else
    why not, in one line. Builds at most once per process; never raises; the first failure is
    logged as a warning."""
    global _loaded, _error
    if disabled():  # checked on every call, so it also acts after a build
        return f"disabled by {ENV_DISABLE}={os.environ.get(ENV_DISABLE)}"
    if _loaded:
        return None
    with _lock:
        if _loaded or _error is not None:
            return _error
        if _registered():
            _loaded = True
            return None
        try:
            _build_and_load()
            _loaded = True
        except Exception as exc:
            _error = str(exc) if isinstance(exc, _build.BuildError) else (
                f"build failed: {type(exc).__name__}: {_build.first_error_line(str(exc))}")
            logger.warning("prefix_kernels: one-pass CPU kernel unavailable, the split CPU path is used: %s", _error)
        return _error
