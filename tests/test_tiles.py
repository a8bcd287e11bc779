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


def test_head_pack():
    assert tiles.head_pack(1, 128) == 1
    assert tiles.head_pack(4, 128) == 4
    assert tiles.head_pack(8, 128) == 8
    assert tiles.head_pack(16, 128) == 8  # at most 8
    assert tiles.head_pack(6, 128) == 2  # a power of two dividing the group
    assert tiles.head_pack(8, 32) == 2  # at least 16 positions per head
    assert tiles.head_pack(4, 16) == 1  # the interpreter's 16-row tiles: no packing


@pytest.mark.parametrize("Hq,Hkv", [(8, 1), (8, 2), (6, 2), (4, 4)], ids=["pack8", "pack4", "pack1-of-3", "mha"])
@pytest.mark.parametrize("Lq,dLk", [(37, 0), (5, 9)])
@pytest.mark.parametrize("kind", ["forward", "dq"])
def test_programs_pack_the_heads_of_a_kv_group(monkeypatch, triton_device, Hq, Hkv, Lq, dLk, kind):
    """Forward and dq programs of 128 rows stacking up to 8 query heads of one kv head (16
    positions each), against the float64 reference: several position blocks, a partial last one,
    Lq shorter than a block, causal, two prefixes, left padding."""
    from helpers import assert_close_to_reference, make_inputs

    default = tiles.kernel_blocks
    monkeypatch.setattr(tiles, "kernel_blocks",
                        lambda k, *a: tiles.Blocks(128, 32, 8, 3) if k == kind else default(k, *a))
    torch.manual_seed(Hq * 100 + Lq)
    inp = make_inputs(3, Hq, Hkv, Lq, Lq + dLk, 21, 32, 2, torch.float16, triton_device, padding="left",
                      transposed=True)
    assert_close_to_reference(inp, backend="triton", causal=True, return_lse=kind == "forward",
                              desc=f"{kind} pack Hq={Hq} Hkv={Hkv}")


def test_decode_prefix_tiles(h100):
    """The decode prefix program takes the forward's tiles, but at most 64 rows at 16-bit
    D <= 128 with a prefix_index or Lq > 1, where 128 rows spilled (per-row indices) and 64 do
    not; Lq = 1 without an index keeps 128."""
    cuda = torch.device("cuda")
    fwd = tiles.blocks(128, torch.bfloat16, cuda, "forward")
    assert tiles.decode_blocks(128, 4, torch.bfloat16, cuda).prefix_m == fwd.m == 128
    assert tiles.decode_blocks(128, 4, torch.bfloat16, cuda, has_pidx=True).prefix_m == 64
    assert tiles.decode_blocks(128, 16, torch.bfloat16, cuda, Lq=4).prefix_m == 64
    assert tiles.decode_blocks(80, 4, torch.float16, cuda, has_pidx=True).prefix_m == 64
    assert tiles.decode_blocks(64, 4, torch.bfloat16, cuda, has_pidx=True).prefix_m == 64
    assert tiles.decode_blocks(256, 4, torch.bfloat16, cuda, has_pidx=True).prefix_m == tiles.blocks(
        256, torch.bfloat16, cuda, "forward").m
    assert tiles.decode_blocks(128, 4, torch.float32, cuda, has_pidx=True).prefix_m == tiles.blocks(
        128, torch.float32, cuda, "forward").m
