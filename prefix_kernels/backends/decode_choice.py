"""Which decode backend "auto" tries first on CUDA: the one the benchmark measured faster.

`python benchmarks/decode_choice.py` turns the rows of `benchmarks/bench_decode.py`
(benchmarks/results/decode.jsonl) into prefix_kernels/data/decode_choice.json: for each GPU name,
every measured shape with the faster of the "cuda" and "triton" decode backends there. A call
takes the winner of the nearest measured shape on its own GPU: same dtype, then same head dim
where measured, then the smallest distance in log2 of B, P, T (own cache length) and Lq; under
torch.compile, whose sizes may be symbolic, the most frequent winner for the GPU and dtype. A GPU
with no measurement gets "cuda" first, then "triton" (the order before any benchmark ran).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

TABLE = Path(__file__).resolve().parents[1] / "data" / "decode_choice.json"
CHOICES = ("cuda", "triton")
DEFAULT = "cuda"


@functools.lru_cache(maxsize=None)
def load_table(path: Path = TABLE) -> dict:
    """{gpu name: [{"dtype", "D", "B", "P", "T", "Lq", "faster"}, ...]}; {} when absent."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def nearest_faster(entries: list, dtype: str, D=None, B=None, P=None, T=None, Lq=None, *,
                   choices=CHOICES) -> str | None:
    """The measured winner of the entry nearest to this shape, or None without entries.

    Entries of the same dtype (and head dim, when given) are preferred. Sizes given as None do
    not count; with none at all, the backend that won most of the candidates is returned."""
    return nearest(entries, dtype, D, {"B": B, "P": P, "T": T, "Lq": Lq}, choices)


def nearest(entries: list, dtype: str, D, sizes: dict, choices) -> str | None:
    """nearest_faster for any table: `sizes` maps an entry's size fields to this call's values
    (None: not known); distance is the sum of |log2(entry + 1) - log2(value + 1)|. Shared by the
    decode and training tables (train_choice.py)."""
    if not entries:
        return None
    pool = [e for e in entries if e["dtype"] == dtype] or entries
    pool = [e for e in pool if e["D"] == D] or pool
    known = [(k, v) for k, v in sizes.items() if v is not None]
    if not known:
        wins = [e["faster"] for e in pool]
        return max(choices, key=wins.count)

    def distance(e):
        return sum(abs(math.log2(e[k] + 1) - math.log2(v + 1)) for k, v in known)

    return min(pool, key=distance)["faster"]


def faster_decode_backend(device: str, dtype: str, D, B, P, T, Lq) -> str:
    """"cuda" or "triton": the one to try first for this shape on this GPU.

    Under torch.compile the sizes may be symbolic (dynamic shapes; T grows every decode step),
    and specialising on them would recompile: there the choice is this GPU's and dtype's most
    frequent winner, a constant of the trace."""
    if torch.compiler.is_compiling():
        return _faster_constant(device, dtype)
    return _faster(device, dtype, D, B, P, T, Lq)


@torch.compiler.assume_constant_result
def _faster_constant(device: str, dtype: str) -> str:
    return _faster(device, dtype, None, None, None, None, None)


# Every layer of a decode step asks with the same shape: one lookup per step, not per layer.
@functools.lru_cache(maxsize=4096)
def _faster(device: str, dtype: str, D, B, P, T, Lq) -> str:
    table = load_table()
    if not table:  # nothing measured: no need to ask the GPU its name
        return DEFAULT
    try:
        gpu = torch.cuda.get_device_name(torch.device(device))
    except Exception:  # no usable CUDA (a CPU-only torch asked about a CUDA problem)
        return DEFAULT
    return nearest_faster(table.get(gpu, []), dtype, D, B, P, T, Lq) or DEFAULT
