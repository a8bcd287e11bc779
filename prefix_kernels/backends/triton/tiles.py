"""Tile sizes, split counts and the GPU facts they depend on: the one place tests override.

`on_gpu(device)` decides whether launches take GPU tiles and splits (off a GPU, the interpreter
takes small fixed ones so that test shapes cross several blocks); `sm_count(device)` sizes the
splits. tests/triton_offline_compile.py and the interpreted GPU-tile tests replace these two.
Tiles are chosen to fit shared memory and registers, not tuned: the compile tables behind them
(registers, spills, shared memory for sm_80 and sm_90, triton 3.6 and 3.9) are in
benchmarks/NOTES.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import triton


def on_gpu(device: torch.device) -> bool:
    """Whether launches on `device` take GPU tile sizes and splits; off a GPU (the interpreter)
    they take small fixed ones. tests/triton_offline_compile.py replaces this to build the GPU
    launches from CPU tensors."""
    return device.type == "cuda"


@dataclass(frozen=True)
class Blocks:
    m: int  # query rows per program (forward, dq) / per inner step (dk, dv)
    n: int  # keys per inner step (forward, dq) / per program (dk, dv)
    warps: int
    stages: int


def blocks(D: int, dtype: torch.dtype, device: torch.device, kind: str = "forward") -> Blocks:
    """The default tiles of a launch kind ("forward", "dq", "dkdv"), chosen to fit shared memory
    and registers (every one is among the candidates the offline compile tables allow on sm_80
    and sm_90, data/triton_configs.json) until a GPU's tuning run replaces them
    (kernel_blocks). 16-bit, D <= 128: the forward and dq on 128-row tiles of 8 warps (wgmma's
    64-row warpgroups; with the heads of a kv group stacked in them), dK/dV on 128-key tiles of 8
    warps taking 16 query rows a step through a 5-stage pipeline (no spills on sm_80 or sm_90 at
    D <= 128, where 32 rows a step spilled 64-120 B per thread). fp32 takes exact products (PRECISION "ieee"), which hold whole operand tiles in
    registers: small tiles on 8 warps keep them out of the stack; 16-bit D > 128 takes 8 warps
    for the same reason (the spill tables behind both are in benchmarks/NOTES.md).
    Under the interpreter 16 x 16 tiles make every test shape cross several blocks in a few steps."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not on_gpu(device):
        return Blocks(16, 16, 1, 1)
    wide = D > 128
    if dtype == torch.float32:
        if kind != "forward":
            return Blocks(32, 16, 8, 1)
        return Blocks(32, 32, 8, 2) if D <= 64 else Blocks(32, 16, 8, 2)
    if kind == "dq":
        return Blocks(16, 32, 4, 1) if wide else Blocks(128, 64, 8, 2)
    if kind == "dkdv":
        return Blocks(16, 32, 4, 1) if wide else Blocks(16, 128, 8, 5)
    if D <= 64:
        return Blocks(128, 64, 4, 3)
    return Blocks(64, 32, 8, 2) if wide else Blocks(128, 64, 8, 3)


def preprocess_rows(device: torch.device, D: int) -> int:
    """Rows per program of the backward's delta kernel on a GPU (streaming, no shared memory):
    64 rows, 32 past a 128-wide head dim (64 x 256 fp32 values of two tensors took 240
    registers on sm_90); 16 under the interpreter."""
    if not on_gpu(device):
        return 16
    return 64 if block_d(D) <= 128 else 32


def needs_wide_rows(*rows_and_strides) -> bool:
    """Whether a kernel's row offsets (rows x row stride, for each (rows, stride) given) can pass
    2**31: then it takes 64-bit row offsets (a WIDE constexpr), which cost registers, and only
    then (the decode prefix kernel spills on sm_80 with them)."""
    return any(rows * abs(stride) >= 2**31 for rows, stride in rows_and_strides)


# The launches whose tiles are chosen separately: the forward, the backward's dq kernel (BLOCK_M
# query rows per program, BLOCK_N keys per step) and its dK/dV kernels (BLOCK_N keys per
# program, BLOCK_M query rows per step).
KINDS = ("forward", "dq", "dkdv")
TUNED = Path(__file__).resolve().parents[2] / "data" / "triton_tuned.json"
CONFIGS = Path(__file__).resolve().parents[2] / "data" / "triton_configs.json"


def dtype_class(dtype: torch.dtype) -> str:
    """fp16 and bf16 share their tiles (same bytes, same tensor-core rate); fp32 has its own."""
    return "float32" if dtype == torch.float32 else "16bit"


def block_d(D: int) -> int:
    """The padded head-dim block the kernels use (and the key of the tile tables)."""
    return max(16, triton.next_power_of_2(D))


# The configurations tune_triton.py times, per launch kind and dtype class: (BLOCK_M, BLOCK_N,
# warps, stages). tests/triton_offline_compile.py --candidates compiles each at every head-dim
# block for sm_80 and sm_90 and keeps those within the card's shared memory and without spills
# (prefix_kernels/data/triton_configs.json); only those are timed. The defaults of `blocks` are
# among them. dq: 128-row tiles on 8 warps (wgmma needs 64-row warpgroups); dK/dV: 128-key
# tiles on 8 warps with deeper pipelines.
CANDIDATES = {
    "16bit": {
        "forward": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4),
                    (128, 128, 8, 2), (64, 32, 8, 2), (16, 32, 4, 1)],
        "dq": [(32, 64, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (16, 32, 4, 1)],
        "dkdv": [(32, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 4), (16, 128, 8, 5), (64, 64, 4, 2),
                 (16, 32, 4, 1)],
    },
    "float32": {
        "forward": [(32, 32, 8, 2), (32, 16, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
        "dq": [(32, 16, 8, 1), (32, 32, 8, 1), (64, 16, 8, 1)],
        "dkdv": [(32, 16, 8, 1), (16, 32, 8, 1), (32, 32, 8, 1)],
    },
}


def allowed_candidates(kind: str, D: int, dtype: torch.dtype, capability: int) -> list:
    """The candidates the offline compile tables allow for this launch on this architecture
    (compute capability x10), as Blocks; every candidate when no table was built."""
    key = f"{dtype_class(dtype)}/{block_d(D)}/{kind}"
    table = load_json(CONFIGS).get(str(capability))
    if table is None or key not in table:
        return [Blocks(*c) for c in CANDIDATES[dtype_class(dtype)][kind]]
    return [Blocks(*c) for c in table[key]]


def kernel_blocks(kind: str, D: int, dtype: torch.dtype, device: torch.device) -> Blocks:
    """The tiles of one launch: the entry `benchmarks/tune_triton.py` measured fastest on this
    GPU (prefix_kernels/data/triton_tuned.json, chosen among the configurations the offline
    compile tables allow), else `blocks`' defaults. Nothing is tuned at run time."""
    if device.type == "cuda":  # a real GPU (the offline compile runs GPU tiles on CPU tensors)
        tuned = _tuned_for(device.index if device.index is not None else torch.cuda.current_device())
        entry = tuned.get(f"{dtype_class(dtype)}/{block_d(D)}/{kind}")
        if entry is not None:
            return Blocks(*entry)
    return blocks(D, dtype, device, kind)


@lru_cache(maxsize=None)
def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


@lru_cache(maxsize=None)
def _tuned_for(index: int) -> dict:
    table = load_json(TUNED)
    if not table:  # nothing tuned: no need to ask the GPU its name
        return {}
    return table.get(torch.cuda.get_device_name(index), {})


def head_pack(group: int, block_m: int) -> int:
    """How many query heads of one kv group a dq program stacks in its block_m rows: the largest
    power of two dividing `group` (they must share the kv head) that leaves at least 16 query
    positions (tl.dot's smallest tile) per head, at most 8."""
    pack = 1
    while pack < 8 and group % (2 * pack) == 0 and block_m // (2 * pack) >= 16:
        pack *= 2
    return pack


def sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def prefix_splits(B: int, G: int, kv_programs: int, device: torch.device, group: int = 1) -> int:
    """How many splits of each prefix's work reduce its prefix gradient.

    A grid over prefix blocks alone has cdiv(P, BLOCK_N) * Hkv * G programs: 8 for P = 16,
    Hkv = 8, far below an H100's 132 SMs. Each prefix's work is (its requests) x (the `group`
    query heads of a kv head) units; S splits take balanced runs of them, and the (S, G, Hkv, P,
    D) fp32 partials are summed in a fixed order. S is the count that minimises the predicted
    time, waves x the longest run (cdiv(kv_programs * S, 2 SMs) x cdiv(units, S)), the smaller on
    a tie (fewer partials to write and sum), with S * G < B so that the partial buffer never
    reaches the (B, Hkv, P, D) size of a per-request copy.
    """
    cap = max(1, (B - 1) // G)
    if not on_gpu(device):
        return min(2, cap)  # exercise the split-and-sum path under the interpreter
    slots = 2 * sm_count(device)  # registers allow two of these programs per SM
    units = triton.cdiv(B, G) * group
    cap = min(cap, units, 65535 // G)

    def cost(s):
        return triton.cdiv(kv_programs * s, slots) * triton.cdiv(units, s)

    return min(range(1, cap + 1), key=lambda s: (cost(s), s))


# Splits on a CPU (the interpreter): fixed and small, so that the tests exercise the split and
# merge path (and splits that see only padding) at tiny sizes.
CPU_SPLITS = 2
# Fewest keys a split should hold on a GPU: below this the split's fixed costs (loading q,
# writing its partial) outweigh the keys it reads.
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeBlocks:
    prefix_m: int  # stacked rows per prefix program
    prefix_n: int  # prefix keys per tile
    own_m: int  # rows (group * Lq, padded) per own-cache program
    own_n: int  # own keys per tile
    warps: int
    stages: int


def decode_blocks(D: int, R: int, dtype: torch.dtype, device: torch.device, has_pidx: bool = False,
                  Lq: int = 1) -> DecodeBlocks:
    """Tile sizes. The prefix program has the forward kernel's shape (BLOCK_M stacked rows
    against BLOCK_N keys), so it takes the forward's tiles, but at most 64 rows at 16-bit
    D <= 128 when a stacked row's request comes from the grouping tables (has_pidx) or its head
    and position from a division by Lq > 1 (Lq = 1 is a compile-time constant): the per-row
    indices held across the key loop pushed the 128-row tile to 255 registers and up to 112 B
    (sm_90) / 160 B (sm_80) of stack, and 64 rows compile without spills on both
    (benchmarks/NOTES.md). The own-cache program takes the group * Lq rows of one request and kv
    head, padded to tl.dot's minimum of 16 and capped at the forward's BLOCK_M.
    Not autotuned: no GPU was at hand when these were set.
    Under the interpreter 16-row blocks and 32-key tiles make the test shapes cross several row
    blocks and tiles."""
    if not on_gpu(device):
        return DecodeBlocks(16, 32, max(16, min(32, triton.next_power_of_2(R))), 32, 1, 1)
    fwd = blocks(D, dtype, device, "forward")
    own_m = max(16, min(fwd.m, triton.next_power_of_2(R)))
    prefix_m = fwd.m
    if (has_pidx or Lq > 1) and dtype != torch.float32 and D <= 128:
        prefix_m = min(prefix_m, 64)
    return DecodeBlocks(prefix_m, fwd.n, own_m, fwd.n, fwd.warps, fwd.stages)


# The fused merge (decode_own_kernel with MERGE) holds each loaded (own_m, BLOCK_D) fp32 prefix
# partial beside the (own_m, BLOCK_D) fp32 accumulator, and writes the output in q's dtype from
# the accumulator's layout. Compiled offline (triton 3.9, benchmarks/NOTES.md), 16 accumulator
# values per thread compile without spills on sm_80 and sm_90; at 32 the 16-bit 64 x 64 tile on
# 4 warps (D = 64, Lq = 16) took 255 registers and 8 B of stack on sm_80 (the unfused kernel 182,
# none), and at 64 (128 x 128 on 8 warps: D = 128, group 8, Lq = 16) 56 B. Past this the merge
# keeps its own launch: the serving case (Lq = 1, own_m = 16) holds 8 at D = 128.
MERGE_VALUES_PER_THREAD = 16


def merge_fits(own_m: int, block_d: int, warps: int, device: torch.device) -> bool:
    """Whether the own kernel may merge in registers (the launcher's merge_in_own): at most
    MERGE_VALUES_PER_THREAD accumulator values per thread on a GPU; always under the interpreter,
    which has no registers."""
    if not on_gpu(device):
        return True
    return own_m * block_d <= MERGE_VALUES_PER_THREAD * 32 * warps


# The most the split partials may weigh, written and read back, as a share of the bytes a decode
# step reads (the caches and the queries): more splits fill more SMs but move more bytes, and a
# decode step is bound by the bytes it moves.
PARTIAL_SHARE = 0.1


def split_caps(step_bytes: int, rows: int, D: int, P: int, T: int) -> tuple[int, int]:
    """(prefix part, own part) split caps: all splits' fp32 partials, rows x (D + 1) floats each,
    written then read back by the merge, within PARTIAL_SHARE of step_bytes, shared between the
    parts in proportion to their keys (each part may always take one split)."""
    per_split = 2 * rows * (D + 1) * 4
    budget = int(PARTIAL_SHARE * step_bytes) // per_split
    keys = max(1, P + T)
    return max(1, budget * P // keys), max(1, budget * T // keys)


def choose_splits(programs: int, keys: int, block_n: int, sm_count: int | None, traffic_cap: int) -> int:
    """How many key splits give `programs` (the grid without splits) about two waves of work.

    sm_count None (CPU, the interpreter): CPU_SPLITS. On a GPU a split holds a whole number of
    tiles and at least MIN_KEYS_PER_SPLIT keys, and there are at most `traffic_cap` splits
    (split_caps: the partials of all splits within a tenth of the step's bytes). Without a cap a
    short prefix shared by a large batch (B = 64, Hq = 32, P = 1024) would be split 8 ways and
    its partials would move 4x the bytes of the prefix itself.
    """
    tiles = triton.cdiv(keys, block_n)
    if keys == 0:
        return 0
    if sm_count is None:
        return min(CPU_SPLITS, tiles)
    want = triton.cdiv(2 * sm_count, max(1, programs))
    most = min(tiles, triton.cdiv(keys, MIN_KEYS_PER_SPLIT), MAX_SPLITS, traffic_cap)
    return max(1, min(want, most))


def keys_per_split(keys: int, splits: int, block_n: int) -> tuple[int, int]:
    """(keys per split, a multiple of block_n; the number of non-empty splits)."""
    if splits == 0:
        return block_n, 0
    per = triton.cdiv(triton.cdiv(keys, block_n), splits) * block_n
    return per, triton.cdiv(keys, per)


