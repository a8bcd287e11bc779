"""Kernel workloads under pytest-benchmark: `pytest benchmarks --benchmark-only`.

On a GPU: the training shapes of the op issue (B=16, Hq=32, Hkv=8, D=128, L=1024, P in {16, 128,
1024}, bf16; forward and forward+backward) and the decode shapes of the decoding issue (T=256,
B in {8, 64, 256}, P in {1024, 4096, 16384}), each for every provider of bench_attention.py and
bench_decode.py; a provider that cannot run is skipped with its reason. On a CPU: tiny shapes, so
that the harness itself is exercised (tests/test_bench_pytest.py runs it in CI). The result
rows with versions and commit are what bench_*.py write; this harness is for pytest-benchmark's
own comparisons (--benchmark-compare, --benchmark-save).
"""

import pytest
import torch

import bench_attention
import bench_decode

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
TRAIN = [(16, 32, 8, 1024, P, 128) for P in (16, 128, 1024)] if CUDA else [(2, 4, 2, 32, 8, 32)]
DECODE = ([(B, 32, 8, 256, P, 128) for B in (8, 64, 256) for P in (1024, 4096, 16384)] if CUDA
          else [(2, 4, 2, 16, 8, 32)])


def _synchronised(fn):
    if not CUDA:
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _ids(shapes, names):
    return ["-".join(f"{n}{v}" for n, v in zip(names, s)) for s in shapes]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", TRAIN, ids=_ids(TRAIN, "B Hq Hkv L P D".split()))
@pytest.mark.parametrize("provider", list(bench_attention.PROVIDERS))
def test_attention(benchmark, provider, shape, mode):
    c = bench_attention.case("base", *shape)
    t = bench_attention.make_case(c, DTYPE, DEVICE)
    try:  # bind: masks and what else the provider builds once per forward, outside the timed call
        step = bench_attention.make_step(bench_attention.bind(provider, t), t, mode)
        step()
    except Exception as exc:  # reported as a skip with its reason, not dropped silently
        pytest.skip(f"{provider} cannot run here: {type(exc).__name__}: {str(exc)[:200]}")
    benchmark(_synchronised(step))


@pytest.mark.parametrize("shape", DECODE, ids=_ids(DECODE, "B Hq Hkv T P D".split()))
@pytest.mark.parametrize("provider", list(bench_decode.PROVIDERS))
def test_decode(benchmark, provider, shape):
    B, Hq, Hkv, T, P, D = shape
    q, k, v, pk, pv = bench_decode.make_inputs(B, Hq, Hkv, T, P, D, DTYPE, DEVICE)
    try:
        with torch.no_grad():
            step = bench_decode.PROVIDERS[provider](q, k, v, pk, pv)
            step()
    except Exception as exc:
        pytest.skip(f"{provider} cannot run here: {type(exc).__name__}: {str(exc)[:200]}")

    def run():
        with torch.no_grad():
            step()

    benchmark(_synchronised(run))
