"""The analytic model behind every benchmark row's predicted_ms (benchmarks/analytic.py)."""

from __future__ import annotations

import pytest

from helpers import benchmark_module

analytic = benchmark_module("analytic")
rows = benchmark_module("rows")

DECODE = dict(B=64, Hq=32, Hkv=8, Lq=1, T=256, P=16384, D=128, G=1)
ATTENTION = dict(B=16, Hq=32, Hkv=8, L=1024, P=1024, D=128, G=1, causal=True)


def test_decode_is_bandwidth_bound_and_sharing_reads_less():
    ours = analytic.predict(analytic.decode_cost(DECODE, "bfloat16"), "NVIDIA H100 80GB HBM3", "bfloat16")
    copied = analytic.predict(analytic.decode_cost(DECODE, "bfloat16", copied=True), "NVIDIA H100 80GB HBM3",
                              "bfloat16")
    assert ours["bound"] == "hbm" and copied["bound"] == "hbm"
    assert copied["bytes"] > 30 * ours["bytes"]  # B = 64 copies of a 16k prefix, against one
    # the prefix once (2 * 8 * 16384 * 128 * 2 B = 67 MB) plus the own caches, at 85% of 3.35 TB/s
    assert ours["predicted_ms"] == pytest.approx(ours["bytes"] / (3.35e12 * 0.85) * 1e3 + 0.01, rel=1e-6)


def test_training_is_matmul_bound_and_backward_costs_more():
    fwd = analytic.predict(analytic.attention_cost(ATTENTION, "bfloat16", "fwd"), "NVIDIA H200", "bfloat16", "fwd")
    both = analytic.predict(analytic.attention_cost(ATTENTION, "bfloat16", "fwd_bwd"), "NVIDIA H200", "bfloat16",
                            "fwd_bwd")
    assert fwd["bound"] == both["bound"] == "matmul"
    assert both["flops"] == pytest.approx(3.5 * fwd["flops"])
    assert both["predicted_ms"] > 3.5 * fwd["predicted_ms"] * 0.99


def test_unknown_device_gets_no_number_but_a_reason():
    row = dict(workload="decode", provider="prefix_kernels_cuda", dtype="bfloat16", device="cpu (x86_64)",
               shape=DECODE)
    rows.with_prediction(row)
    assert row["predicted_ms"] is None and "no datasheet entry" in row["predicted_bound"]


def test_rows_get_predictions_for_modelled_workloads_only():
    row = dict(workload="attention", mode="fwd_bwd", provider="sdpa_copied", dtype="bfloat16",
               device="NVIDIA H100 80GB HBM3", shape=ATTENTION)
    rows.with_prediction(row)
    assert row["predicted_ms"] > 0 and row["predicted_bound"] == "matmul"
    other = rows.with_prediction(dict(workload="generate", provider="x"))
    assert "predicted_ms" not in other
