"""prefix_kernels.jit: the one build helper both JIT builds share (cache key, build-once state)."""

from __future__ import annotations

import logging

import torch

from prefix_kernels import jit


def test_cache_is_keyed_by_the_torch_installation(monkeypatch, tmp_path):
    """Two virtual environments with the same torch version build into two folders: one folder
    shared by both made each rebuild the other's library (ninja's commands name each
    environment's paths)."""
    monkeypatch.setenv("PREFIX_KERNELS_CACHE", str(tmp_path))
    here = jit.cache_dir("cpu-AVX2")
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
    there = jit.cache_dir("cpu-AVX2")
    assert here != there and here.parent == there.parent
    assert torch.__version__.split("+")[0] in here.name and torch.__version__.split("+")[0] in there.name


def test_once_build_builds_once_and_keeps_a_failure(caplog):
    calls = []

    def fails():
        calls.append(1)
        raise jit.BuildError("no compiler")

    once = jit.OnceBuild(fails, lambda: False, "thing unavailable")
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        assert once.ensure() == "no compiler"
        assert once.ensure() == "no compiler"
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == ["prefix_kernels: thing unavailable: no compiler"]
    once.reset()
    assert once.ensure() == "no compiler" and len(calls) == 2


def test_once_build_takes_a_library_loaded_by_someone_else():
    once = jit.OnceBuild(lambda: (_ for _ in ()).throw(AssertionError("must not build")), lambda: True, "x")
    assert once.ensure() is None and once.loaded
