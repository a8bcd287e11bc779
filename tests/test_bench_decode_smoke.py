"""The decode benchmark script runs on the CPU (tiny shapes) and writes well-formed rows, so it cannot rot."""

import json

from helpers import benchmark_module


def test_bench_decode_smoke_writes_rows(tmp_path):
    bench_decode = benchmark_module("bench_decode")
    out = tmp_path / "decode.jsonl"
    providers = ["prefix_kernels_triton", "prefix_kernels_triton_fused", "prefix_kernels_triton_unfused_merge",
                 "prefix_kernels_triton_separate_parts", "sdpa_expanded", "prefix_kernels_cuda",
                 "prefix_kernels_cuda_fused", "prefix_kernels_cuda_separate_parts"]
    bench_decode.main(["--smoke", "--out", str(out), "--providers", *providers])
    bench_decode.main(["--smoke", "--out", str(out), "--providers", *providers])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * len(providers)  # 2 shapes x each provider: the rerun upserted, not appended
    for row in rows:
        for field in ("workload", "device", "torch", "commit", "prefix_kernels", "shape", "dtype", "bytes"):
            assert field in row
        if row["provider"].startswith("prefix_kernels_cuda"):
            # No CUDA here: the CUDA backend declines, and the row says why.
            assert row["status"] == "skipped" and row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["gbps"] > 0
        assert row["max_abs_err_vs_torch"] < 1e-4  # float32: every provider computes the same thing


def test_compiling_providers_are_timed_after_the_others_over_every_shape(tmp_path, monkeypatch):
    """A run cut at its time limit loses the compiling provider's last rows, not ours."""
    bench_decode = benchmark_module("bench_decode")
    seen = []

    def fake(name):
        def setup(q, k, v, pk, pv):
            seen.append((name, pk.shape[2]))
            return lambda: q
        return setup

    names = ["flex", "prefix_kernels_triton", "sdpa_expanded"]
    monkeypatch.setattr(bench_decode, "PROVIDERS", {n: fake(n) for n in names})
    rows = bench_decode.main(["--smoke", "--out", str(tmp_path / "d.jsonl"), "--providers", *names])
    assert seen == [("prefix_kernels_triton", 16), ("sdpa_expanded", 16), ("prefix_kernels_triton", 48),
                    ("sdpa_expanded", 48), ("flex", 16), ("flex", 48)]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)


def test_flex_is_compiled_once_with_room_for_every_shape():
    import torch._dynamo

    flex = benchmark_module("flex")
    flex.compiled_flex_attention.cache_clear()
    config = torch._dynamo.config
    before = config.recompile_limit
    try:
        config.recompile_limit = 8  # dynamo's default: fewer graphs than a full decode run makes (18)
        fn = flex.compiled_flex_attention()
        assert fn is flex.compiled_flex_attention()
        assert config.recompile_limit >= flex.RECOMPILE_LIMIT >= 18
    finally:
        config.recompile_limit = before
        flex.compiled_flex_attention.cache_clear()
    assert flex.timing_passes(["flex_broadcast", "prefix_kernels", "sdpa_copied"]) == [
        ["prefix_kernels", "sdpa_copied"], ["flex_broadcast"]]
    assert flex.timing_passes(["prefix_kernels"]) == [["prefix_kernels"]]
