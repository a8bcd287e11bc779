"""Just-in-time build of the CUDA sources in csrc/ (the shared-prefix decode kernels).

Nothing here runs at import. The first call of `ensure_loaded` (made by `decode_reasons` for a
case the kernels can take, or by the op itself) compiles csrc/shared_prefix_decode.cu and
csrc/torch_binding.cpp with torch.utils.cpp_extension.load into a cache directory and loads the
library, which registers torch.ops.prefix_kernels_cuda.decode. Later processes load the cached
library in well under a second.

Cache:   $PREFIX_KERNELS_CACHE (default $XDG_CACHE_HOME/prefix_kernels, else ~/.cache/prefix_kernels)
         / <package version> / <GPU arch, e.g. sm_90> / <torch version and CUDA version>
Lock:    fcntl.flock on <cache dir>/build.lock around the build, so concurrent processes (several
         ranks, several test workers) build once; the kernel releases it if a builder dies.
Arch:    TORCH_CUDA_ARCH_LIST when set (torch turns it into -gencode flags; the cache directory is
         named after it), else the compute capability of every visible GPU.
Off:     PREFIX_KERNELS_DISABLE_CUDA=1 (anything but "" and "0") turns the CUDA backend off.
Verbose: PREFIX_KERNELS_VERBOSE_BUILD=1 shows the compiler commands.

A failed build is reported once per process as a logging warning on the "prefix_kernels" logger
and kept as a one-line reason (the first compiler error); the full log is written to
<cache dir>/build-error.log. It is retried in the next process, never in the same one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import struct
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

logger = logging.getLogger("prefix_kernels")

ENV_DISABLE = "PREFIX_KERNELS_DISABLE_CUDA"
ENV_CACHE = "PREFIX_KERNELS_CACHE"
ENV_VERBOSE = "PREFIX_KERNELS_VERBOSE_BUILD"
ENV_ARCH_LIST = "TORCH_CUDA_ARCH_LIST"

EXTENSION = "prefix_kernels_cuda"  # also the TORCH_LIBRARY namespace of csrc/torch_binding.cpp
SOURCES = ("shared_prefix_decode.cu", "torch_binding.cpp")
HEADERS = ("shared_prefix_decode.h", "shared_prefix_decode.cuh")


class BuildError(RuntimeError):
    """Why the extension could not be built or loaded (one line)."""


def disabled() -> bool:
    """True when PREFIX_KERNELS_DISABLE_CUDA is set to anything but "" or "0"."""
    return os.environ.get(ENV_DISABLE, "").strip() not in ("", "0")


def package_version() -> str:
    pkg = sys.modules.get("prefix_kernels")
    version = getattr(pkg, "__version__", None)
    if version is None:  # prefix_kernels/__init__.py is still executing (or was bypassed)
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("prefix-kernels")
        except Exception:
            version = "unknown"
    return str(version)


def csrc_dir(names=SOURCES + HEADERS) -> Optional[Path]:
    """Where the C++/CUDA sources `names` are: prefix_kernels/_csrc in an installed wheel (setup.py
    copies csrc/ there), else csrc/ of the source checkout this package is imported from."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "_csrc", here.parent.parent / "csrc"):
        if all((candidate / name).is_file() for name in names):
            return candidate
    return None


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


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "none"


def arch_list() -> list[str]:
    """Compute capabilities to build for, as "8.0", "9.0a", "8.6+PTX" (TORCH_CUDA_ARCH_LIST's
    entries when set, else every visible GPU's capability). Queries the GPU when the variable is
    unset: call it only when a CUDA tensor is at hand."""
    env = os.environ.get(ENV_ARCH_LIST, "").strip()
    if env and env != "native":
        return [a for a in re.split(r"[;\s,]+", env) if a]
    import torch

    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"{major}.{minor}" for major, minor in caps]


def arch_tag(archs: list[str]) -> str:
    """Directory name of an arch list: ["9.0"] -> "sm_90", ["8.0", "9.0a"] -> "sm_80-sm_90a"."""
    tags = []
    for a in archs:
        a = a.strip()
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", a, flags=re.IGNORECASE)
        if m:
            tags.append(f"sm_{m.group(1)}{m.group(2)}{m.group(3)}" + ("+ptx" if m.group(4) else ""))
        else:
            tags.append(_sanitize(a))
    return "-".join(tags) if tags else "sm_none"


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc -gencode flags for arch strings like "9.0" / "9.0a" / "8.6+PTX"."""
    flags = []
    for a in archs:
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", a.strip(), flags=re.IGNORECASE)
        if not m:
            continue
        cc = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prefix_kernels"


def torch_tag() -> str:
    import torch

    return _sanitize(f"torch{torch.__version__}-cuda{torch.version.cuda or 'none'}")


def cache_dir(arch: str) -> Path:
    """<root>/<package version>/<arch tag>/<torch tag>: a library is reused only by the same
    package version, GPU architecture and torch build (the extension ABI is torch's)."""
    return cache_root() / _sanitize(package_version()) / _sanitize(arch) / torch_tag()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive fcntl.flock on `path` (created if missing), held for the `with` body. Separate
    processes and separate threads (each opens its own file description) exclude each other; the
    operating system releases the lock when its holder dies. A wait is announced: another
    process's build takes a minute, and a silent wait looks like a hang."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("prefix_kernels: waiting for the build lock %s (another process is building there)", path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def first_error_line(text: str) -> str:
    """The line of a build log that says what went wrong (the first compiler error), else its
    first non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Error building extension"):
            continue
        if re.search(r"(^|[\s:])(fatal )?error([:\s]|$)", ln, flags=re.IGNORECASE):
            return ln
    first = lines[0] if lines else ""
    return first.split(": [", 1)[0] if first.startswith("Error building extension") else first


def _op_registered() -> bool:
    import torch

    try:
        return hasattr(torch.ops, EXTENSION) and hasattr(getattr(torch.ops, EXTENSION), "decode")
    except Exception:
        return False


def damaged_library(path: Path) -> Optional[str]:
    """Why the shared library at `path` cannot be mapped safely, or None if it looks whole.

    dlopen maps each loadable segment from the file: a segment that runs past the end of a
    truncated file is a SIGBUS when touched, not an error (a cached .so cut to 64 KiB killed every
    later process, `prefix-kernels info` included). Checked from the ELF headers (64-bit,
    little-endian: what torch builds on Linux x86-64 and aarch64)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable ({exc})"
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return f"not an ELF library ({len(data)} bytes)"
    if data[4] != 2 or data[5] != 1:
        return None  # not 64-bit little-endian: left to dlopen
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
        return f"truncated: its headers run past its {len(data)} bytes"
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_offset + p_filesz > len(data):  # PT_LOAD
            return f"truncated: a segment ends at byte {p_offset + p_filesz}, the file has {len(data)}"
    return None


def load_locked(directory: Path, **load_kwargs) -> None:
    """torch.utils.cpp_extension.load(**load_kwargs) into `directory`, holding its build lock, as a
    library that registers ops (no Python module). A cached library that is damaged is removed
    first, so that it is built again. A failure raises BuildError with the first compiler error
    (or the loader's) and writes the whole log to <directory>/build-error.log."""
    from torch.utils import cpp_extension

    held = contextlib.ExitStack()
    try:
        held.enter_context(file_lock(directory / "build.lock"))
    except OSError as exc:  # e.g. a read-only cache
        raise BuildError(f"cannot lock the build cache {directory} (it must be writable): {exc}") from exc
    with held:
        # Holding our lock, nobody else builds here: a "lock" file of torch's own FileBaton can
        # only be left over from a builder that was killed, and would make load() wait forever.
        stale = directory / "lock"
        if stale.exists():
            stale.unlink()
        library = directory / f"{load_kwargs['name']}.so"
        damage = damaged_library(library) if library.exists() else None
        if damage:
            logger.warning("prefix_kernels: the cached %s is damaged (%s): building it again", library, damage)
            library.unlink()
        try:
            cpp_extension.load(
                build_directory=str(directory),
                is_python_module=False,
                verbose=os.environ.get(ENV_VERBOSE, "").strip() not in ("", "0"),
                **load_kwargs,
            )
        except Exception as exc:
            # torch's "Could not load this library" keeps dlopen's reason in __cause__ only
            cause = f"{type(exc.__cause__).__name__}: {exc.__cause__}" if exc.__cause__ else ""
            try:
                (directory / "build-error.log").write_text("\n".join(filter(None, (str(exc), cause))))
            except OSError:
                pass
            raise BuildError(f"build failed: {first_error_line(str(exc))}" + (f"; {cause}" if cause else "")
                             + f" (full log: {directory / 'build-error.log'})") from exc


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        raise BuildError("CUDA sources not found (neither prefix_kernels/_csrc nor the checkout's csrc/)")
    if find_nvcc() is None:
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja not found; torch's extension builder needs it (pip install ninja)")
    archs = arch_list()
    if not archs:
        raise BuildError("no CUDA device visible and TORCH_CUDA_ARCH_LIST unset: no architecture to build for")
    directory = cache_dir(arch_tag(archs))
    directory.mkdir(parents=True, exist_ok=True)
    cuda_flags = ["-O3", "-lineinfo"]
    if not os.environ.get(ENV_ARCH_LIST, "").strip():
        cuda_flags += gencode_flags(archs)  # else torch derives -gencode from TORCH_CUDA_ARCH_LIST
    load_locked(
        directory,
        name=EXTENSION,
        sources=[str(src / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=cuda_flags,
        extra_include_paths=[str(src)],
    )
    if not _op_registered():
        raise BuildError("the built library did not register torch.ops.prefix_kernels_cuda.decode")


_state_lock = threading.Lock()
_loaded = False
_error: Optional[str] = None


def ensure_loaded() -> Optional[str]:
    """Build (or take from the cache) and load the extension, once per process.

    Returns None when torch.ops.prefix_kernels_cuda.decode is available, else a one-line reason.
    Never raises; the first failure is logged as a warning, later calls return the same reason.
    """
    global _loaded, _error
    with _state_lock:
        if _loaded:
            return None
        if _error is not None:
            return _error
        if _op_registered():  # loaded by someone else in this process
            _loaded = True
            return None
        try:
            _build_and_load()
            _loaded = True
        except Exception as exc:  # BuildError, or anything the toolchain raises
            reason = str(exc) if isinstance(exc, BuildError) else f"build failed: {type(exc).__name__}: {first_error_line(str(exc))}"
            _error = reason
            logger.warning("prefix_kernels: CUDA decode kernels unavailable, other backends will be used: %s", reason)
        return _error


def reset_for_tests() -> None:
    """Forget this process's build outcome (tests only)."""
    global _loaded, _error
    with _state_lock:
        _loaded = False
        _error = None
