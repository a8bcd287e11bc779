"""Split counts of the Triton launchers, as they would be chosen on an H100 (132 SMs): pure
arithmetic, no kernel runs."""

from __future__ import annotations

import pytest
import torch
import triton

from prefix_kernels.backends.triton import tiles

H100_SMS = 132


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(tiles, "on_gpu", lambda device: True)
    monkeypatch.setattr(tiles, "sm_count", lambda device: H100_SMS)
    return torch.device("cuda")


@pytest.mark.parametrize("P", [16, 128, 1024])
def test_prefix_gradient_grid_fills_the_gpu(h100, P):
    """B = 16, Hq = 32, Hkv = 8, BLOCK_N = 64: the prefix-gradient grid. Its predicted time
    (waves x the longest run of (request, head) units) is no worse than any other split count,
    and at P = 16 it uses more of the GPU than the 64 programs of a cap at B / (2G)."""
    B, G, group, Hkv = 16, 1, 4, 8
    kv_programs = triton.cdiv(P, 64) * Hkv * G
    s = tiles.prefix_splits(B, G, kv_programs, h100, group)
    units = B * group

    def cost(n):
        return triton.cdiv(kv_programs * n, 2 * H100_SMS) * triton.cdiv(units, n)

    assert s * G < B
    assert cost(s) == min(cost(n) for n in range(1, B))
    if P == 16:
        assert kv_programs * s > 64


def test_prefix_splits_on_the_interpreter_stay_small():
    assert tiles.prefix_splits(8, 1, 4, torch.device("cpu"), 4) == 2
    assert tiles.prefix_splits(1, 1, 4, torch.device("cpu"), 4) == 1
