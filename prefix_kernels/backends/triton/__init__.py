"""Triton backend: kernels/ (only @triton.jit code), tiles.py (GPU tile sizes, splits and SM
counts, the one place tests override), train.py and decode.py (launchers: checks, grids,
allocation). This file declares what the backend supports, beside its code.

Importing this package does not import triton (a missing or broken triton is a reason, not an
ImportError) and does not touch the GPU.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from ..._core.problem import MAX_DECODE_LQ, Problem
from ..base import Backend

NAME = "triton"


@lru_cache(maxsize=None)
def _probe() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


# The probes below are constants for torch.compile: dynamo cannot trace importlib, and whether a
# module imports does not change while a process runs (it runs them once at trace time).


@torch.compiler.assume_constant_result
def import_error() -> str | None:
    return _probe()


@torch.compiler.assume_constant_result
def interpreted() -> bool:
    """Whether the kernels run under the interpreter (Triton decided it when they were decorated,
    from TRITON_INTERPRET at their import)."""
    if import_error() is not None:
        return False
    from . import train

    return train.INTERPRETED


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in parts)


def interpreter_numpy_clash(triton_version: str, numpy_version: str) -> str | None:
    """Why this triton's interpreter cannot run our kernels under this numpy, or None.

    triton 3.6's interpreter turns a 1-element array into a loop bound with int(array), which
    numpy 2.4 refuses (a deprecation since numpy 1.25): every kernel whose loop bound depends on
    a program id then raises TypeError. triton 3.9's interpreter is fine; 3.7 and 3.8 were not
    checked, so they are declined with 3.6.
    """
    if _major_minor(triton_version) < (3, 9) and _major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} fails under numpy {numpy_version}: it calls "
                "int() on 1-element arrays, which numpy 2.4 refuses; use triton >= 3.9 or numpy < 2.4")
    return None


@torch.compiler.assume_constant_result
def installed_interpreter_clash() -> str | None:
    import numpy
    import triton

    return interpreter_numpy_clash(triton.__version__, numpy.__version__)


def _device_reasons(p: Problem) -> list[str]:
    """Why triton cannot run on these tensors at all (shared by training and decode)."""
    err = import_error()
    if err is not None:
        return [err]
    reasons = []
    on_interpreter = interpreted()
    if p.device.type == "cpu" and not on_interpreter:
        reasons.append("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing prefix_kernels")
    elif p.device.type not in ("cpu", "cuda"):
        reasons.append(f"device type {p.device.type!r} is not supported (cuda, or cpu under TRITON_INTERPRET=1)")
    if on_interpreter and p.device.type == "cpu":
        clash = installed_interpreter_clash()
        if clash is not None:
            reasons.append(clash)
        if p.dtype == torch.bfloat16:
            reasons.append("bfloat16 tl.dot returns wrong values under the Triton interpreter (triton 3.9)")
    if p.device.type == "cuda" and not on_interpreter and p.dtype == torch.bfloat16:
        if torch.cuda.get_device_capability(p.device) < (8, 0):
            reasons.append("bfloat16 tensor cores need compute capability 8.0 or newer")
    return reasons


def train_reasons(p: Problem) -> list[str]:
    reasons = _device_reasons(p)
    if p.G > 65535:
        reasons.append(f"G={p.G} prefixes exceed the 65535 limit of a grid axis")
    return reasons


def decode_reasons(p: Problem) -> list[str]:
    reasons = _device_reasons(p)
    if not 1 <= p.Lq <= MAX_DECODE_LQ:
        reasons.append(f"the decode kernels take 1 to {MAX_DECODE_LQ} query tokens per request, got Lq={p.Lq}")
    if p.Hkv > 65535:
        reasons.append(f"Hkv={p.Hkv} kv heads exceed the 65535 limit of a grid axis")
    return reasons


def _function(kind: str):
    if kind == "decode":
        from . import decode

        return decode.forward
    from . import train

    return getattr(train, kind)


BACKEND = Backend(NAME, NAME, function=_function, train_reasons=train_reasons, decode_reasons=decode_reasons)
