"""The decode benchmark script runs on the CPU (tiny shapes) and writes well-formed rows, so it cannot rot."""

import json

from helpers import benchmark_module


def test_bench_decode_smoke_writes_rows(tmp_path):
    bench_decode = benchmark_module("bench_decode")
    out = tmp_path / "decode.jsonl"
    providers = ["prefix_kernels_triton", "sdpa_expanded", "prefix_kernels_cuda"]
    bench_decode.main(["--smoke", "--out", str(out), "--providers", *providers])
    bench_decode.main(["--smoke", "--out", str(out), "--providers", *providers])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 3  # 2 shapes x 3 providers: the rerun upserted, not appended
    for row in rows:
        for field in ("workload", "device", "torch", "commit", "prefix_kernels", "shape", "dtype", "bytes"):
            assert field in row
        if row["provider"] == "prefix_kernels_cuda":
            # No CUDA here: the CUDA backend declines, and the row says why.
            assert row["status"] == "skipped" and row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["gbps"] > 0
        assert row["max_abs_err_vs_torch"] < 1e-4  # float32: every provider computes the same thing
