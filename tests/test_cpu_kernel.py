"""The one-pass CPU kernel (csrc/prefix_attention_cpu.cpp): it is built and taken by the public
"torch" backend for float32 CPU tensors, it matches the float64 reference with BLAS and with its plain
loop, and switching it off returns the split path (ATen's fused kernel twice + a merge)."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import assert_close_to_reference, make_inputs
from prefix_kernels.backends import cpu_kernel
from prefix_kernels.backends.torch_split import aten_cpu

FP32 = torch.float32


def _toolchain_missing():
    from torch.utils import cpp_extension

    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler on PATH"
    if not cpp_extension.is_ninja_available():
        return "ninja not found"
    return None


@pytest.fixture
def kernel():
    why = _toolchain_missing()
    if why:
        pytest.skip(f"the CPU kernel cannot be built here: {why}")
    assert cpu_kernel.unavailable() is None, cpu_kernel.unavailable()
    return torch.ops.prefix_kernels_cpu


def _count(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_float32_cpu_calls_take_the_kernel(kernel, monkeypatch):
    fwd, bwd = _count(monkeypatch, cpu_kernel, "forward"), _count(monkeypatch, cpu_kernel, "backward")
    split = _count(monkeypatch, aten_cpu, "forward")
    inp = make_inputs(3, 4, 2, 5, 7, 6, 16, 1, FP32, padding="left")
    assert_close_to_reference(inp, backend="torch", return_lse=False)
    assert (len(fwd), len(bwd), len(split)) == (1, 1, 0)


# (B, Hq, Hkv, Lq, Lk, P, D, G, padding, causal): GQA and MHA, no prefix, no own keys, several
# prefixes, a cache (Lk > Lq), rows that see no own key (left padding with P = 0), one query row.
CASES = [
    (3, 4, 2, 5, 7, 6, 16, 2, "left", True),
    (2, 4, 4, 9, 9, 0, 32, 1, "right", True),
    (2, 6, 2, 4, 0, 5, 16, 1, None, True),
    (4, 2, 1, 1, 13, 3, 64, 3, "left", False),
    (2, 4, 1, 70, 70, 17, 16, 1, "left", True),
    (3, 2, 2, 3, 6, 0, 16, 1, "left", True),
]


@pytest.mark.parametrize("blas", [True, False], ids=["blas", "loop"])
@pytest.mark.parametrize("lse", [True, False], ids=["lse", "no_lse"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_reference(kernel, case, lse, blas):
    B, Hq, Hkv, Lq, Lk, P, D, G, padding, causal = case
    if not blas and not kernel.has_blas():
        pytest.skip("no BLAS in this process: the loop is what every case above runs")
    torch.manual_seed(hash(case) % 1000)
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, P, D, G, FP32, padding=padding)
    previous = kernel.set_use_blas(blas)
    try:
        assert_close_to_reference(inp, causal=causal, return_lse=lse, backend="torch")
    finally:
        kernel.set_use_blas(previous)


def test_disabled_kernel_takes_the_split_path(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV_DISABLE, "1")
    one_pass, split = _count(monkeypatch, cpu_kernel, "forward"), _count(monkeypatch, aten_cpu, "forward")
    assert "disabled" in cpu_kernel.unavailable()
    inp = make_inputs(3, 4, 2, 5, 7, 6, 16, 2, FP32, padding="left")
    assert_close_to_reference(inp, backend="torch", return_lse=False)
    assert (len(one_pass), len(split)) == (0, 1)


def test_source_is_cxx17():
    """torch 2.11's extension builder (the GPU machine's) compiles with -std=c++17, torch 2.13's
    with c++20: a C++20-only header or function in the CPU kernel builds here and fails there
    (std::bit_cast did), leaving that machine on the split path. torch 2.13's own headers need
    C++20, so the source cannot be compiled as C++17 here; it is read instead."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "csrc" / "prefix_attention_cpu.cpp").read_text()
    source = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)  # comments may name them
    cxx20_headers = ("bit", "span", "concepts", "ranges", "numbers", "format", "source_location", "compare")
    found = [h for h in cxx20_headers if re.search(rf"#include\s*<{h}>", source)]
    found += [f for f in ("std::bit_cast", "std::span", "std::ranges", "std::popcount", "std::countl_zero")
              if f in source]
    assert not found, f"C++20-only in csrc/prefix_attention_cpu.cpp: {found}"
