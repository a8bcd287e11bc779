"""Datasheet facts about the GPUs the package targets, and the rates a good kernel reaches on them.

One table for the package's model-driven defaults (config.fuse_parts) and for the benchmarks'
predictions (benchmarks/analytic.py), so that both reason from the same numbers. The rates are
assumptions until a GPU run measures them (benchmarks/NOTES.md, "Predicted, before any GPU run").
"""

from __future__ import annotations

from functools import lru_cache

import torch

# Dense bf16 tensor-core TFLOP/s (TF32: half), HBM TB/s, multiprocessors.
GPUS = {
    "H200": dict(bf16_tflops=989.0, hbm_tbs=4.8, sms=132),
    "H100": dict(bf16_tflops=989.0, hbm_tbs=3.35, sms=132),  # SXM
    "A100": dict(bf16_tflops=312.0, hbm_tbs=2.0, sms=108),  # 80GB SXM
}
# Fractions of the datasheet rates a good kernel reaches: FlashAttention 2's forward runs at about
# 35-50% of the dense bf16 peak on an H100; a streaming read reaches ~85-90% of the HBM rate.
MATMUL_EFF = {"fwd": 0.45, "fwd_bwd": 0.35}
HBM_EFF = 0.85


def gpu_specs(name: str | None) -> dict | None:
    """The datasheet entry whose key appears in the GPU's name (torch.cuda.get_device_name), with
    "key" added, or None."""
    if not name:
        return None
    for key, spec in GPUS.items():
        if key in name:
            return dict(spec, key=key)
    return None


@lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_specs(device: torch.device) -> dict | None:
    """gpu_specs of a CUDA device (its name read once per process), None off CUDA or for a GPU
    the table does not know."""
    if device.type != "cuda":
        return None
    return gpu_specs(_device_name(device.index if device.index is not None else torch.cuda.current_device()))
