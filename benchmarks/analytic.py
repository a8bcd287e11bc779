"""An analytic model of each benchmarked kernel: FLOPs, bytes, the bound that applies, and the
time it predicts, written into every row beside the measured time (`predicted_ms`), so that a GPU
run tests predictions instead of producing bare numbers.

    python benchmarks/analytic.py [--gpu "NVIDIA H100 80GB HBM3"]   # the table in NOTES.md

The model, per call (bf16/fp16; fp32 moves twice the bytes and runs at the TF32 rate):

  attention forward   FLOPs = 4 * B * Hq * L * D * (P + L_eff), L_eff = (L + 1) / 2 causal
                      bytes = q + k + v + out (B rows each) + the prefix once per prefix
  + backward          FLOPs x 3.5 in all (the backward does 5 of the 7 matmul products with a
                      recomputed score: 2.5 x the forward's); bytes x 2.5 (dq, dk, dv, dout, the
                      prefix gradient once per prefix)
  decode              bytes = the prefix once per prefix + each request's own cache (k and v)
                      + q and out; FLOPs = 4 * B * Hq * Lq * D * (P + T)
  copied baselines    the prefix counted once per request (that is what a copy reads)

  time = max(FLOPs / (peak * MATMUL_EFF), bytes / (HBM * HBM_EFF)) + LAUNCH_US per kernel

MATMUL_EFF and HBM_EFF (with the datasheet table, in prefix_kernels/_core/gpus.py, which the
package's model-driven defaults share) are the fractions a good kernel reaches (FlashAttention 2's forward on an
H100 runs at about 35-50% of the dense bf16 peak; a streaming read reaches ~85-90% of the HBM
datasheet rate). They are assumptions to be tested: the first GPU run compares them with the
measured rows (benchmarks/NOTES.md, "Predicted and measured").
"""

from __future__ import annotations

import argparse

from prefix_kernels._core.gpus import GPUS, HBM_EFF, MATMUL_EFF, gpu_specs  # noqa: F401 (re-exported)

LAUNCH_US = 5.0
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def attention_cost(shape: dict, dtype: str, mode: str, copied: bool = False) -> dict:
    """{"flops", "bytes", "kernels"} of one training attention call (mode "fwd" or "fwd_bwd")."""
    B, Hq, Hkv, L, P, D = (shape[k] for k in ("B", "Hq", "Hkv", "L", "P", "D"))
    G = shape.get("G", 1)
    eb = BYTES[dtype]
    L_eff = (L + 1) / 2 if shape.get("causal", True) else L
    flops = 4.0 * B * Hq * L * D * (P + L_eff)
    rows = B * L * D * eb * (2 * Hq + 2 * Hkv)  # q, out, k, v
    prefix = (B if copied else G) * Hkv * P * D * eb * 2
    bytes_ = rows + prefix
    kernels = 1
    if mode == "fwd_bwd":
        flops *= 3.5
        bytes_ *= 2.5
        kernels = 4
    return dict(flops=flops, bytes=bytes_, kernels=kernels)


def decode_cost(shape: dict, dtype: str, copied: bool = False) -> dict:
    B, Hq, Hkv, P, D = (shape[k] for k in ("B", "Hq", "Hkv", "P", "D"))
    T, Lq, G = shape.get("T", 0), shape.get("Lq", 1), shape.get("G", 1)
    eb = BYTES[dtype]
    prefix = (B if copied else G) * Hkv * P * D * eb * 2
    own = B * Hkv * T * D * eb * 2
    rows = B * Hq * Lq * D * eb * 2
    return dict(flops=4.0 * B * Hq * Lq * D * (P + T), bytes=prefix + own + rows, kernels=2)


def predict(cost: dict, gpu_name: str | None, dtype: str, mode: str = "fwd") -> dict:
    """{"predicted_ms", "bound", "flops", "bytes"}; predicted_ms None (with the reason in
    "bound") on a device the table does not know."""
    spec = gpu_specs(gpu_name)
    if spec is None:
        return dict(predicted_ms=None, bound=f"no datasheet entry for {gpu_name!r}", flops=cost["flops"],
                    bytes=cost["bytes"])
    peak = spec["bf16_tflops"] * 1e12 * (0.5 if dtype == "float32" else 1.0)
    t_math = cost["flops"] / (peak * MATMUL_EFF.get(mode, MATMUL_EFF["fwd"]))
    t_mem = cost["bytes"] / (spec["hbm_tbs"] * 1e12 * HBM_EFF)
    seconds = max(t_math, t_mem) + cost["kernels"] * LAUNCH_US * 1e-6
    return dict(predicted_ms=seconds * 1e3, bound="matmul" if t_math >= t_mem else "hbm", flops=cost["flops"],
                bytes=cost["bytes"])


def for_row(row: dict) -> dict:
    """predict() for a benchmark row (attention or decode), from its shape, dtype, mode, provider
    and device; rows of other workloads get predicted_ms None."""
    dtype, shape, provider = row.get("dtype", "bfloat16"), row.get("shape", {}), row.get("provider", "")
    # the package's providers and FlashInfer's cascade read a shared prefix once; every other
    # baseline reads it once per request (a copy, or a broadcast view each request reads)
    copied = not (provider.startswith("prefix_kernels") or "cascade" in provider)
    if row.get("workload") == "attention":
        mode = row.get("mode", "fwd")
        return predict(attention_cost(shape, dtype, mode, copied), row.get("device"), dtype, mode)
    if row.get("workload") == "decode":
        return predict(decode_cost(shape, dtype, copied), row.get("device"), dtype)
    return dict(predicted_ms=None, bound="no model for this workload", flops=None, bytes=None)


def table(gpu: str) -> str:
    """The predictions at the GPU benchmark shapes, as a markdown table."""
    lines = ["| workload | shape | mode | bound | predicted ms | ours / copied bytes |", "|---|---|---|---|---|---|"]
    for P in (16, 128, 1024):
        shape = dict(B=16, Hq=32, Hkv=8, L=1024, P=P, D=128, G=1, causal=True)
        for mode in ("fwd", "fwd_bwd"):
            ours = predict(attention_cost(shape, "bfloat16", mode), gpu, "bfloat16", mode)
            copied = attention_cost(shape, "bfloat16", mode, copied=True)
            lines.append(f"| attention | B16 L1024 P{P} | {mode} | {ours['bound']} | {ours['predicted_ms']:.3f} | "
                         f"{ours['bytes'] / copied['bytes']:.2f} |")
    for B in (8, 64, 256):
        for P in (1024, 4096, 16384):
            shape = dict(B=B, Hq=32, Hkv=8, Lq=1, T=256, P=P, D=128, G=1)
            ours = predict(decode_cost(shape, "bfloat16"), gpu, "bfloat16")
            copied = decode_cost(shape, "bfloat16", copied=True)
            lines.append(f"| decode | B{B} T256 P{P} | fwd | {ours['bound']} | {ours['predicted_ms']:.4f} | "
                         f"{ours['bytes'] / copied['bytes']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="NVIDIA H100 80GB HBM3")
    print(table(ap.parse_args().gpu))
