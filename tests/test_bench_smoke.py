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


def test_smoke_rows_never_replace_measured_ones(tmp_path):
    rows = benchmark_module("rows")
    path = tmp_path / "attention.jsonl"
    measured = dict(workload="attention", mode="fwd", provider="p", shape={"B": 1}, dtype="bfloat16", device="gpu",
                    median_ms=1.0, status="ok")  # a row written before the smoke field existed
    rows.upsert(path, [measured])
    rows.upsert(path, [dict(measured, median_ms=9.0, smoke=True)])
    rows.upsert(path, [dict(measured, median_ms=2.0, smoke=False)])  # a measured rerun replaces it
    assert sorted((r.get("smoke", False), r["median_ms"]) for r in rows.read_rows(path)) == [(False, 2.0), (True, 9.0)]
    assert [p.name for p in tmp_path.iterdir()] == ["attention.jsonl"]  # written beside, renamed: no .tmp left


def test_counts_must_be_positive(capsys):
    import pytest

    for script, argv in (("bench_generate", ["--cpu", "--repeats", "0"]), ("bench_train_step", ["--smoke", "--steps", "0"]),
                         ("bench_attention", ["--smoke", "--providers", "foo"])):
        with pytest.raises(SystemExit):
            benchmark_module(script).main(argv)
        err = capsys.readouterr().err
        assert ("--repeats" in err or "--steps" in err or "--providers" in err), err


def test_commit_says_dirty_but_not_for_stored_rows(tmp_path, monkeypatch):
    """A tree with edits to tracked files other than the rows is not HEAD; an exported
    PREFIX_KERNELS_COMMIT does not override a real checkout."""
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(benchmark_module("rows").__file__, repo / "benchmarks" / "rows.py")
    (repo / "benchmarks" / "results" / "a.jsonl").write_text("")
    (repo / "code.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "init"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    probe = [sys.executable, "-c", "import rows; print(rows.git_commit())"]

    def commit():
        return subprocess.run(probe, cwd=repo / "benchmarks", capture_output=True, text=True, check=True).stdout.strip()

    monkeypatch.setenv("PREFIX_KERNELS_COMMIT", "deadbee")
    assert commit() == head
    (repo / "benchmarks" / "results" / "a.jsonl").write_text("{}\n")  # rows written by a run
    assert commit() == head
    (repo / "code.py").write_text("x = 2\n")
    assert commit() == head + "-dirty"


def test_flex_broadcast_matches_sdpa(monkeypatch):
    """The prefix's K/V have batch 1: flex takes them only with a block mask (it raised without one).
    Checked with eager flex_attention (compiled flex with return_lse does not run on a CPU)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    bench = benchmark_module("bench_attention")
    monkeypatch.setattr(bench, "compiled_flex_attention", lambda: flex_attention)
    q, k, v, pk, pv = (t.detach() for t in bench.make_inputs(2, 4, 2, 32, 16, 32, torch.float32, torch.device("cpu")))
    torch.testing.assert_close(bench.provider_flex_broadcast(q, k, v, pk, pv),
                               bench.provider_sdpa_copied(q, k, v, pk, pv), rtol=1e-5, atol=1e-5)
