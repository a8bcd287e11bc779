"""The launches a GPU would make, run under the interpreter against the float64 reference.

The CPU lane runs the Triton kernels with 16x16 tiles and two splits, which make small shapes
cross many blocks. On a GPU the launchers pick other tiles: 16 to 128 rows and 16 to 64 keys,
by dtype and head dim, 4 or 8 warps. They also split the prefix gradient's batch and the decode
keys by the SM count and traffic caps. None of those choices had run. Here the launchers'
`tiles.on_gpu` and `tiles.sm_count` are patched to an H100 (132 SMs), so the interpreter runs the same
tiles, splits and grids on CPU tensors. (Warps and stages do not exist in the interpreter; the
offline compile checks those, tests/test_triton_gpu_compile.py.)
"""

from __future__ import annotations

import pytest
import torch

from conftest import triton_interpreting
from helpers import assert_close_to_reference, make_inputs
from test_decode import assert_decode_close, merged_in_own, spy_decode_launches

H100_SMS = 132


@pytest.fixture
def gpu_launches(monkeypatch, triton_device):
    if not triton_interpreting():
        pytest.skip("on a GPU these launches run for real in the other tests")
    from prefix_kernels.backends.triton import tiles

    monkeypatch.setattr(tiles, "on_gpu", lambda device: True)
    monkeypatch.setattr(tiles, "sm_count", lambda device: H100_SMS)
    return triton_device


# (dtype, D, L, P, G): every tile branch of tiles.blocks, with L and P crossing several
# row blocks and key tiles of that branch (kept small: the interpreter runs each program in
# Python). B = 8 with G = 1 or 2 makes the prefix-gradient kernel split each prefix's work 6 or 3
# ways, as it would on a GPU at these sizes.
TRAINING = [
    (torch.float16, 64, 150, 150, 2),  # forward 128 x 64, backward 32 x 64
    (torch.float16, 80, 100, 150, 1),  # head dim padded to a 128-wide block; forward 64 x 64
    (torch.float16, 256, 100, 100, 2),  # forward 64 x 32, backward 16 x 32
    (torch.float32, 64, 80, 70, 1),  # fp32 32 x 32 (backward 32 x 16)
    (torch.float32, 128, 70, 50, 2),  # fp32 32 x 16
]
B = 8


@pytest.mark.parametrize("dtype,D,L,P,G", TRAINING, ids=lambda v: str(v).replace("torch.", ""))
def test_training_launches(gpu_launches, dtype, D, L, P, G):
    from prefix_kernels.backends.triton import tiles

    splits = tiles.prefix_splits(B, G, 2 * 2 * G, torch.device(gpu_launches), group=2)
    assert 1 < splits and splits * G < B  # the split-and-sum path; partials below a per-request copy's size
    inp = make_inputs(B, 4, 2, L, L, P, D, G, dtype, gpu_launches, padding="left", transposed=True)
    assert_close_to_reference(inp, backend="triton", causal=True)


# (dtype, D, Lq, T, P, G): decode tiles follow the forward's; T = 300 gives the own part 2 or 3
# splits of whole tiles (one at Lq = 16, where the partials' traffic cap allows one), and Lq sets
# the own kernel's row block (group * Lq = 2, 8 or 32 rows). T <= 128 is one own split (a split
# holds at least 128 keys on a GPU). With FUSE_MERGE the one-split cases at D <= 128 merge in
# the own kernel: with no prefix partial (P = 0), one, or two (P = 257 at Lq = 1); at D = 256
# the 32-row blocks (Lq = 16) are past tiles.merge_fits, 16-row ones (Lq = 4) are not.
DECODE = [
    (torch.float16, 128, 1, 300, 257, 2),
    (torch.float16, 256, 16, 300, 257, 1),
    (torch.float32, 64, 4, 300, 5, 2),
    (torch.float32, 128, 1, 37, 0, 1),
    (torch.float16, 128, 1, 100, 257, 2),
    (torch.float16, 256, 4, 64, 140, 1),
    (torch.float32, 64, 16, 120, 300, 2),
]
# The launch forms: (FUSE_PARTS, FUSE_MERGE).
PATHS = {"3launches": (False, False), "fused_parts": (True, False), "fused_merge": (False, True)}


def decode_on_path(monkeypatch, path, inp, T):
    """assert_decode_close with the launch form `path` (PATHS), checking that the own kernel
    merged exactly where that form and one own split call for it."""
    from prefix_kernels._core import config
    from prefix_kernels.backends.triton import tiles

    fuse_parts, fuse_merge = PATHS[path]
    monkeypatch.setitem(config.FUSE_PARTS, "triton", fuse_parts)
    monkeypatch.setitem(config.FUSE_MERGE, "triton", fuse_merge)
    calls = spy_decode_launches(monkeypatch)
    assert_decode_close(inp, backend="triton", causal=True)
    own = calls["decode_own_kernel"]
    if 0 < T <= tiles.MIN_KEYS_PER_SPLIT and not fuse_parts:
        assert [grid[1] for grid, _ in own] == [1]  # a split holds at least MIN_KEYS_PER_SPLIT keys
    # One split (more keys may be one split too: the traffic cap at Lq = 16) of a row block whose
    # merge fits in registers.
    mergeable = [tiles.merge_fits(kw["BLOCK_M"], kw["BLOCK_D"], kw["num_warps"], inp["q"].device)
                 for grid, kw in own if grid[1] == 1]
    merged = fuse_merge and mergeable == [True]
    assert merged_in_own(calls) == merged
    assert len(calls["decode_merge_kernel"]) == (0 if merged else 1)
    return merged


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype,D,Lq,T,P,G", DECODE, ids=lambda v: str(v).replace("torch.", ""))
def test_decode_launches(gpu_launches, monkeypatch, dtype, D, Lq, T, P, G, path):
    inp = make_inputs(6, 4, 2, Lq, T, P, D, G, dtype, gpu_launches, padding="left", requires_grad=False)
    merged = decode_on_path(monkeypatch, path, inp, T)
    if path == "fused_merge" and T <= 128 and D <= 128:  # one split of a block that fits
        assert merged


def test_decode_merge_too_large_for_registers_keeps_its_launch(gpu_launches, monkeypatch):
    """Group 8 at Lq = 16, D = 128: one own split, but a 128 x 128 row block, whose merge would
    hold 64 fp32 accumulator values per thread (sm_80 spilled): the merge keeps its launch
    (tiles.merge_fits), with FUSE_MERGE on."""
    from prefix_kernels._core import config

    monkeypatch.setitem(config.FUSE_MERGE, "triton", True)
    inp = make_inputs(2, 8, 1, 16, 64, 100, 128, 1, torch.float16, gpu_launches, padding="left",
                      requires_grad=False)
    calls = spy_decode_launches(monkeypatch)
    assert_decode_close(inp, backend="triton", causal=True)
    assert [grid[1] for grid, _ in calls["decode_own_kernel"]] == [1]
    assert not merged_in_own(calls) and len(calls["decode_merge_kernel"]) == 1


def _prefix_mask(G, P, device):
    """(G, P) prefix_mask for G = 3: prefix 0 left-padded over more than half its keys (whole key
    tiles masked, as a short prompt's padding is, and one tile masked in part), prefix 1 entirely
    masked (the last request uses it with no own key: its rows see nothing), prefix 2 a scatter."""
    assert G == 3
    mask = torch.zeros(G, P, dtype=torch.bool)
    mask[0, P // 2 + 3:] = True
    mask[2] = torch.rand(P, generator=torch.Generator().manual_seed(1)) < 0.6
    return mask.to(device)


# (dtype, D, L, P): the forward / backward tile branches 128 x 64 / 32 x 64 (fp16) and
# 32 x 16 / 32 x 16 (fp32), G = 3 prefixes with the masks above.
TRAINING_MASKED = [
    (torch.float16, 64, 150, 150),
    (torch.float32, 128, 70, 50),
]


@pytest.mark.parametrize("dtype,D,L,P", TRAINING_MASKED, ids=lambda v: str(v).replace("torch.", ""))
def test_training_launches_prefix_mask(gpu_launches, dtype, D, L, P):
    inp = make_inputs(B, 4, 2, L, L, P, D, 3, dtype, gpu_launches, padding="left", transposed=True)
    inp["prefix_mask"] = _prefix_mask(3, P, gpu_launches)
    res = assert_close_to_reference(inp, backend="triton", causal=True)
    assert torch.isneginf(res["truth"]["lse"]).any()  # rows that see no key are covered (checked: 0, -inf)
    # The gradient of a masked prefix key is exactly 0 (prefix 1: every key).
    for name in ("dprefix_k", "dprefix_v"):
        assert torch.all(res[name].detach().transpose(1, 2)[~inp["prefix_mask"]] == 0), name


# (dtype, D, Lq, T, P): prefix tiles of 64 keys (fp16) and 32 (fp32) under the masks above; T = 90
# is one own split (the fused merge with FUSE_MERGE).
DECODE_MASKED = [
    (torch.float16, 128, 1, 300, 257),
    (torch.float32, 64, 4, 300, 5),
    (torch.float16, 128, 3, 90, 257),
]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype,D,Lq,T,P", DECODE_MASKED, ids=lambda v: str(v).replace("torch.", ""))
def test_decode_launches_prefix_mask(gpu_launches, monkeypatch, dtype, D, Lq, T, P, path):
    inp = make_inputs(6, 4, 2, Lq, T, P, D, 3, dtype, gpu_launches, padding="left", requires_grad=False)
    inp["prefix_mask"] = _prefix_mask(3, P, gpu_launches)
    decode_on_path(monkeypatch, path, inp, T)
