"""One just-in-time build helper for the package's C++ and CUDA sources (csrc/).

The CPU kernel (backends/cpu_kernel) and the CUDA decode kernels (backends/cuda) are built with
torch.utils.cpp_extension.load the first time a call needs them, into a cache, and loaded as
libraries that register torch ops. This module holds what both builds share:

Cache:   $PREFIX_KERNELS_CACHE (default $XDG_CACHE_HOME/prefix_kernels, else ~/.cache/prefix_kernels)
         / <package version> / <target: "cpu-AVX2", "sm_90", ...> / <torch build tag>
         The torch tag names torch's version, its CUDA version and where this torch is installed:
         two virtual environments with the same torch version build into two folders (a shared
         folder made each rebuild the other's library, since ninja's commands name the
         environment's paths).
Lock:    fcntl.flock on <cache dir>/build.lock around a build, so concurrent processes (several
         ranks, several test workers) build once; the kernel releases it if a builder dies.
Once:    `OnceBuild` keeps a build's outcome for the process: built (or loaded from the cache)
         once, or failed once with a one-line reason that later calls return without retrying.
Verbose: PREFIX_KERNELS_VERBOSE_BUILD=1 shows the compiler commands.
"""

from __future__ import annotations

import contextlib
import hashlib
import fcntl
import logging
import os
import re
import struct
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

from .._core import env as env_names

logger = logging.getLogger("prefix_kernels")



class BuildError(RuntimeError):
    """Why the extension could not be built or loaded (one line)."""


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


def csrc_dir(names) -> Optional[Path]:
    """Where the C++/CUDA sources `names` are: prefix_kernels/_csrc in an installed wheel (setup.py
    copies csrc/ there), else csrc/ of the source checkout this package is imported from."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "_csrc", here.parent.parent / "csrc"):
        if all((candidate / name).is_file() for name in names):
            return candidate
    return None


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "none"


def sanitize(text: str) -> str:
    """text as one folder name."""
    return _sanitize(text)


def cache_root() -> Path:
    env = os.environ.get(env_names.CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prefix_kernels"


def torch_tag() -> str:
    """torch's version and CUDA version, and a short hash of where this torch is installed."""
    import torch

    where = hashlib.sha1(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    return _sanitize(f"torch{torch.__version__}-cuda{torch.version.cuda or 'none'}-{where}")


def cache_dir(target: str) -> Path:
    """<root>/<package version>/<target>/<torch tag>: a library is reused only by the same
    package version, target (CPU capability or GPU architectures) and torch installation (the
    extension ABI is torch's)."""
    return cache_root() / _sanitize(package_version()) / _sanitize(target) / torch_tag()


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


def op_registered(namespace: str, op: str) -> bool:
    """Whether torch.ops.<namespace>.<op> exists (a library that registers it is loaded)."""
    import torch

    try:
        return hasattr(torch.ops, namespace) and hasattr(getattr(torch.ops, namespace), op)
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


def load_locked(directory: Path, announce: str = "", **load_kwargs) -> None:
    """torch.utils.cpp_extension.load(**load_kwargs) into `directory`, holding its build lock, as a
    library that registers ops (no Python module). A cached library that is damaged is removed
    first, so that it is built again. A failure raises BuildError with the first compiler error
    (or the loader's) and writes the whole log to <directory>/build-error.log. `announce`, when
    given, is logged before a build that has no cached library to start from (a build takes
    seconds to minutes, and a silent one looks like a hang)."""
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
        if not library.exists() and announce:
            logger.warning("prefix_kernels: %s (once; cached in %s)", announce, directory)
        damage = damaged_library(library) if library.exists() else None
        if damage:
            logger.warning("prefix_kernels: the cached %s is damaged (%s): building it again", library, damage)
            library.unlink()
        try:
            cpp_extension.load(
                build_directory=str(directory),
                is_python_module=False,
                verbose=env_names.flag(env_names.VERBOSE_BUILD),
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


class OnceBuild:
    """A build's outcome for this process: `ensure()` builds (or loads from the cache) once and
    returns None when loaded, else a one-line reason; a failure is logged once as a warning and
    never retried in the same process (the next process retries).

    build: raises BuildError (or anything the toolchain raises) on failure.
    registered: whether the library is loaded already (by someone else in this process).
    what: names the build in the warning ("CUDA decode kernels unavailable, ...").
    """

    def __init__(self, build: Callable[[], None], registered: Callable[[], bool], what: str):
        self._build, self._registered, self._what = build, registered, what
        self._lock = threading.Lock()
        self.loaded = False
        self.error: Optional[str] = None

    def ensure(self) -> Optional[str]:
        if self.loaded:
            return None
        with self._lock:
            if self.loaded or self.error is not None:
                return self.error
            if self._registered():
                self.loaded = True
                return None
            try:
                self._build()
                self.loaded = True
            except Exception as exc:  # BuildError, or anything the toolchain raises
                self.error = str(exc) if isinstance(exc, BuildError) else (
                    f"build failed: {type(exc).__name__}: {first_error_line(str(exc))}")
                logger.warning("prefix_kernels: %s: %s", self._what, self.error)
            return self.error

    def reset(self) -> None:
        """Forget this process's outcome (tests only)."""
        with self._lock:
            self.loaded = False
            self.error = None
