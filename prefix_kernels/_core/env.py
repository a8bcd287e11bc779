"""Every environment variable the package reads, and how it reads them.

Each is read where it acts, when it acts (a test or a user may set it mid-process); this module
only names them, says what they do (`prefix-kernels info` prints it) and parses them one way.
"""

from __future__ import annotations

import os

BACKEND = "PREFIX_KERNELS_BACKEND"
DISABLE_CUDA = "PREFIX_KERNELS_DISABLE_CUDA"
DISABLE_CPU_KERNEL = "PREFIX_KERNELS_DISABLE_CPU_KERNEL"
COMPOSED_KERNELS = "PREFIX_KERNELS_COMPOSED_KERNELS"
CACHE = "PREFIX_KERNELS_CACHE"
VERBOSE_BUILD = "PREFIX_KERNELS_VERBOSE_BUILD"
COMMIT = "PREFIX_KERNELS_COMMIT"
GPU_EXAMPLES = "PREFIX_KERNELS_GPU_EXAMPLES"
TRITON_INTERPRET = "TRITON_INTERPRET"
TORCH_CUDA_ARCH_LIST = "TORCH_CUDA_ARCH_LIST"

# What each PREFIX_KERNELS_* variable does (the benchmarks and the tests read the last two).
DESCRIPTIONS = {
    BACKEND: "overrides backend='auto'",
    DISABLE_CUDA: "CUDA decode backend off when not '' or '0'",
    DISABLE_CPU_KERNEL: "float32 CPU kernel off when not '' or '0'",
    COMPOSED_KERNELS: "composed backend: vendor kernels to try, comma separated, best first",
    CACHE: "build cache folder",
    VERBOSE_BUILD: "compiler commands shown",
    COMMIT: "benchmarks: commit written into rows",
    GPU_EXAMPLES: "tests: draws per GPU fuzz test",
}


def value(name: str) -> str:
    """The variable's value, stripped; "" when unset."""
    return os.environ.get(name, "").strip()


def flag(name: str) -> bool:
    """A switch: on when set to anything but "" and "0"."""
    return value(name) not in ("", "0")


def truthy(text: str) -> bool:
    """Triton's reading of a boolean variable (its getenv_bool): 1, true, on, yes, any case."""
    return text.strip().lower() in ("1", "true", "on", "yes")


def triton_interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter, read as Triton reads it. Triton decides
    when a kernel is decorated, so what counts for our kernels is this value when they were
    imported (backends.triton.INTERPRETED)."""
    return truthy(os.environ.get(TRITON_INTERPRET, ""))


def unknown_names(environ=None) -> list:
    """PREFIX_KERNEL* variables that are set but that nothing reads (misspelt names)."""
    environ = os.environ if environ is None else environ
    return sorted(n for n in environ if n.startswith("PREFIX_KERNEL") and n not in DESCRIPTIONS)
