"""Switches that measurements decide, in one place (see benchmarks/NOTES.md for the evidence).

FUSE_PARTS, per decode backend: run the prefix part and the per-request part as one launch whose
programs (Triton) or blocks (CUDA) alternate between the two, so that at large batch the
compute-bound prefix work can overlap the memory-bound cache reads. Same partials, same merge:
bit-identical results either way. True or False forces it; "auto" (the default) decides per call
by the model of benchmarks/NOTES.md ("A compute floor too"): fused where, at the datasheet rates
a good kernel reaches on this GPU (_core/gpus.py), running the parts one after the other would
take at least FUSE_PARTS_GAIN times as long as overlapping them, i.e. where the prefix part is
compute-bound beside a sizeable cache read (large B x query heads per kv head, long P). On a GPU
the table does not know, in fp32, or off CUDA: not fused. A model, not a measurement: the GPU
run's bench_decode.py times the default against both forced values and replaces the rule if it
is wrong.

FUSE_MERGE, Triton decode only: where the own part runs in one split (the common case at serving
batch sizes) and after the prefix part (FUSE_PARTS off), with a row block that fits in registers
(backends/triton/tiles.merge_fits), the own-cache kernel merges its rows' state with the prefix
partials itself and writes the final output, instead of writing its own partial for a third
launch to merge. One launch less and no own partial written or read back; the same arithmetic
(fp32 log-sum-exp, fixed order), so the results differ from the unfused merge by fp32 rounding
only. On by default: it removes a launch and a round trip of partials and adds no spill
(compiled offline; not yet timed on a GPU). Off gives the three launches, for tests and
benchmarks to compare (bench_decode.py's prefix_kernels_triton_unfused_merge).
"""

from __future__ import annotations

import torch

from . import gpus

FUSE_PARTS = {"triton": "auto", "cuda": "auto"}
FUSE_PARTS_GAIN = 1.25
FUSE_MERGE = {"triton": True}


def parts_overlap_gain(B: int, Hq: int, Hkv: int, Lq: int, T: int, P: int, G: int, D: int, spec: dict) -> float:
    """Time of the two decode parts run one after the other over their time run overlapped, at
    the rates of `spec` (gpus.GPUS) times gpus.MATMUL_EFF["fwd"] and gpus.HBM_EFF, 16-bit caches:
    (max(prefix flops / F, prefix bytes / BW) + own bytes / BW) / max(prefix flops / F, all bytes / BW).
    The prefix part does 4 B Hq Lq P D flops on its prefixes' bytes (read once per prefix in
    use); the own part is a pure read of the caches."""
    flops = 4.0 * B * Hq * Lq * P * D
    prefix_bytes = 2.0 * min(G, B) * Hkv * P * D * 2
    own_bytes = 2.0 * B * Hkv * T * D * 2
    rate = spec["bf16_tflops"] * 1e12 * gpus.MATMUL_EFF["fwd"]
    bandwidth = spec["hbm_tbs"] * 1e12 * gpus.HBM_EFF
    t_math = flops / rate
    serial = max(t_math, prefix_bytes / bandwidth) + own_bytes / bandwidth
    overlapped = max(t_math, (prefix_bytes + own_bytes) / bandwidth)
    return serial / overlapped if overlapped > 0 else 1.0


def fuse_parts(backend: str, q: torch.Tensor, T: int, P: int, G: int, Hkv: int) -> bool:
    """Whether a decode call on `backend` runs its two parts as one launch (FUSE_PARTS[backend];
    "auto": the model above). q: (B, Hq, Lq, D); T own keys, P prefix keys, G prefixes."""
    setting = FUSE_PARTS[backend]
    if setting != "auto":
        return bool(setting)
    if T == 0 or P == 0 or q.element_size() != 2:
        return False
    spec = gpus.device_specs(q.device)
    if spec is None:
        return False
    B, Hq, Lq, D = q.shape
    return parts_overlap_gain(B, Hq, Hkv, Lq, T, P, G, D, spec) >= FUSE_PARTS_GAIN
