"""Which training backend "auto" tries first on CUDA: the one the benchmark measured faster.

`python benchmarks/train_choice.py` turns the forward + backward rows of
`benchmarks/bench_attention.py` (benchmarks/results/attention.jsonl) into
prefix_kernels/data/train_choice.json: for each GPU name, every measured shape with the faster of
the "composed" and "triton" backends there. A call takes the winner of the nearest measured shape
on its own GPU (decode_choice.nearest: same dtype, then head dim, then log2 distance of B, L and
P); under torch.compile, whose sizes may be symbolic, the GPU's and dtype's most frequent winner.

Before any GPU has measured, "composed" goes first: its forward and backward run on kernels that
PyTorch itself runs for every SDPA user (FlashAttention 2 inside torch, the memory-efficient
kernel), and what is ours in it, the split, the fold and the log-sum-exp merge, is the code the
CPU path runs and the tests check against the float64 reference; the Triton training kernels
have only run under Triton's interpreter (docs/backends.md).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import decode_choice
from .decode_choice import nearest

TABLE = Path(__file__).resolve().parents[1] / "data" / "train_choice.json"
CHOICES = ("composed", "triton")
DEFAULT = "composed"


def load_table(path: Path = TABLE) -> dict:
    """{gpu name: [{"dtype", "D", "B", "L", "P", "faster"}, ...]}; {} when absent."""
    return decode_choice.load_table(path)  # the same reader, cached per path


def faster_train_backend(device: str, dtype: str, D, B, L, P) -> str:
    """"composed" or "triton": the one to try first for this shape on this GPU."""
    if torch.compiler.is_compiling():
        return _faster_constant(device, dtype)
    return _faster(device, dtype, D, B, L, P)


@torch.compiler.assume_constant_result
def _faster_constant(device: str, dtype: str) -> str:
    return _faster(device, dtype, None, None, None, None)


@functools.lru_cache(maxsize=4096)
def _faster(device: str, dtype: str, D, B, L, P) -> str:
    table = load_table()
    if not table:  # nothing measured: no need to ask the GPU its name
        return DEFAULT
    try:
        gpu = torch.cuda.get_device_name(torch.device(device))
    except Exception:  # no usable CUDA (a CPU-only torch asked about a CUDA problem)
        return DEFAULT
    return nearest(table.get(gpu, []), dtype, D, {"B": B, "L": L, "P": P}, CHOICES) or DEFAULT
