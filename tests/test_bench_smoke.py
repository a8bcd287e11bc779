"""The benchmark script runs on the CPU (tiny shapes) and writes well-formed rows, so it cannot rot."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_attention_smoke_writes_rows(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_attention
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "rows.jsonl"
    bench_attention.main(["--smoke", "--out", str(out), "--providers", "prefix_kernels", "sdpa_copied"])
    bench_attention.main(["--smoke", "--out", str(out), "--providers", "prefix_kernels", "sdpa_copied"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2  # 2 shapes x 2 modes x 2 providers: the rerun upserted, not appended
    for row in rows:
        assert row["status"] == "ok"
        for field in ("device", "torch", "commit", "prefix_kernels", "median_ms", "tflops", "shape", "dtype"):
            assert field in row


def test_bench_train_step_smoke_writes_rows(tmp_path):
    import pytest

    pytest.importorskip("peft")
    sys.path.insert(0, str(BENCH))
    try:
        import bench_train_step
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "train.jsonl"
    bench_train_step.main(["--smoke", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"peft_sdpa", "peft_eager", "prefix_kernels"}
    for row in rows:
        assert row["status"] == "ok", row.get("reason")
        assert row["tokens_per_s"] > 0 and row["workload"] == "train_step"
