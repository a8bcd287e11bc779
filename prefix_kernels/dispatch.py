"""Backends and the one dispatcher that chooses among them.

Each backend answers `reasons(problem)`: why it cannot take this case (empty: it can). "auto"
tries triton then torch on CUDA tensors and torch on CPU tensors; a backend that declines is
skipped with its reasons logged once. A backend asked for by name that declines raises
NoBackendError listing its reasons, as does a case no backend can take.
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


class NoBackendError(ValueError):
    """No backend can compute this call; the message lists each backend and its reasons."""


@lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_interpreted() -> bool:
    """Whether the triton kernels run under the interpreter (TRITON_INTERPRET=1 at their import)."""
    if _triton_import_error() is not None:
        return False
    from .triton import attention

    return attention.INTERPRETED


def triton_reasons(p: Problem) -> list[str]:
    reasons = []
    err = _triton_import_error()
    if err is not None:
        return [err]
    interpreted = triton_interpreted()
    if p.device.type == "cpu" and not interpreted:
        reasons.append("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing prefix_kernels")
    elif p.device.type not in ("cpu", "cuda"):
        reasons.append(f"device type {p.device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)")
    if interpreted and p.device.type == "cpu" and p.dtype == torch.bfloat16:
        reasons.append("bfloat16 tl.dot returns wrong values under the Triton interpreter (triton 3.9)")
    if p.device.type == "cuda" and not interpreted and p.dtype == torch.bfloat16:
        if torch.cuda.get_device_capability(p.device) < (8, 0):
            reasons.append("bfloat16 tensor cores need compute capability 8.0 or newer")
    if p.G > 65535:
        reasons.append(f"G={p.G} prefixes exceed the 65535 limit of a grid axis")
    return reasons


def torch_reasons(p: Problem) -> list[str]:
    return []


def reference_reasons(p: Problem) -> list[str]:
    return []


REASONS = {"triton": triton_reasons, "torch": torch_reasons, "reference": reference_reasons}

_logged: set = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _auto_order(p: Problem) -> tuple[str, ...]:
    if p.device.type == "cuda":
        return ("triton", "torch")
    return ("torch",)


def select_backend(requested: str, p: Problem) -> str:
    """The backend that will run this call: `requested` itself, or auto's first that can."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, one of 'auto', {', '.join(map(repr, BACKENDS))}; got {requested!r}")
    forced = os.environ.get("PREFIX_KERNELS_BACKEND")
    if requested == "auto" and forced:
        requested = forced  # a user override for debugging; same checks as an explicit name
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {requested!r}")
    candidates = _auto_order(p) if requested == "auto" else (requested,)
    declined = []
    for name in candidates:
        reasons = REASONS[name](p)
        if not reasons:
            return name
        declined.append((name, reasons))
        if requested == "auto":
            _log_once(f"prefix_kernels: backend {name!r} skipped: {'; '.join(reasons)}")
    detail = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in declined)
    raise NoBackendError(f"no backend can run this case ({p.dtype}, {p.device}, D={p.D}) — {detail}")
