"""The benchmark script runs on the CPU (tiny shapes) and writes well-formed rows, so it cannot rot."""

import json
import sys

from helpers import benchmark_module


def test_bench_attention_smoke_writes_rows(tmp_path):
    bench_attention = benchmark_module("bench_attention")
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
    bench_train_step = benchmark_module("bench_train_step")
    out = tmp_path / "train.jsonl"
    bench_train_step.main(["--smoke", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"peft_sdpa", "peft_eager", "prefix_kernels"}
    for row in rows:
        assert row["status"] == "ok", row.get("reason")
        assert row["tokens_per_s"] > 0 and row["workload"] == "train_step"


class _Terminal:
    """A stderr that says it is a terminal, so tqdm draws its bar into it."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass


def test_progress_upserts_each_case_and_draws_a_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    import pytest

    pytest.importorskip("tqdm")
    Progress = benchmark_module("rows").Progress
    out = tmp_path / "rows.jsonl"
    row = lambda i: dict(workload="w", mode="m", provider=f"p{i}", shape={}, dtype="f", device="d", status="ok")  # noqa: E731

    progress = Progress(out, total=2, desc="decode")  # pytest's captured stderr is no terminal
    progress.add(row(0), "first case")
    assert len(out.read_text().splitlines()) == 1  # written before the next case starts
    progress.add(row(1), "second case")
    progress.close()
    captured = capsys.readouterr()
    assert captured.out == "first case\nsecond case\n" and "decode" not in captured.err
    assert [r["provider"] for r in progress.rows] == ["p0", "p1"]

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(tmp_path / "more.jsonl", total=2, desc="decode")
    progress.add(row(0), "first case")
    progress.add(row(1), "second case")
    progress.close()
    drawn = terminal.buffer.getvalue()
    assert "decode" in drawn and "0/2" in drawn and "1/2" in drawn  # the bar counts the cases
    assert "first case" in capsys.readouterr().out + drawn
