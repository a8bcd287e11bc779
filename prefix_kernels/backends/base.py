"""What a backend declares: its name, the cases it cannot take and why, and where its code is.

A backend answers `train_reasons(problem)` (the training op: forward and backward) and/or
`decode_reasons(problem)` (the decode path) with a list of reasons it cannot take the case; an
empty list means it can. The registry asks these, never the backend's internals, and lists every
backend's reasons when none can take a case (xFormers' dispatch, in shape).

`function(kind)` returns the code that computes, looked up at each call (so that a backend whose
dependency is missing, triton, can still say why it declines, and tests can replace it):
  "forward":  (q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale) -> (out, lse)
  "backward": (dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out,
               lse) -> (dq, dk, dv, dprefix_k, dprefix_v)
  "decode":   the forward's arguments and result, for 1 to 16 query rows per request
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .._core.problem import Problem

Reasons = Callable[[Problem], list]


@dataclass(frozen=True)
class Backend:
    name: str  # the implementation's name, passed to the custom ops
    public: str  # the name users ask for (backend="torch" covers cpu_kernel and torch_split)
    function: Callable[[str], Callable]
    train_reasons: Optional[Reasons] = None  # None: no training path
    decode_reasons: Optional[Reasons] = None  # None: no decode path
    differentiable: bool = False  # computes with autograd itself: called directly, not via the ops

    def reasons(self, p: Problem, *, decode: bool) -> list:
        check = self.decode_reasons if decode else self.train_reasons
        if check is None:
            return [f"no {'decode' if decode else 'training'} path"]
        return list(check(p))


def functions_of(module) -> Callable[[str], Callable]:
    """function(kind) for a backend module that defines forward, backward and/or decode_forward."""
    names = {"forward": "forward", "backward": "backward", "decode": "decode_forward"}
    return lambda kind: getattr(module, names[kind])
