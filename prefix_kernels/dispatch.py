"""Backends and the one dispatcher that chooses among them.

Each backend answers `reasons(problem)`: why it cannot take this case (empty: it can). "auto"
tries triton then torch on CUDA tensors and torch on CPU tensors; a backend that declines is
skipped with its reasons logged once. A backend asked for by name that declines raises
NoBackendError listing its reasons, as does a case no backend can take.

Two tables feed the same dispatcher: the op's (shared_prefix_attention: triton, torch, reference)
and the decode path's (shared_prefix_decode: cuda, triton, torch, reference). The decode "cuda"
backend lives in an optional module prefix_kernels.cuda that exposes
``decode_reasons(problem) -> list[str]`` and ``decode_forward(q, k, v, prefix_k, prefix_v,
prefix_index, kv_mask, causal, scale) -> (out, lse)``; without it, "cuda" declines.
"""

from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache

import torch

from .checks import Problem

logger = logging.getLogger("prefix_kernels")

BACKENDS = ("triton", "torch", "reference")
DECODE_BACKENDS = ("cuda", "triton", "torch", "reference")  # a superset of BACKENDS
BACKEND_ENV = "PREFIX_KERNELS_BACKEND"  # overrides backend="auto"
MAX_DECODE_LQ = 16  # new tokens per request that the decode kernels take


class NoBackendError(ValueError):
    """No backend can compute this call; the message lists each backend and its reasons."""


# The import probes below are marked constant for torch.compile: dynamo cannot trace
# importlib, and whether a module imports does not change while a process runs. (It then runs
# them once at trace time and bakes the answer into the graph.)


@lru_cache(maxsize=None)
def _probe_triton() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


@torch.compiler.assume_constant_result
def _triton_import_error() -> str | None:
    return _probe_triton()


@torch.compiler.assume_constant_result
def triton_interpreted() -> bool:
    """Whether the triton kernels run under the interpreter (TRITON_INTERPRET=1 at their import)."""
    if _triton_import_error() is not None:
        return False
    from .triton import attention

    return attention.INTERPRETED


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in parts)


def interpreter_numpy_clash(triton_version: str, numpy_version: str) -> str | None:
    """Why this triton's interpreter cannot run our kernels under this numpy, or None.

    triton 3.6's interpreter turns a 1-element array into a loop bound with int(array), which
    numpy 2.4 refuses (a deprecation since numpy 1.25): every kernel whose loop bound depends on
    a program id then raises TypeError. triton 3.9's interpreter is fine (CI runs it); 3.7 and
    3.8 were not checked, so they are declined with 3.6.
    """
    if _major_minor(triton_version) < (3, 9) and _major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} fails under numpy {numpy_version}: it calls "
                "int() on 1-element arrays, which numpy 2.4 refuses; use triton >= 3.9 or numpy < 2.4")
    return None


@torch.compiler.assume_constant_result
def _installed_interpreter_clash() -> str | None:
    import numpy
    import triton

    return interpreter_numpy_clash(triton.__version__, numpy.__version__)


def _triton_device_reasons(p: Problem) -> list[str]:
    """Why triton cannot run on these tensors at all (shared by the op and the decode path)."""
    reasons = []
    err = _triton_import_error()
    if err is not None:
        return [err]
    interpreted = triton_interpreted()
    if p.device.type == "cpu" and not interpreted:
        reasons.append("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing prefix_kernels")
    elif p.device.type not in ("cpu", "cuda"):
        reasons.append(f"device type {p.device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)")
    if interpreted and p.device.type == "cpu":
        clash = _installed_interpreter_clash()
        if clash is not None:
            reasons.append(clash)
    if interpreted and p.device.type == "cpu" and p.dtype == torch.bfloat16:
        reasons.append("bfloat16 tl.dot returns wrong values under the Triton interpreter (triton 3.9)")
    if p.device.type == "cuda" and not interpreted and p.dtype == torch.bfloat16:
        if torch.cuda.get_device_capability(p.device) < (8, 0):
            reasons.append("bfloat16 tensor cores need compute capability 8.0 or newer")
    return reasons


def triton_reasons(p: Problem) -> list[str]:
    reasons = _triton_device_reasons(p)
    if p.G > 65535:
        reasons.append(f"G={p.G} prefixes exceed the 65535 limit of a grid axis")
    return reasons


def triton_decode_reasons(p: Problem) -> list[str]:
    reasons = _triton_device_reasons(p)
    if not 1 <= p.Lq <= MAX_DECODE_LQ:
        reasons.append(f"the decode kernels take 1 to {MAX_DECODE_LQ} query tokens per request, got Lq={p.Lq}")
    if p.Hkv > 65535:
        reasons.append(f"Hkv={p.Hkv} kv heads exceed the 65535 limit of a grid axis")
    return reasons


CUDA_NOT_BUILT = "CUDA decode extension not built in this version"


@lru_cache(maxsize=None)
def cuda_decode_module():
    """(module, None) when prefix_kernels.cuda exposes the decode hooks, else (None, reason).

    Cached: the decode path asks on every call (every layer of every step), and a failed import
    searches the file system each time. Tests that fake the module call cache_clear().
    """
    try:
        module = importlib.import_module("prefix_kernels.cuda")
    except ModuleNotFoundError as exc:
        if exc.name in ("prefix_kernels.cuda",):
            return None, CUDA_NOT_BUILT
        return None, f"prefix_kernels.cuda is not importable ({type(exc).__name__}: {exc})"
    except Exception as exc:  # a broken extension raising anything else
        return None, f"prefix_kernels.cuda is not importable ({type(exc).__name__}: {exc})"
    missing = [name for name in ("decode_reasons", "decode_forward") if not callable(getattr(module, name, None))]
    if missing:
        return None, f"{CUDA_NOT_BUILT} (prefix_kernels.cuda has no {' or '.join(missing)})"
    return module, None


@torch.compiler.assume_constant_result
def _cuda_decode_unavailable() -> str:
    """Why prefix_kernels.cuda cannot serve decode calls ('' when it can)."""
    return cuda_decode_module()[1] or ""


def cuda_decode_reasons(p: Problem) -> list[str]:
    why = _cuda_decode_unavailable()
    if why:
        return [why]
    if p.device.type != "cuda":
        return [f"CUDA kernels need CUDA tensors, got {p.device.type}"]
    if torch.compiler.is_compiling():
        # dynamo cannot trace the cached lookup; the module is imported already (see above).
        # It does trace decode_reasons itself, which must therefore be traceable.
        from . import cuda as module
    else:
        module = cuda_decode_module()[0]
    return list(module.decode_reasons(p))


def torch_reasons(p: Problem) -> list[str]:
    return []


def reference_reasons(p: Problem) -> list[str]:
    return []


REASONS = {"triton": triton_reasons, "torch": torch_reasons, "reference": reference_reasons}
DECODE_REASONS = {
    "cuda": cuda_decode_reasons,
    "triton": triton_decode_reasons,
    "torch": torch_reasons,
    "reference": reference_reasons,
}

_logged: set = set()


def _log_once(message: str) -> None:
    if torch.compiler.is_compiling():
        return  # dynamo cannot trace logging; the eager calls log it
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _auto_order(p: Problem) -> tuple[str, ...]:
    if p.device.type == "cuda":
        return ("triton", "torch")
    return ("torch",)


def _decode_auto_order(p: Problem) -> tuple[str, ...]:
    """On CUDA: the decode backend the benchmark measured faster for the nearest shape on this
    GPU first (decode_choice.py; "cuda" where nothing was measured), the other second."""
    if p.device.type == "cuda":
        from .decode_choice import faster_decode_backend

        first = faster_decode_backend(str(p.device), str(p.dtype).replace("torch.", ""), p.D, p.B, p.P, p.Lk, p.Lq)
        return ("cuda", "triton", "torch") if first == "cuda" else ("triton", "cuda", "torch")
    return ("torch",)


def select_backend(requested: str, p: Problem, *, decode: bool = False) -> str:
    """The backend that will run this call: `requested` itself, or auto's first that can.

    decode=True chooses among the decode path's backends (shared_prefix_decode).
    """
    names, table = (DECODE_BACKENDS, DECODE_REASONS) if decode else (BACKENDS, REASONS)
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, one of 'auto', {', '.join(map(repr, names))}; got {requested!r}")
    forced = os.environ.get(BACKEND_ENV)
    if requested == "auto" and forced:
        # A user override for debugging; then the same checks as an explicit name. A name only the
        # decode path has ("cuda") leaves the training op on auto instead of breaking it.
        if forced not in DECODE_BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be unset or one of {', '.join(map(repr, DECODE_BACKENDS))}; "
                             f"got {forced!r}")
        if forced in names:
            requested = forced
    if requested != "auto" and requested not in names:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, names))}; got {requested!r}")
    order = _decode_auto_order if decode else _auto_order
    candidates = order(p) if requested == "auto" else (requested,)
    declined = []
    for name in candidates:
        reasons = table[name](p)
        if not reasons:
            return name
        declined.append((name, reasons))
        if requested == "auto":
            _log_once(f"prefix_kernels: backend {name!r} skipped: {'; '.join(reasons)}")
    detail = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in declined)
    raise NoBackendError(f"no backend can run this case ({p.dtype}, {p.device}, D={p.D}) — {detail}")
