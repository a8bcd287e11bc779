"""The registry of backends, and the one dispatcher that chooses among them.

Backends (each declared beside its code, in backends/<name>/):

    public name   implementations, in order   paths
    "triton"      triton                      training, decode
    "composed"    composed                    training (vendor kernels, two parts merged by lse)
    "torch"       cpu_kernel, torch_split     training, decode (cpu_kernel: float32 CPU only)
    "cuda"        cuda                        decode
    "reference"   reference                   training, decode (materialises the prefix; tests)

A public name takes the first of its implementations that has no reason to decline. "auto" tries
public names in order: training, on CUDA tensors whichever of composed and triton the benchmark
measured faster for the nearest shape on this GPU (train_choice.py; composed before any
measurement), the other, then torch; on CPU tensors, torch;
decode, on CUDA, whichever of cuda and triton the benchmark measured faster for the nearest
shape on this GPU (decode_choice.py), the other, then torch; on CPU, torch. A public backend that
declines under "auto" is skipped with its reasons logged once; a backend asked for by name that
declines raises NoBackendError listing its reasons, as does a case no backend can take.
PREFIX_KERNELS_BACKEND overrides "auto" (a name only one path has, "cuda" for decode and
"composed" for training, leaves the other path on auto).

`plan` makes the choice once per kind of call (the problem's sizes, dtype and device, the path,
the request and the variables that change it), so that every layer of a model and every step
of a decode loop reuses it instead of asking every backend again (capability queries, a
build's lock). Tests that change a backend's state call `forget_plans()`.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from .._core import env
from .._core.log import log_once
from .._core.problem import Problem
from . import composed, cpu_kernel, cuda, decode_choice, reference, torch_split, train_choice, triton
from .base import Backend

IMPLEMENTATIONS: dict[str, Backend] = {
    b.name: b for b in (triton.BACKEND, composed.BACKEND, cpu_kernel.BACKEND, torch_split.BACKEND, cuda.BACKEND,
                        reference.BACKEND)
}
PUBLIC: dict[str, tuple[str, ...]] = {}
for _b in IMPLEMENTATIONS.values():
    PUBLIC.setdefault(_b.public, ())
    PUBLIC[_b.public] += (_b.name,)

BACKENDS = ("triton", "composed", "torch", "reference")  # the training op's public names
DECODE_BACKENDS = ("cuda", "triton", "torch", "reference")  # the decode path's
NAMES = BACKENDS + ("cuda",)  # every public name
# What runs a call whose planned backend returned None (ops.py): the explicit split path, which
# takes every case.
FALLBACK = torch_split.NAME


class NoBackendError(ValueError):
    """No backend can compute this call; the message lists each backend and its reasons."""


def implementation(name: str) -> Backend:
    return IMPLEMENTATIONS[name]


def _first_that_can(name: str, p: Problem, decode: bool) -> tuple:
    """(the first implementation of the public backend `name` that can take this case, []), or
    (None, every implementation's reasons, prefixed with its name when it has several)."""
    impls, reasons = PUBLIC[name], []
    for impl in impls:
        why = IMPLEMENTATIONS[impl].reasons(p, decode=decode)
        if not why:
            return impl, []
        reasons += why if len(impls) == 1 else [f"{impl}: {r}" for r in why]
    return None, reasons


def public_reasons(name: str, p: Problem, *, decode: bool) -> list:
    """Why the public backend `name` cannot take this case: [] when one of its implementations can."""
    return _first_that_can(name, p, decode)[1]


def _auto_order(p: Problem, decode: bool) -> tuple[str, ...]:
    if p.device.type != "cuda":
        return ("torch",)
    if not decode:
        first = train_choice.faster_train_backend(str(p.device), str(p.dtype).replace("torch.", ""), p.D, p.B, p.Lq,
                                                  p.P)
        return ("composed", "triton", "torch") if first == "composed" else ("triton", "composed", "torch")
    first = decode_choice.faster_decode_backend(str(p.device), str(p.dtype).replace("torch.", ""),
                                                p.D, p.B, p.P, p.Lk, p.Lq)
    return ("cuda", "triton", "torch") if first == "cuda" else ("triton", "cuda", "torch")


def _requested(requested, decode: bool) -> str:
    names = DECODE_BACKENDS if decode else BACKENDS
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, one of 'auto', {', '.join(map(repr, names))}; got {requested!r}")
    forced = os.environ.get(env.BACKEND)
    if requested == "auto" and forced:
        if forced not in NAMES:
            raise ValueError(f"{env.BACKEND} must be unset or one of {', '.join(map(repr, NAMES))}; "
                             f"got {forced!r}")
        if forced in names:
            requested = forced
    if requested != "auto" and requested not in names:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, names))}; got {requested!r}")
    return requested


def _choose(requested: str, p: Problem, decode: bool) -> str:
    """The implementation that runs this call, or NoBackendError."""
    candidates = _auto_order(p, decode) if requested == "auto" else (requested,)
    declined = []
    for name in candidates:
        impl, reasons = _first_that_can(name, p, decode)
        if impl is not None:
            return impl
        declined.append((name, reasons))
        if requested == "auto":
            log_once(f"prefix_kernels: backend {name!r} skipped: {'; '.join(reasons)}")
    detail = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in declined)
    raise NoBackendError(f"no backend can run this case ({p.dtype}, {p.device}, D={p.D}) — {detail}")


@lru_cache(maxsize=1024)
def _planned(requested: str, p: Problem, decode: bool, variables: tuple) -> str:
    return _choose(requested, p, decode)


def _variables() -> tuple:
    """The variables that change a choice: part of a plan's key (the composed backend's kernel
    order; torch's deterministic mode rules out a kernel whose backward uses atomics)."""
    return (*(os.environ.get(name) for name in (env.DISABLE_CUDA, env.DISABLE_CPU_KERNEL, env.COMPOSED_KERNELS)),
            torch.are_deterministic_algorithms_enabled())


def plan(requested, p: Problem, *, decode: bool = False) -> str:
    """The implementation that will run this call (`requested` itself, or auto's first that can),
    chosen once per kind of call. decode=True chooses among the decode path's backends."""
    requested = _requested(requested, decode)
    if torch.compiler.is_compiling():
        return _choose(requested, p, decode)  # traced once; dynamo does not trace lru_cache's wrapper
    return _planned(requested, p, decode, _variables())


def forget_plans() -> None:
    """Drop every remembered choice (tests that change a backend's availability)."""
    _planned.cache_clear()


def reasons_table(decode: bool) -> dict:
    """{public name: reasons(problem)} for the training op or the decode path (prefix-kernels info)."""
    names = DECODE_BACKENDS if decode else BACKENDS
    return {name: (lambda p, name=name: public_reasons(name, p, decode=decode)) for name in names}
