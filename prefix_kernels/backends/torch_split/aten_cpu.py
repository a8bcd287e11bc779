"""The split path on CPU tensors: the vendor composition (backends/vendor/compose.py) on ATen's
CPU flash kernel, the one SDPA uses on a CPU, which returns the natural-log lse and takes GQA.

The own part is one call (the causal flag, or a bias for padding and non-square causal); the
prefix part one call per prefix whose batch is its requests folded into the query length, and
its backward explicit products that reduce the prefix gradient over the batch (timings in
benchmarks/NOTES.md). The same code serves the "composed" backend on a CPU.

Non-finite inputs. The kernel masks by adding a -inf bias, and a NaN or Inf score plus -inf is
NaN: a non-finite key or query would poison rows that may not see it, where the reference (and
the explicit path) fill masked scores with -inf. A poisoned score s_ij makes
p_ij = exp(s_ij - lse_i) NaN, which always reaches row i's lse in the forward (it enters the
row's sum of exponentials) and key j's dv in the backward (dv_j sums p_ij dout_i over every
query row). So this path checks its *results* (compose's checked=True): one reduction of the
small lse (forward) and one of dv (backward), where checking q, k and prefix_k up front would
cost three reductions in each direction. On a non-finite result forward and backward return
None and the explicit path recomputes. Finite inputs never pay twice.
"""

from __future__ import annotations

from ..vendor import compose


def forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask=None):
    """(out, lse), or None where the explicit path must recompute (non-finite results)."""
    return compose.forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, prefix_mask,
                           checked=True)


def backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse, prefix_mask=None):
    """(dq, dk, dv, dprefix_k, dprefix_v), or None where the explicit path must recompute."""
    return compose.backward(dout, None, q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale, out, lse,
                            prefix_mask, checked=True)
