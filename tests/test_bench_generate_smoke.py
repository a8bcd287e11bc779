"""The generate benchmark script runs on the CPU (tiny model) and writes well-formed rows, so it cannot rot."""

import json

import pytest

from helpers import benchmark_module


def test_bench_generate_smoke_writes_rows(tmp_path):
    pytest.importorskip("transformers")
    bench_generate = benchmark_module("bench_generate")
    out = tmp_path / "generate.jsonl"
    bench_generate.main(["--smoke", "--out", str(out)])
    bench_generate.main(["--smoke", "--out", str(out), "--repeats", "1"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4  # 2 modes x 2 providers: the rerun upserted, not appended
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (m, p) for m in ("sample", "system") for p in ("hf_generate_sdpa", "prefix_kernels_generate")}
    for row in rows:
        assert row["status"] == "ok", row.get("reason")
        assert row["workload"] == "generate" and row["tokens_per_s"] > 0 and row["median_ms"] > 0
        assert row["shape"]["B"] == 4 and row["shape"]["prompt"] == 8 and row["shape"]["new"] == 4
        assert row["shape"].get("own") == (5 if row["mode"] == "system" else None)
        for field in ("device", "torch", "transformers", "commit", "prefix_kernels", "dtype", "peak_mib"):
            assert field in row
    # float32 on the CPU, same seed: the shared prompt computed once gives the same tokens, both
    # for samples from one prompt and for padded requests behind a shared one
    for pk in (r for r in rows if r["provider"] == "prefix_kernels_generate"):
        assert pk["tokens_match_hf"] is True, pk["mode"]


def test_bench_generate_reports_a_failing_provider(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    bench_generate = benchmark_module("bench_generate")
    import prefix_kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(prefix_kernels, "generate", broken)
    out = tmp_path / "generate.jsonl"
    bench_generate.main(["--smoke", "--out", str(out), "--repeats", "1"])
    rows = {r["provider"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["hf_generate_sdpa"]["status"] == "ok"
    skipped = rows["prefix_kernels_generate"]
    assert skipped["status"] == "skipped" and "no kernel for this" in skipped["reason"]
