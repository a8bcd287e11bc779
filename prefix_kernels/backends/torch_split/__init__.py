"""The torch split path: the prefix part and the per-request part computed separately with PyTorch
and ATen ops and merged by their natural-log log-sum-exps. Registered as the second half of the
public "torch" backend (after the one-pass CPU kernel, which takes float32 CPU calls): the CPU
path for bf16/fp16 (or where that kernel cannot be built) and the fallback everywhere.

No request gets a copy of its prefix. The prefix part is one batched matrix product per prefix g,
batched over the Hkv kv heads, whose rows are the stacked queries of every request that uses g
(and every query head of each kv group): (Hkv, n_g * group * Lq, D) x (Hkv, D, P). Its gradient
is therefore reduced across the batch by the matrix product itself, with no (B, Hkv, P, D)
buffer. The per-request part is ordinary masked attention; the two merge by their natural-log
log-sum-exps. Everything is computed in float32 and cast back at the end.
"""

from __future__ import annotations

import sys

from ..base import Backend, functions_of
from . import aten_cpu, explicit

# Whether CPU tensors take ATen's fused CPU kernel; tests switch it off to check the explicit path
# (the one non-CPU tensors take) on a CPU.
FUSED_CPU = True


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal: bool, scale: float, prefix_mask=None):
    """Returns out (B, Hq, Lq, D) in q's dtype and the natural-log lse (B, Hq, Lq) in float32."""
    if FUSED_CPU and q.device.type == "cpu":
        fused = aten_cpu.forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask)
        if fused is not None:
            return fused
    return explicit.forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask)


def backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
             prefix_mask=None):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) of forward, each in its input's dtype. A
    gradient through lse (dlse) takes the explicit path, which handles it."""
    if FUSED_CPU and dlse is None and q.device.type == "cpu":
        fused = aten_cpu.backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
                                  prefix_mask)
        if fused is not None:
            return fused
    return explicit.backward(dout, dlse, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
                             prefix_mask)


decode_forward = forward  # the same computation serves decode

NAME = "torch_split"
BACKEND = Backend(NAME, "torch", function=functions_of(sys.modules[__name__]), train_reasons=lambda p: [],
                  decode_reasons=lambda p: [])
