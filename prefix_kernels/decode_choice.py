"""Which decode backend "auto" tries first on CUDA: the one the benchmark measured faster.

`python benchmarks/decode_choice.py` turns the rows of `benchmarks/bench_decode.py`
(benchmarks/results/decode.jsonl) into prefix_kernels/data/decode_choice.json: for each GPU name,
every measured shape with the faster of the "cuda" and "triton" decode backends there. A call
takes the winner of the nearest measured shape on its own GPU: same dtype and head dim where any
was measured, then the smallest distance in log2 of B, P, T (own cache length) and Lq. A GPU
with no measurement gets "cuda" first, then "triton" (the order before any benchmark ran).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

TABLE = Path(__file__).resolve().parent / "data" / "decode_choice.json"
CHOICES = ("cuda", "triton")
DEFAULT = "cuda"


@functools.lru_cache(maxsize=None)
def load_table(path: Path = TABLE) -> dict:
    """{gpu name: [{"dtype", "D", "B", "P", "T", "Lq", "faster"}, ...]}; {} when absent."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def nearest_faster(entries: list, dtype: str, D: int, B: int, P: int, T: int, Lq: int) -> str | None:
    """The measured winner of the entry nearest to this shape, or None without entries."""
    if not entries:
        return None
    same = [e for e in entries if e["dtype"] == dtype and e["D"] == D]
    pool = same or entries

    def distance(e):
        return sum(abs(math.log2(e[k] + 1) - math.log2(v + 1)) for k, v in (("B", B), ("P", P), ("T", T), ("Lq", Lq)))

    return min(pool, key=distance)["faster"]


@torch.compiler.assume_constant_result
def faster_decode_backend(device: str, dtype: str, D: int, B: int, P: int, T: int, Lq: int) -> str:
    """"cuda" or "triton": the one to try first for this shape on this GPU. A constant for
    torch.compile (evaluated when a function is traced, never traced itself)."""
    return _faster(device, dtype, D, B, P, T, Lq)


# Every layer of a decode step asks with the same shape: one lookup per step, not per layer.
@functools.lru_cache(maxsize=4096)
def _faster(device: str, dtype: str, D: int, B: int, P: int, T: int, Lq: int) -> str:
    entries = load_table().get(torch.cuda.get_device_name(torch.device(device)), [])
    return nearest_faster(entries, dtype, D, B, P, T, Lq) or DEFAULT
