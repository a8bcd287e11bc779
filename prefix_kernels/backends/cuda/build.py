"""Just-in-time build of the CUDA decode kernels (csrc/shared_prefix_decode.cu + torch_binding.cpp).

Nothing here runs at import. The first call of `ensure_loaded` (made by the backend's reasons for
a case the kernels can take, or by the op itself) compiles the sources with the shared helper in
prefix_kernels.jit (cache, lock, build once) and loads the library, which registers
torch.ops.prefix_kernels_cuda.decode. Later processes load the cached library in well under a
second.

Cache:   prefix_kernels.jit's cache / <package version> / <GPU arch, e.g. sm_90> / <torch tag>
Arch:    TORCH_CUDA_ARCH_LIST when set (torch turns it into -gencode flags; the cache directory is
         named after it), else the compute capability of every visible GPU.
Off:     PREFIX_KERNELS_DISABLE_CUDA=1 (anything but "" and "0") turns the CUDA backend off.

A failed build is reported once per process as a logging warning on the "prefix_kernels" logger
and kept as a one-line reason (the first compiler error); the full log is written to
<cache dir>/build-error.log. It is retried in the next process, never in the same one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ... import jit
from ..._core import env

EXTENSION = "prefix_kernels_cuda"  # also the TORCH_LIBRARY namespace of csrc/torch_binding.cpp
SOURCES = ("shared_prefix_decode.cu", "torch_binding.cpp")
HEADERS = ("shared_prefix_decode.h", "shared_prefix_decode.cuh")


def disabled() -> bool:
    """True when PREFIX_KERNELS_DISABLE_CUDA is set to anything but "" or "0"."""
    return env.flag(env.DISABLE_CUDA)


def find_nvcc() -> Optional[str]:
    """The nvcc torch's extension builder will use: $CUDA_HOME/bin/nvcc (torch's CUDA_HOME
    search: CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda), else nvcc on PATH."""
    try:
        from torch.utils import cpp_extension

        home = cpp_extension.CUDA_HOME
    except Exception:
        home = None
    candidates = []
    if home:
        candidates.append(Path(home) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def arch_list() -> list[str]:
    """Compute capabilities to build for, as "8.0", "9.0a", "8.6+PTX" (TORCH_CUDA_ARCH_LIST's
    entries when set, else every visible GPU's capability). Queries the GPU when the variable is
    unset: call it only when a CUDA tensor is at hand."""
    listed = env.value(env.TORCH_CUDA_ARCH_LIST)
    if listed and listed != "native":
        return [a for a in re.split(r"[;\s,]+", listed) if a]
    import torch

    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"{major}.{minor}" for major, minor in caps]


_ARCH = re.compile(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", flags=re.IGNORECASE)


def arch_tag(archs: list[str]) -> str:
    """Directory name of an arch list: ["9.0"] -> "sm_90", ["8.0", "9.0a"] -> "sm_80-sm_90a"."""
    tags = []
    for a in archs:
        m = _ARCH.fullmatch(a.strip())
        if m:
            tags.append(f"sm_{m.group(1)}{m.group(2)}{m.group(3)}" + ("+ptx" if m.group(4) else ""))
        else:
            tags.append(jit.sanitize(a))
    return "-".join(tags) if tags else "sm_none"


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc -gencode flags for arch strings like "9.0" / "9.0a" / "8.6+PTX"."""
    flags = []
    for a in archs:
        m = _ARCH.fullmatch(a.strip())
        if not m:
            continue
        cc = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    src = jit.csrc_dir(SOURCES + HEADERS)
    if src is None:
        raise jit.BuildError("CUDA sources not found (neither prefix_kernels/_csrc nor the checkout's csrc/)")
    if find_nvcc() is None:
        raise jit.BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not cpp_extension.is_ninja_available():
        raise jit.BuildError("ninja not found; torch's extension builder needs it (pip install ninja)")
    archs = arch_list()
    if not archs:
        raise jit.BuildError("no CUDA device visible and TORCH_CUDA_ARCH_LIST unset: no architecture to build for")
    directory = jit.cache_dir(arch_tag(archs))
    directory.mkdir(parents=True, exist_ok=True)
    cuda_flags = ["-O3", "-lineinfo"]
    if not env.value(env.TORCH_CUDA_ARCH_LIST):
        cuda_flags += gencode_flags(archs)  # else torch derives -gencode from TORCH_CUDA_ARCH_LIST
    jit.load_locked(
        directory,
        announce="building the CUDA decode kernels with nvcc (about a minute)",
        name=EXTENSION,
        sources=[str(src / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=cuda_flags,
        extra_include_paths=[str(src)],
    )
    if not _registered():
        raise jit.BuildError("the built library did not register torch.ops.prefix_kernels_cuda.decode")


def _registered() -> bool:
    return jit.op_registered(EXTENSION, "decode")


_BUILD = jit.OnceBuild(lambda: _build_and_load(), lambda: _registered(), "CUDA decode kernels unavailable, other backends will be used")


def ensure_loaded() -> Optional[str]:
    """Build (or take from the cache) and load the extension, once per process. None when
    torch.ops.prefix_kernels_cuda.decode is available, else a one-line reason. Never raises."""
    return _BUILD.ensure()


def reset_for_tests() -> None:
    """Forget this process's build outcome (tests only)."""
    _BUILD.reset()
