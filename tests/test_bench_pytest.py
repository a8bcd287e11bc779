"""`pytest benchmarks --benchmark-only` runs (tiny shapes on a CPU), so the harness cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
ROOT = Path(__file__).resolve().parents[1]


def test_pytest_benchmark_harness_runs(tmp_path):
    env_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "--benchmark-min-rounds=1", "--benchmark-max-time=0.05", "--benchmark-warmup=off",
         f"--benchmark-json={env_json}", "-rs"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
    import json

    names = {b["name"] for b in json.loads(env_json.read_text())["benchmarks"]}
    assert any(n.startswith("test_attention") and "prefix_kernels" in n for n in names), names
    assert any(n.startswith("test_decode") and "sdpa_expanded" in n for n in names), names
