"""Triton tile autotuning: the candidates are right (each against the reference, under the
interpreter), the offline table prunes them, the tuned table is built from timed rows, and the
launchers read it without tuning anything at run time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import benchmark_module, make_inputs, assert_close_to_reference
from prefix_kernels.backends.triton import tiles

tune = None


def _tune():
    global tune
    if tune is None:
        tune = benchmark_module("tune_triton")
    return tune


@pytest.mark.parametrize("kind", tiles.KINDS)
def test_every_16bit_candidate_is_right(kind, monkeypatch, triton_device):
    """Each candidate tile of a launch, the others at their defaults, against the float64
    reference (fp16: the interpreter's bf16 tl.dot is wrong); two prefixes, padding, causal."""
    default = tiles.kernel_blocks
    for config in tiles.CANDIDATES["16bit"][kind]:
        blocks = tiles.Blocks(*config)
        monkeypatch.setattr(tiles, "kernel_blocks", lambda k, *a, _b=blocks: _b if k == kind else default(k, *a))
        torch.manual_seed(0)
        inp = make_inputs(3, 4, 2, 40, 40, 37, 64, 2, torch.float16, triton_device, padding="left", transposed=True)
        assert_close_to_reference(inp, backend="triton", causal=True, desc=f"{kind} {config}")


def test_the_shipped_table_allows_the_defaults():
    """prefix_kernels/data/triton_configs.json (benchmarks/triton_configs.py, no GPU) keeps, for
    every head-dim block and kind, the default tiles of `blocks` among the allowed candidates."""
    table = tiles.load_json(tiles.CONFIGS)
    for arch in ("80", "90"):
        for dtype in (torch.bfloat16, torch.float32):
            for D in (64, 128, 256):
                for kind in tiles.KINDS:
                    key = f"{tiles.dtype_class(dtype)}/{D}/{kind}"
                    default = tiles.blocks(D, dtype, torch.device("cuda"), kind)
                    allowed = [tiles.Blocks(*c) for c in table[arch][key]]
                    assert default in allowed, (arch, key, default)


def test_table_takes_the_fastest_over_the_common_shapes():
    rows = []
    for config, times in (([64, 64, 4, 3], (1.0, 2.0)), ([128, 64, 8, 3], (0.9, 1.8)), ([16, 32, 4, 1], (0.1,))):
        for P, ms in zip((16, 1024), times):
            rows.append(dict(workload="tune", mode="forward", provider="triton", dtype="bfloat16", device="GPU X",
                             status="ok", median_ms=ms,
                             shape=dict(B=16, Hq=32, Hkv=8, L=1024, P=P, D=128, block_d=128, config=config)))
    rows.append(dict(rows[0], device="GPU X", smoke=True, median_ms=0.0001))  # smoke rows never count
    assert _tune().build_table(rows) == {"GPU X": {"16bit/128/forward": [128, 64, 8, 3]}}


def test_launchers_read_the_tuned_table(monkeypatch, tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"GPU X": {"16bit/128/dq": [128, 32, 8, 3]}}))
    monkeypatch.setattr(tiles, "TUNED", path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "GPU X")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    tiles._tuned_for.cache_clear()
    try:
        cuda = torch.device("cuda")
        assert tiles.kernel_blocks("dq", 128, torch.bfloat16, cuda) == tiles.Blocks(128, 32, 8, 3)
        assert tiles.kernel_blocks("dq", 96, torch.float16, cuda) == tiles.Blocks(128, 32, 8, 3)  # block 128
        assert tiles.kernel_blocks("forward", 128, torch.bfloat16, cuda) == tiles.blocks(128, torch.bfloat16, cuda)
        assert tiles.kernel_blocks("dq", 128, torch.float32, cuda) == tiles.blocks(128, torch.float32, cuda, "dq")
        # CPU tensors never consult it (nor ask for a GPU's name)
        assert tiles.kernel_blocks("dq", 128, torch.bfloat16, torch.device("cpu")) == tiles.Blocks(16, 16, 1, 1)
    finally:
        tiles._tuned_for.cache_clear()


def test_smoke_run_writes_rows_and_no_table(tmp_path):
    out, table = tmp_path / "tune.jsonl", tmp_path / "tuned.json"
    proc = subprocess.run([sys.executable, str(tiles.TUNED.parents[2] / "benchmarks" / "tune_triton.py"), "--smoke",
                           "--out", str(out), "--table", str(table)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["mode"] for r in rows} == set(tiles.KINDS) and all(r["status"] == "ok" and r["smoke"] for r in rows)
    assert not table.exists()  # smoke rows are no measurement
