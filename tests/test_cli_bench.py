"""`prefix-kernels bench`: runs a workload's benchmark script, writes its rows, prints them as a table."""

import json

import pytest

from prefix_kernels import cli


def test_bench_quick_train_step_writes_rows_and_prints_table(tmp_path, capsys):
    pytest.importorskip("peft")
    assert cli.main(["bench", "--quick", "--workload", "train_step", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train_step.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"peft_sdpa", "peft_eager", "prefix_kernels"}
    assert all(r["status"] == "ok" and r["workload"] == "train_step" for r in rows)
    out = capsys.readouterr().out
    assert "--smoke" in out  # says it ran the tiny variant
    assert f"{len(rows)} rows written under {tmp_path}" in out
    header = next(line for line in out.splitlines() if line.startswith("workload"))
    for column in ("provider", "shape", "median ms", "rate", "peak MiB", "status"):
        assert column in header
    for r in rows:
        line = next(line for line in out.splitlines() if line.startswith("train_step") and f" {r['provider']} " in line)
        assert "B=2 L=16 P=4" in line and f"{r['median_ms']:.3f}" in line and "tok/s" in line and line.endswith("ok")


def test_bench_plot(tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    assert cli.main(["bench", "--quick", "--workload", "train_step", "--out", str(tmp_path), "--plot"]) == 0
    pngs = list((tmp_path / "plots").glob("train_step_speedup_*.png"))
    assert len(pngs) == 1 and str(pngs[0]) in capsys.readouterr().out


def test_table_shows_why_a_row_was_skipped():
    table = cli.format_rows([
        dict(workload="decode", mode="fwd", provider="prefix_kernels_cuda", shape=dict(B=2, P=16, causal=True),
             status="skipped", reason="NoBackendError: no CUDA device"),
        dict(workload="decode", mode="fwd", provider="sdpa_expanded", shape=dict(B=2, P=16, causal=True),
             status="ok", median_ms=0.25, gbps=12.5, peak_mib=None),
    ])
    skipped, ok = table.splitlines()[2:]
    assert "prefix_kernels_cuda" in skipped and skipped.endswith("skipped: NoBackendError: no CUDA device")
    assert "0.250" in ok and "12.5 GB/s" in ok and "B=2 P=16" in ok and "causal" not in ok


def test_bench_without_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "site-packages" / "benchmarks")
    assert cli.main(["bench", "--quick", "--workload", "train_step", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "repository checkout" in err and "wheel" in err
    assert not (tmp_path / "train_step.jsonl").exists()
