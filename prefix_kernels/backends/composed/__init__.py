"""The composed backend: the training op on the fastest attention kernels there are.

Each call is split into its prefix part and its own part, each run by a vendor kernel and merged
by natural-log log-sum-exp (backends/vendor/compose.py has the method and why its gradients are
exact). Kernels, best first where present (backends/vendor/kernels.py): on CUDA the flash_attn
package (FlashAttention 2 >= 2.7, an optional extra), torch's own flash kernel, its cuDNN kernel,
then its memory-efficient kernel (the one for masks: kv_mask, prefix_mask, non-square causal); on a CPU
ATen's CPU flash kernel, which the torch backend's CPU path runs through the same code.
PREFIX_KERNELS_COMPOSED_KERNELS names the kernels to try instead (benchmarks compare them).

No request gets a copy of its prefix, and the prefix gradient comes out of the prefix part's
backward already summed over the requests that use it.

Where a result cannot be right from these kernels (a gradient through lse; on a CPU, non-finite
values) forward and backward return None, and the op recomputes with the explicit split path
(ops.py). Training op only: decode has its own kernels.
"""

from __future__ import annotations

import sys

from ..._core.problem import Problem
from ..base import Backend, functions_of
from ..vendor import compose

NAME = "composed"


def train_reasons(p: Problem) -> list:
    if p.device.type not in ("cpu", "cuda"):
        return [f"vendor kernels for CPU and CUDA tensors only, got {p.device.type}"]
    return compose.reasons(p.dtype, p.D, p.device)


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask=None):
    """(out, lse), or None where the op must recompute with the explicit path."""
    return compose.forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask,
                           checked=q.device.type == "cpu")


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
             prefix_mask=None):
    """(dq, dk, dv, dprefix_k, dprefix_v), or None where the op must recompute with the explicit path."""
    return compose.backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
                            prefix_mask, checked=q.device.type == "cpu")


BACKEND = Backend(NAME, "composed", function=functions_of(sys.modules[__name__]), train_reasons=train_reasons)
