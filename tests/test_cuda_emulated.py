"""The CUDA decode kernels (csrc/), run on the CPU by the host emulation, against the reference.

No GPU was lent while the kernels were written, so until a GPU runs tests/test_cuda_decode.py
they had only been compiled. Here the unchanged sources are compiled by g++ with -DSPD_EMULATE
(tests/cuda_emu: one std::thread per CUDA thread, barriers for __syncthreads/__syncwarp, mma.sync
and shuffles exchanged through per-warp buffers) and called through the same C launcher API as
the torch binding. Each case is checked by test_cuda_decode.check_case: out and lse within twice
plain PyTorch's error in the same dtype (plus a rounding floor), empty rows exactly 0 / -inf, no
NaN (outputs and workspace start as NaN, so an unwritten element shows), out's memory layout.

The emulation checks what the kernels compute: indexing, masks, causal limits, the online softmax,
splits and the merge, every head dim and dtype. It does not check timing, memory ordering, races
or the hardware's own rounding inside mma.sync (it sums products in fp32).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from helpers import DTYPE_NAMES, make_inputs
from test_cuda_decode import GRID, TENSORS, check_case

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import spd_emu  # noqa: E402

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(scope="module")
def emulated():
    if spd_emu.compiler() is None:
        pytest.skip("no g++ to build the emulation")
    return functools.partial(spd_emu.decode, spd_emu.build())


@pytest.mark.parametrize("dtype, Lq, T, P, G", GRID,
                         ids=[f"{DTYPE_NAMES[d]}-Lq{lq}-T{t}-P{p}-G{g}" for d, lq, t, p, g in GRID])
def test_grid(emulated, dtype, Lq, T, P, G):
    inp = make_inputs(4, 8, 2, Lq, T, P, 64, G, dtype, padding="left", requires_grad=False)
    check_case(emulated, inp, desc=f"{DTYPE_NAMES[dtype]} Lq={Lq} T={T} P={P} G={G}")


@pytest.mark.parametrize("D", (64, 80, 96, 128, 256))
@pytest.mark.parametrize("dtype", (BF16, FP16, FP32), ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
def test_head_dims(emulated, D, dtype, causal):
    inp = make_inputs(3, 4, 2, 3, 75, 33, D, 3, dtype, padding="right", requires_grad=False)
    check_case(emulated, inp, causal=causal, desc=f"D={D} {DTYPE_NAMES[dtype]} causal={causal}")


@pytest.mark.parametrize("dtype", (BF16, FP16, FP32), ids=lambda d: DTYPE_NAMES[d])
def test_strided_inputs(emulated, dtype):
    """transformers' (B, L, H, D) transposes (16-byte copies) and a D-strided view (element loads)."""
    inp = make_inputs(3, 8, 2, 4, 37, 5, 80, 2, dtype, padding="left", transposed=True, requires_grad=False)
    check_case(emulated, inp, desc="transposed")
    for name in TENSORS:  # every other element of a twice-as-wide tensor: stride 2 along D
        x = inp[name]
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=dtype)
        wide[..., ::2] = x
        inp[name] = wide[..., ::2]
    check_case(emulated, inp, desc="D stride 2")


@pytest.mark.parametrize("dtype", (BF16, FP32), ids=lambda d: DTYPE_NAMES[d])
def test_large_groups_and_many_requests(emulated, dtype):
    # MQA, 16 query heads x Lq 16 = 256 rows per (request, kv head): several row blocks per request.
    inp = make_inputs(3, 16, 1, 16, 300, 70, 128, 2, dtype, padding="left", requires_grad=False)
    check_case(emulated, inp, desc="MQA 256 rows")
    # 67 requests on 3 prefixes: each prefix stacks ~22 x 4 x 2 rows over several row blocks.
    inp = make_inputs(67, 8, 2, 2, 41, 257, 64, 3, dtype, padding="left", requires_grad=False)
    check_case(emulated, inp, desc="67 requests")


@pytest.mark.parametrize("sms", (1, 8, 132))
def test_split_counts(emulated, sms):
    """The plan splits keys to fill `sms` multiprocessors: 1 gives the fewest splits, 132 the most."""
    inp = make_inputs(2, 8, 2, 1, 700, 1500, 128, 1, BF16, padding="left", requires_grad=False)
    check_case(functools.partial(emulated, sms=sms), inp, desc=f"{sms} SMs")


def test_int32_index_and_uint8_mask(emulated):
    inp = make_inputs(5, 8, 2, 1, 37, 5, 128, 3, BF16, padding="left", requires_grad=False, index_dtype=torch.int32)
    inp["kv_mask"] = inp["kv_mask"].to(torch.uint8)
    check_case(emulated, inp, desc="int32 index, uint8 mask")
