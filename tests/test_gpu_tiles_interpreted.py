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
from test_decode import assert_decode_close

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
# Python). B = 8 with G = 1 or 2 makes the prefix-gradient kernel split the batch 4 or 2 ways,
# as it would on a GPU at these sizes.
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

    assert tiles.prefix_splits(B, G, 2 * 2 * G, torch.device(gpu_launches)) == 4 // G
    inp = make_inputs(B, 4, 2, L, L, P, D, G, dtype, gpu_launches, padding="left", transposed=True)
    assert_close_to_reference(inp, backend="triton", causal=True)


# (dtype, D, Lq, T, P, G): decode tiles follow the forward's; T = 300 gives the own part 2 or 3
# splits of whole tiles, and Lq sets the own kernel's row block (group * Lq = 2, 8 or 32 rows).
DECODE = [
    (torch.float16, 128, 1, 300, 257, 2),
    (torch.float16, 256, 16, 300, 257, 1),
    (torch.float32, 64, 4, 300, 5, 2),
    (torch.float32, 128, 1, 37, 0, 1),
]


@pytest.mark.parametrize("fuse_parts", [False, True], ids=["3launches", "fused"])
@pytest.mark.parametrize("dtype,D,Lq,T,P,G", DECODE, ids=lambda v: str(v).replace("torch.", ""))
def test_decode_launches(gpu_launches, monkeypatch, dtype, D, Lq, T, P, G, fuse_parts):
    from prefix_kernels._core import config

    monkeypatch.setitem(config.FUSE_PARTS, "triton", fuse_parts)
    inp = make_inputs(6, 4, 2, Lq, T, P, D, G, dtype, gpu_launches, padding="left", requires_grad=False)
    assert_decode_close(inp, backend="triton", causal=True)
