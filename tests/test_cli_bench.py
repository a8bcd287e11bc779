"""`prefix-kernels bench`: runs a workload's benchmark script, writes its rows, prints them as a table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefix_kernels.cli import commands as cli


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
        assert "B=2 L=16 P=4" in line and f"{r['median_ms']:.3f}" in line and "tok/s" in line
        assert line.endswith("ran (smoke: checks the script, not a speed)")  # a smoke time is no speed
    assert "their times are not speeds" in out


def test_bench_plot(tmp_path, capsys):
    """Smoke rows are never drawn (benchmarks/plot.py leaves them out): --plot says so and draws nothing."""
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    assert cli.main(["bench", "--quick", "--workload", "train_step", "--out", str(tmp_path), "--plot"]) == 0
    assert not list((tmp_path / "plots").glob("*.png"))
    assert "\nno plots: " in capsys.readouterr().out


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


# --- --out checked before anything is measured; the table's numbers; the triton provider on a CPU ---


def _refuse_to_run(monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError("a benchmark ran before --out was checked")

    monkeypatch.setattr(cli, "run_workload", measured)


def test_bench_out_that_is_a_file_is_a_usage_error(tmp_path, monkeypatch, capsys):
    _refuse_to_run(monkeypatch)
    a_file = tmp_path / "rows.jsonl"
    a_file.write_text("")
    for out in (a_file, a_file / "below"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", "--quick", "--workload", "decode", "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --out" in err and str(a_file) in err


def test_bench_out_is_created(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run_workload", lambda bench, workload, argv, interpret: seen.append(argv) or [])
    out = tmp_path / "new" / "rows"
    assert cli.main(["bench", "--quick", "--workload", "decode", "--out", str(out)]) == 0
    assert out.is_dir() and seen == [["--smoke", "--out", str(out / "decode.jsonl")]]


def test_table_prints_small_rates_with_three_significant_digits():
    table = cli.format_rows([
        dict(workload="decode", mode="fwd", provider="a", shape={}, status="ok", median_ms=137.088, gbps=0.000194),
        dict(workload="attention", mode="fwd", provider="b", shape={}, status="ok", median_ms=0.0004, tflops=0.0012),
        dict(workload="generate", mode="sample", provider="c", shape={}, status="ok", median_ms=5.0,
             tokens_per_s=12345.6, peak_mib=0.25),
        dict(workload="decode", mode="fwd", provider="d", shape={}, status="ok", median_ms=1.0, gbps=None),
    ])
    a, b, c, d = table.splitlines()[2:]
    assert "137.088" in a and "0.000194 GB/s" in a
    assert "0.0004 " in b and "0.0012 TFLOP/s" in b  # not 0.000 ms, not 0.00 TFLOP/s
    assert "12346 tok/s" in c and "0.25" in c
    assert " - " in d and "GB/s" not in d and " 0 " not in d  # unmeasured: a dash, never 0


def test_table_shows_the_first_line_of_a_long_reason():
    reason = "InductorError: LoweringException: NotImplementedError: no\n  target: flex_attention\n  args[0]: ..."
    table = cli.format_rows([
        dict(workload="decode", mode="fwd", provider="flex", shape={}, status="skipped", reason=reason),
        dict(workload="decode", mode="fwd", provider="long", shape={}, status="skipped", reason="x" * 500),
    ])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2].endswith("skipped: InductorError: LoweringException: NotImplementedError: no ...")
    assert len(lines[3].split("skipped: ")[1]) <= cli.REASON_WIDTH


def test_child_environment_turns_the_interpreter_on(monkeypatch):
    import prefix_kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = cli._child_env(interpret=True)
    root = str(Path(prefix_kernels.__file__).resolve().parents[1])
    assert env["TRITON_INTERPRET"] == "1" and env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]
    assert "TRITON_INTERPRET" not in cli._child_env(interpret=False)


def test_bench_on_a_cpu_measures_the_triton_decode_provider(tmp_path):
    """`python -m prefix_kernels.cli` imports prefix_kernels (and so triton's jit) before bench
    runs: the interpreter must reach the benchmark anyway (it was skipped: InterpreterError)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the smoke rows run without the interpreter")
    import prefix_kernels

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(prefix_kernels.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-m", "prefix_kernels.cli", "bench", "--workload", "decode",
                           "--out", str(tmp_path)], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    triton_rows = [r for r in rows if r["provider"] == "prefix_kernels_triton"]
    assert triton_rows and all(r["status"] == "ok" for r in triton_rows), triton_rows
    table = done.stdout[done.stdout.index("rows written under"):]
    assert any("prefix_kernels_triton" in line and line.endswith("not a speed)") for line in table.splitlines())
