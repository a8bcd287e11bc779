"""The shared-prompt benchmark runs on the CPU (tiny model) and writes well-formed rows, its output
check flags a provider whose logits differ from stock's, and its CPU memory reading sees a step's
allocations even when an earlier step freed as much: so that it cannot rot or report a wrong
provider's speed."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from helpers import benchmark_module

pytest.importorskip("transformers")

HAS_PREFIX_GROUPER = importlib.util.find_spec("prefix_grouper") is not None


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bench_shared_prompt_smoke_writes_rows(tmp_path):
    bench = benchmark_module("bench_shared_prompt")
    out = tmp_path / "shared_prompt.jsonl"
    returned = bench.main(["--smoke", "--out", str(out)])
    rows = _rows(out)
    assert len(rows) == len(returned) == 2 * 3  # G in (2, 4) x 3 providers
    assert {(r["shape"]["G"], r["provider"]) for r in rows} == {
        (G, p) for G in (2, 4) for p in ("stock_sdpa", "prefix_grouper", "prefix_kernels")}
    for row in rows:
        if row["provider"] == "prefix_grouper" and not HAS_PREFIX_GROUPER:
            assert row["status"] == "skipped" and "pip install prefix-grouper==0.0.1.post1" in row["reason"]
            continue
        assert row["status"] == "ok", row.get("reason")
        assert row["workload"] == "shared_prompt" and row["mode"] == "logprob_fwd_bwd" and row["smoke"] is True
        assert row["steps"] == 2 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["tokens_per_s"] > 0 and row["tokens_counted"].startswith("completion tokens")
        assert row["tokens_per_s"] == pytest.approx(row["completion_tokens"] / (row["median_ms"] * 1e-3))
        assert row["B"] == 2 * row["shape"]["G"] and row["shape"]["Lp"] == 16 and row["shape"]["Lc"] == 8
        for field in ("device", "torch", "transformers", "commit", "prefix_kernels", "dtype", "peak_mib", "peak_what"):
            assert field in row
        # float32: every provider's logits on the completion tokens are stock's to rounding
        assert row["matches_stock"] is True and row["max_abs_logit_diff"] <= 1e-5, row
        assert row["reference_dtype"] == "float64" and row["ref_err"] <= row["match_tol"]
    assert all(r["shared"] is True for r in rows if r["provider"] == "prefix_kernels")  # the prompts ran once
    bench.main(["--smoke", "--out", str(out), "--groups", "2", "--providers", "stock_sdpa"])
    assert len(_rows(out)) == 6  # the rerun upserted, not appended


def _noisy_completion_logits(monkeypatch, shift):
    import prefix_kernels

    original = prefix_kernels.completion_logits

    def noisy(*args, **kwargs):
        out = original(*args, **kwargs)
        return dataclasses.replace(out, logits=out.logits + shift)

    monkeypatch.setattr(prefix_kernels, "completion_logits", noisy)


def test_a_provider_whose_logits_differ_from_stock_is_flagged(tmp_path, monkeypatch):
    bench = benchmark_module("bench_shared_prompt")
    _noisy_completion_logits(monkeypatch, 1e-3)  # far above float32 rounding, far below a real bug
    out = tmp_path / "shared_prompt.jsonl"
    bench.main(["--smoke", "--out", str(out), "--groups", "2", "--providers", "stock_sdpa", "prefix_kernels"])
    rows = {r["provider"]: r for r in _rows(out)}
    assert rows["stock_sdpa"]["matches_stock"] is True
    flagged = rows["prefix_kernels"]
    assert flagged["status"] == "ok" and flagged["matches_stock"] is False  # timed, and flagged
    assert flagged["max_abs_logit_diff"] == pytest.approx(1e-3, rel=1e-2) and flagged["ref_err"] > flagged["match_tol"]
    # a wrong result's speed is no speedup: the headline names it instead
    for row in rows.values():
        row["smoke"] = False
    headline = benchmark_module("headline")
    (entry,) = headline.headline(list(rows.values()))
    assert entry["shapes"] == 0 and "did not match stock" in entry["skipped"]["prefix_kernels"]
    assert benchmark_module("plot").speedup_series(list(rows.values()), "G", ("Lc",)) == {}


@pytest.mark.skipif(not HAS_PREFIX_GROUPER, reason="prefix_grouper is not installed (pip install '.[bench]')")
def test_prefix_grouper_with_a_wrong_attention_adapter_is_flagged(tmp_path, monkeypatch):
    """The check sees a real mistake in the Prefix Grouper path: an adapter that drops the causal mask."""
    import torch

    bench = benchmark_module("bench_shared_prompt")
    correct = bench._prefix_grouper_sdpa

    def no_causal_mask(module, query, key, value, padding_mask, *args, dropout=0.0, scaling=None, **kwargs):
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=padding_mask.bool()[:, None, None, :], scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    monkeypatch.setattr(bench, "_prefix_grouper_sdpa", no_causal_mask)
    out = tmp_path / "shared_prompt.jsonl"
    try:
        bench.main(["--smoke", "--out", str(out), "--groups", "2", "--providers", "stock_sdpa", "prefix_grouper"])
    finally:
        monkeypatch.setattr(bench, "_prefix_grouper_sdpa", correct)
        bench.register_prefix_grouper()  # the right adapter back in transformers' registry
    rows = {r["provider"]: r for r in _rows(out)}
    assert rows["prefix_grouper"]["status"] == "ok" and rows["prefix_grouper"]["matches_stock"] is False
    assert rows["prefix_grouper"]["max_abs_logit_diff"] > 1e-3


def test_a_failing_provider_is_skipped_with_its_reason(tmp_path, monkeypatch):
    import prefix_kernels

    bench = benchmark_module("bench_shared_prompt")

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(prefix_kernels, "completion_logits", broken)
    out = tmp_path / "shared_prompt.jsonl"
    bench.main(["--smoke", "--out", str(out), "--groups", "2", "--providers", "stock_sdpa", "prefix_kernels"])
    rows = {r["provider"]: r for r in _rows(out)}
    assert rows["stock_sdpa"]["status"] == "ok"
    assert rows["prefix_kernels"]["status"] == "skipped" and "no kernel for this" in rows["prefix_kernels"]["reason"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_step_after_one_that_freed_as_much():
    """Without the heap trimmed, the second reading was ~0 MiB: the first step's freed chunks were
    still resident and reused unseen."""
    import torch

    bench = benchmark_module("bench_shared_prompt")

    def step():  # 16 tensors of 4 MiB alive at once: heap chunks, not mmaps, after the first free
        held = [torch.ones(2**20) for _ in range(16)]
        return sum(float(t[0]) for t in held)

    readings = [bench.rss_delta_mib(step) for _ in range(3)]
    for peak, why in readings:
        if why and "glibc" in why:
            pytest.skip(why)
        assert why is None and peak >= 48, readings
