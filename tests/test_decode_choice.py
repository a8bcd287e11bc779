"""`"auto"` tries first the decode backend that the benchmark measured faster (issue: "auto picks
whichever the benchmark shows faster for the shape"): the table built from bench_decode.py's
rows, the nearest-shape lookup, and the dispatcher's order, eager and under torch.compile. A
GPU is simulated (its name and the table are monkeypatched); nothing here needs one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from prefix_kernels.backends import decode_choice, registry
from prefix_kernels._core.problem import Problem

ROOT = Path(__file__).resolve().parent.parent
GPU = "NVIDIA Simulated 80GB"


def _script():
    spec = importlib.util.spec_from_file_location("decode_choice_script", ROOT / "benchmarks" / "decode_choice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(provider, ms, B=64, P=4096, T=256, status="ok", device=GPU):
    return dict(workload="decode", mode="fwd", provider=provider, status=status, median_ms=ms, device=device,
                dtype="bfloat16", shape=dict(B=B, Hq=32, Hkv=8, Lq=1, T=T, P=P, D=128, G=1, causal=True))


def _problem(B=64, P=4096, Lk=256, Lq=1, D=128, dtype=torch.bfloat16):
    return Problem(B=B, Hq=32, Hkv=8, Lq=Lq, Lk=Lk, D=D, G=1, P=P, dtype=dtype, device=torch.device("cuda"))


@pytest.fixture
def simulated_gpu(monkeypatch, tmp_path):
    """A GPU named GPU and a table file of our own; the caches emptied before and after."""
    path = tmp_path / "decode_choice.json"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: GPU)
    monkeypatch.setattr(decode_choice, "TABLE", path)
    real_load = decode_choice.load_table
    monkeypatch.setattr(decode_choice, "load_table", lambda p=None: real_load(path))

    def write(table):
        path.write_text(json.dumps(table))
        real_load.cache_clear()
        decode_choice._faster.cache_clear()

    write({})
    yield write
    real_load.cache_clear()
    decode_choice._faster.cache_clear()


def test_table_keeps_the_faster_where_both_ran():
    rows = [
        _row("prefix_kernels_cuda", 0.50), _row("prefix_kernels_triton", 0.40),  # triton faster
        _row("prefix_kernels_cuda", 0.20, B=8), _row("prefix_kernels_triton", 0.30, B=8),  # cuda faster
        _row("prefix_kernels_cuda", 0.10, B=256),  # triton missing: no entry
        _row("prefix_kernels_triton", 0.05, B=256, status="skipped"),
        _row("flashinfer_cascade", 0.01),  # not a choice of ours
    ]
    table = _script().build_table(rows)
    assert list(table) == [GPU]
    got = {e["B"]: e["faster"] for e in table[GPU]}
    assert got == {64: "triton", 8: "cuda"}


def test_nearest_shape_in_log_space_prefers_same_dtype_and_head_dim():
    entries = [dict(dtype="bfloat16", D=128, B=8, P=1024, T=256, Lq=1, faster="cuda"),
               dict(dtype="bfloat16", D=128, B=256, P=16384, T=256, Lq=1, faster="triton"),
               dict(dtype="float16", D=64, B=200, P=16000, T=256, Lq=1, faster="cuda")]
    assert decode_choice.nearest_faster(entries, "bfloat16", 128, 16, 2048, 300, 1) == "cuda"
    assert decode_choice.nearest_faster(entries, "bfloat16", 128, 128, 8192, 300, 1) == "triton"
    # no bf16 D=96 entry: every bf16 entry is a candidate (not the nearer fp16 one)
    assert decode_choice.nearest_faster(entries, "bfloat16", 96, 200, 16000, 256, 1) == "triton"
    # no fp32 entry at all: every entry is a candidate
    assert decode_choice.nearest_faster(entries, "float32", 64, 200, 16000, 256, 1) == "cuda"
    assert decode_choice.nearest_faster([], "bfloat16", 128, 8, 8, 8, 1) is None
    # no sizes (symbolic under compile): the most frequent winner of the candidates
    more = entries + [dict(dtype="bfloat16", D=128, B=64, P=64, T=64, Lq=1, faster="triton")]
    assert decode_choice.nearest_faster(more, "bfloat16") == "triton"
    assert decode_choice.nearest_faster(entries, "float16") == "cuda"


def test_auto_order_follows_the_measurement(simulated_gpu):
    assert registry._auto_order(_problem(), True) == ("cuda", "triton", "torch")  # nothing measured
    simulated_gpu({GPU: [dict(dtype="bfloat16", D=128, B=64, P=4096, T=256, Lq=1, faster="triton")]})
    assert registry._auto_order(_problem(), True) == ("triton", "cuda", "torch")
    simulated_gpu({"Another GPU": [dict(dtype="bfloat16", D=128, B=64, P=4096, T=256, Lq=1, faster="triton")]})
    assert registry._auto_order(_problem(), True) == ("cuda", "triton", "torch")  # not this GPU's
    assert registry._auto_order(
        Problem(B=2, Hq=4, Hkv=2, Lq=1, Lk=3, D=16, G=1, P=2, dtype=torch.float32, device=torch.device("cpu")), True
    ) == ("torch",)


def test_auto_order_is_a_constant_under_compile(simulated_gpu):
    simulated_gpu({GPU: [dict(dtype="bfloat16", D=128, B=64, P=4096, T=256, Lq=1, faster="triton")]})
    p = _problem()

    def first_is_triton(x):
        return x + (registry._auto_order(p, True)[0] == "triton")

    torch._dynamo.reset()
    assert float(torch.compile(first_is_triton, fullgraph=True, backend="eager")(torch.zeros(()))) == 1.0


def test_shipped_table_is_valid():
    table = decode_choice.load_table(decode_choice.TABLE)
    assert isinstance(table, dict)
    for gpu, entries in table.items():
        for e in entries:
            assert e["faster"] in decode_choice.CHOICES and {"dtype", "D", "B", "P", "T", "Lq"} <= set(e), (gpu, e)
