"""The CUDA decode kernels (csrc/) against reference_attention: on a GPU, and under the host emulation.

Every case checks out and lse with the FlashAttention-style rule of helpers.check_quantity
(error at most twice plain PyTorch's error in the same dtype, plus a rounding floor), rows that
see no key (out exactly 0, lse -inf), no NaN, and the output layout (memory (B, Lq, Hq, D)).
The main grid: bf16/fp16/fp32 x Lq {1, 4} x T {1, 37, 300} x P {0, 5, 257} x G {1, 2}, GQA,
left padding with a fully padded request. Then every compiled head dim, non-causal, strided
inputs (element loads instead of 16-byte copies), large GQA groups and many requests per prefix,
uint8 masks and int32 indices, determinism; prefix_mask (left and right prompt padding, a prefix
entirely masked, rows that see nothing, fused and two launches, masked keys never read, mask
layouts); on a GPU also opcheck and torch.compile.

Each kernel test runs on two implementations (the `impl` fixture):
- "cuda": the torch binding on a GPU. Marked gpu: skipped on a machine without CUDA
  (tests/conftest.py); skipped with the reason when the backend is disabled by environment or nvcc
  is missing; a failed build fails the tests.
- "emulated": the unchanged sources compiled by g++ with -DSPD_EMULATE (tests/cuda_emu: one
  std::thread per CUDA thread, barriers for __syncthreads/__syncwarp, mma.sync and shuffles
  exchanged through per-warp buffers), called on CPU tensors through the same C launcher API as
  the binding. Outputs and workspace start as NaN, so an element left unwritten shows. This checks
  what the kernels compute (indexing, masks, causal limits, the online softmax, splits, merge),
  not timing, memory ordering, races or mma.sync's own rounding (it sums in fp32). About 75 s.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import DTYPE_NAMES, check_quantity, lengths_to_mask, make_inputs, run_same_dtype, run_truth
from prefix_kernels.backends.reference import reference_attention

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
TENSORS = ("q", "k", "v", "prefix_k", "prefix_v")


def _cuda_backend():
    """prefix_kernels.cuda.decode_forward, after the build (skips when it cannot build here)."""
    from prefix_kernels._core.problem import Problem
    from prefix_kernels.backends.cuda import build, decode_reasons

    probe = Problem(B=1, Hq=1, Hkv=1, Lq=1, Lk=1, D=64, G=1, P=1, dtype=FP16, device=torch.device("cuda"))
    reasons = decode_reasons(probe)
    if build.disabled():
        pytest.skip(f"CUDA backend disabled: {reasons}")
    if any("nvcc not found" in r for r in reasons):
        pytest.skip(f"cannot build the CUDA kernels here: {reasons}")
    assert reasons == [], f"the CUDA decode backend declines a plain case: {reasons}"
    from prefix_kernels.backends.cuda import decode_forward

    return decode_forward


def _emulated_backend():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import spd_emu

    if spd_emu.compiler() is None:
        pytest.skip("no g++ to build the emulation")
    return functools.partial(spd_emu.decode, spd_emu.build())


@pytest.fixture(scope="module", params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def impl(request):
    """(decode function (q, k, v, pk, pv, prefix_index, kv_mask, causal, scale, fuse_parts=,
    prefix_mask=) -> (out, lse), device)."""
    if request.param == "cuda":
        return _cuda_backend(), "cuda"
    return _emulated_backend(), "cpu"


@pytest.fixture(scope="module")
def cuda_backend():
    """The torch binding alone, for what only it has (the op registration)."""
    return _cuda_backend()


def mask_kw(inp) -> dict:
    """prefix_mask as a keyword, only when the inputs have one (as ops.py passes it)."""
    return {} if inp.get("prefix_mask") is None else {"prefix_mask": inp["prefix_mask"]}


def check_case(decode_forward, inp, *, causal=True, scale=None, desc=""):
    q = inp["q"]
    B, Hq, Lq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out, lse = decode_forward(*(inp[n] for n in TENSORS), inp["prefix_index"], inp["kv_mask"], causal, scale,
                              **mask_kw(inp))
    assert out.dtype == q.dtype and out.shape == (B, Hq, Lq, D) and out.device == q.device
    assert out.transpose(1, 2).is_contiguous(), f"[{desc}] out memory is not (B, Lq, Hq, D)"
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Lq) and lse.is_contiguous()
    assert not torch.isnan(out).any(), f"[{desc}] out has NaN"
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any(), f"[{desc}] lse has NaN/+inf"

    dout = torch.zeros(B, Hq, Lq, D, device=q.device)
    truth = run_truth(inp, causal=causal, scale=scale, dout=dout, dlse=None, with_lse=True, need_grads=False)
    same = run_same_dtype(inp, causal=causal, scale=scale, dout=dout, dlse=None, with_lse=True, need_grads=False)
    empty = torch.isneginf(truth["lse"])
    assert torch.equal(torch.isneginf(lse), empty), f"[{desc}] rows with no visible key differ from the truth"
    assert torch.all(out[empty] == 0), f"[{desc}] a row with no visible key is not 0"
    check_quantity("out", out, same["out"], truth["out"], q.dtype, desc)
    check_quantity("lse", lse, same["lse"], truth["lse"], torch.float32, desc, finite_mask=~empty)
    return out, lse


GRID = list(itertools.product((BF16, FP16, FP32), (1, 4), (1, 37, 300), (0, 5, 257), (1, 2)))


@pytest.mark.parametrize("dtype, Lq, T, P, G", GRID,
                         ids=[f"{DTYPE_NAMES[d]}-Lq{lq}-T{t}-P{p}-G{g}" for d, lq, t, p, g in GRID])
def test_grid(impl, dtype, Lq, T, P, G):
    decode, device = impl
    inp = make_inputs(4, 8, 2, Lq, T, P, 64, G, dtype, device=device, padding="left", requires_grad=False)
    check_case(decode, inp, desc=f"{DTYPE_NAMES[dtype]} Lq={Lq} T={T} P={P} G={G}")


@pytest.mark.parametrize("D", (64, 80, 96, 128, 256))
@pytest.mark.parametrize("dtype", (BF16, FP16, FP32), ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
def test_head_dims(impl, D, dtype, causal):
    decode, device = impl
    inp = make_inputs(3, 4, 2, 3, 75, 33, D, 3, dtype, device=device, padding="right", requires_grad=False)
    check_case(decode, inp, causal=causal, desc=f"D={D} {DTYPE_NAMES[dtype]} causal={causal}")


@pytest.mark.parametrize("dtype", (BF16, FP16, FP32), ids=lambda d: DTYPE_NAMES[d])
def test_strided_inputs(impl, dtype):
    """transformers' (B, L, H, D) transposes (16-byte copies) and a D-strided view (element loads)."""
    decode, device = impl
    inp = make_inputs(3, 8, 2, 4, 37, 5, 80, 2, dtype, device=device, padding="left", transposed=True,
                      requires_grad=False)
    check_case(decode, inp, desc="transposed")
    for name in TENSORS:  # every other element of a twice-as-wide tensor: stride 2 along D
        x = inp[name]
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=dtype, device=device)
        wide[..., ::2] = x
        inp[name] = wide[..., ::2]
    check_case(decode, inp, desc="D stride 2")


@pytest.mark.parametrize("dtype", (BF16, FP32), ids=lambda d: DTYPE_NAMES[d])
def test_large_groups_and_many_requests(impl, dtype):
    decode, device = impl
    # MQA, 16 query heads x Lq 16 = 256 rows per (request, kv head): several row blocks per request.
    inp = make_inputs(3, 16, 1, 16, 300, 70, 128, 2, dtype, device=device, padding="left", requires_grad=False)
    check_case(decode, inp, desc="MQA 256 rows")
    # 67 requests on 3 prefixes: each prefix stacks ~22 x 4 x 2 rows over several row blocks.
    inp = make_inputs(67, 8, 2, 2, 41, 257, 64, 3, dtype, device=device, padding="left", requires_grad=False)
    check_case(decode, inp, desc="67 requests")
    # Every request on the same prefix, prefix_index given.
    inp = make_inputs(9, 4, 4, 1, 19, 130, 96, 1, dtype, device=device, padding="left", requires_grad=False)
    check_case(decode, inp, desc="one prefix, explicit index")


def test_index_and_mask_dtypes(impl):
    decode, device = impl
    inp = make_inputs(5, 8, 2, 1, 37, 5, 128, 3, BF16, device=device, padding="left", requires_grad=False,
                      index_dtype=torch.int32)
    ref_out, ref_lse = check_case(decode, inp, desc="int32 index")
    inp["kv_mask"] = inp["kv_mask"].to(torch.uint8)
    out, lse = check_case(decode, inp, desc="uint8 mask")
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_prefix_only_and_no_keys(impl):
    decode, device = impl
    inp = make_inputs(3, 4, 2, 2, 0, 9, 64, 2, FP16, device=device, requires_grad=False)  # T = 0
    check_case(decode, inp, desc="T=0")
    inp = make_inputs(3, 4, 2, 2, 0, 0, 64, 1, FP16, device=device, requires_grad=False)  # nothing at all
    out, lse = check_case(decode, inp, desc="T=0, P=0")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_deterministic(impl):
    decode, device = impl
    inp = make_inputs(6, 8, 2, 4, 300, 257, 128, 2, BF16, device=device, padding="left", requires_grad=False)
    args = [inp[n] for n in TENSORS] + [inp["prefix_index"], inp["kv_mask"], True, 0.1]
    first = decode(*args)
    for _ in range(3):
        again = decode(*args)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("where", TENSORS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_and_inf_propagate_like_the_reference(impl, where, bad):
    """A NaN or Inf in an input gives NaN and Inf in out and lse exactly where the reference puts
    them, finite values elsewhere. fmaxf skips NaN, so a NaN score must still reach the row: the
    kernels once wrote such a split as empty (out 0, lse -inf) and the merge dropped it."""
    decode, device = impl
    inp = make_inputs(3, 4, 2, 5, 6, 4, 64, 1, FP32, device=device, padding="left", requires_grad=False)
    x = inp[where].clone()
    x[0, 0, 2, 3] = bad  # request 0 has no padding: its key 2 is visible to its queries 1-4
    inp[where] = x
    args = [inp[n] for n in TENSORS] + [inp["prefix_index"], inp["kv_mask"], True, 0.125]
    out, lse = decode(*args)
    ref, ref_lse = reference_attention(*args[:5], prefix_index=inp["prefix_index"], kv_mask=inp["kv_mask"],
                                       causal=True, scale=0.125)
    assert not torch.isfinite(ref).all()  # the case is not vacuous
    for kind in (torch.isnan, torch.isinf):
        assert torch.equal(kind(out), kind(ref)), (
            f"out: {kind.__name__} pattern differs: kernel {int(kind(out).sum())}, reference {int(kind(ref).sum())}")
    # lse: non-finite in the same rows. Where an Inf score makes the reference's logsumexp +inf,
    # the online softmax gives NaN (exp(inf - inf)), as the triton and torch backends do.
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite].to(out.dtype), rtol=1e-4, atol=1e-5)


# (dtype, B, Lq, T, P, G): both parts with blocks to spare on one side (the unpaired tail of the
# interleaved grid), padding, several prefixes, and one part empty (two launches then).
FUSED = [(BF16, 4, 1, 37, 257, 2), (FP16, 6, 4, 300, 5, 1), (FP32, 3, 2, 37, 40, 2), (BF16, 4, 1, 0, 33, 2),
         (BF16, 4, 2, 9, 0, 1)]


@pytest.mark.parametrize("dtype, B, Lq, T, P, G", FUSED,
                         ids=[f"{DTYPE_NAMES[d]}-B{b}-Lq{lq}-T{t}-P{p}-G{g}" for d, b, lq, t, p, g in FUSED])
def test_fused_parts(impl, dtype, B, Lq, T, P, G):
    """fuse_parts runs the prefix and request blocks in one interleaved grid (parts_kernel):
    right against the reference, and the same numbers as the two launches (same blocks, same
    partials, same merge; bit-identical where the blocks' arithmetic is, i.e. in the emulation)."""
    decode, device = impl
    inp = make_inputs(B, 8, 2, Lq, T, P, 64, G, dtype, device=device, padding="left", requires_grad=False)
    fused = functools.partial(decode, fuse_parts=True)
    out, lse = check_case(fused, inp, desc=f"fused {DTYPE_NAMES[dtype]} B={B} Lq={Lq} T={T} P={P} G={G}")
    out2, lse2 = decode(*(inp[n] for n in TENSORS), inp["prefix_index"], inp["kv_mask"], True, 0.125,
                        fuse_parts=False)
    if device == "cpu":  # a GPU compiles the two paths separately: contraction may differ there
        assert torch.equal(out, out2) and torch.equal(lse, lse2)


# ------------------------------------------------------------------------------------------------
# prefix_mask (G, P): prompts of different lengths padded into one prefix tensor
# ------------------------------------------------------------------------------------------------


def prefix_masked_inputs(dtype, device, *, Lq=4, T=37, P=257, G=3, D=64, prefix_padding="left", lengths=None):
    """Six requests with left-padded caches of (T, 10, 5, 2, 0, 0) keys (at most T) and a (G, P)
    prefix_mask of `lengths` visible keys per prompt, by default: prefix 0 two thirds visible (its
    masked keys fill whole tiles and part of one), prefix 1 entirely masked, prefix 2 three keys.
    prefix_index (0, 1, 2, 1, 0, 1) % G puts requests 1, 3 and 5 on the masked prefix (G = 3):
    request 5, with no own key either, sees nothing at all, and request 3's first rows (causal,
    two own keys) see nothing when Lq > 2."""
    B = 6
    inp = make_inputs(B, 8, 2, Lq, T, P, D, G, dtype, device=device, padding="left", requires_grad=False)
    inp["kv_mask"] = lengths_to_mask(torch.tensor([T, 10, 5, 2, 0, 0]).clamp(max=T), T, "left").to(device)
    if lengths is None:
        lengths = [P - P // 3, 0, min(3, P)][:G]
    inp["prefix_mask"] = lengths_to_mask(torch.tensor(lengths), P, prefix_padding).to(device)
    inp["prefix_index"] = torch.tensor([0, 1, 2, 1, 0, 1], device=device) % G
    return inp


def decode_call(decode, inp, *, fuse_parts=False, causal=True, scale=0.125, **kw):
    return decode(*(inp[n] for n in TENSORS), inp["prefix_index"], inp["kv_mask"], causal, scale,
                  fuse_parts=fuse_parts, **{**mask_kw(inp), **kw})


PM_GRID = list(itertools.product((BF16, FP16, FP32), ("left", "right")))


@pytest.mark.parametrize("dtype, prefix_padding", PM_GRID,
                         ids=[f"{DTYPE_NAMES[d]}-{pad}" for d, pad in PM_GRID])
def test_prefix_mask(impl, dtype, prefix_padding):
    """Left- and right-padded prompts, G = 3 with one prefix entirely masked, rows that see only
    their own keys and a request that sees nothing; the two launches and the fused parts_kernel
    both against the float64 reference (and bit-identical to each other in the emulation)."""
    decode, device = impl
    inp = prefix_masked_inputs(dtype, device, prefix_padding=prefix_padding)
    desc = f"prefix_mask {DTYPE_NAMES[dtype]} {prefix_padding}"
    out, lse = check_case(functools.partial(decode, fuse_parts=False), inp, desc=desc)
    # Not vacuous: request 5 sees nothing, request 3's rows 0-1 neither (rows 2-3 only own keys).
    empty = torch.zeros_like(lse, dtype=torch.bool)
    empty[5] = True
    empty[3, :, :2] = True
    assert torch.equal(torch.isneginf(lse), empty)
    fused, fused_lse = check_case(functools.partial(decode, fuse_parts=True), inp, desc=desc + " fused")
    if device == "cpu":  # a GPU compiles the two paths separately: contraction may differ there
        assert torch.equal(out, fused) and torch.equal(lse, fused_lse)


@pytest.mark.parametrize("dtype", (BF16, FP32), ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("fuse_parts", (False, True), ids=("two_launches", "fused"))
def test_prefix_mask_rows_that_see_nothing(impl, dtype, fuse_parts):
    """Rows whose only keys are masked prefix keys: out exactly 0 and lse -inf, never NaN."""
    decode, device = impl
    kernel = functools.partial(decode, fuse_parts=fuse_parts)
    # No own keys (T = 0): requests on prefix 1 see nothing, the others part of prefix 0 or 2.
    inp = prefix_masked_inputs(dtype, device, Lq=2, T=0, P=70)
    out, lse = check_case(kernel, inp, desc="T=0")
    assert torch.isneginf(lse[1::2]).all() and torch.isfinite(lse[0::2]).all()
    # Every prefix key masked, one prefix, every own key padded: nothing anywhere.
    inp = prefix_masked_inputs(dtype, device, Lq=1, T=9, P=33, G=1, lengths=[0])
    inp["kv_mask"] = torch.zeros_like(inp["kv_mask"])
    out, lse = check_case(kernel, inp, desc="everything masked")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    # One visible prefix key among many masked ones, right at a tile edge, and causal own keys.
    inp = prefix_masked_inputs(dtype, device, Lq=4, T=3, P=129, G=2, lengths=[0, 1], prefix_padding="left")
    check_case(kernel, inp, desc="one visible prefix key")


@pytest.mark.parametrize("where", ("prefix_k", "prefix_v", "k", "v"))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_masked_keys_are_never_read(impl, where, bad):
    """A masked key contributes nothing, whatever it holds: NaN or Inf in every slot that
    prefix_mask (prefix_k, prefix_v) or kv_mask (k, v) hides (padding memory need not be
    initialised) changes no bit of the result, in either launch path: the kernels zero-fill
    masked keys instead of loading them, so no 0 * NaN reaches the output. NaN or Inf in a
    visible key reaches the rows as in the reference."""
    decode, device = impl
    inp = prefix_masked_inputs(FP32, device, Lq=3, T=21, P=100)
    hidden = ~(inp["prefix_mask"] if where.startswith("prefix") else inp["kv_mask"])
    assert hidden.any()
    for fuse_parts in (False, True):
        clean = decode_call(decode, inp, fuse_parts=fuse_parts)
        x = inp[where].clone()
        x.masked_fill_(hidden[:, None, :, None], bad)  # every masked key, head and column
        dirty = decode_call(decode, dict(inp, **{where: x}), fuse_parts=fuse_parts)
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
        assert not torch.isnan(dirty[0]).any() and not torch.isnan(dirty[1]).any()
    # A visible key: the last of prefix 0 (left padding; requests 0 and 4) or of request 0's cache.
    x = inp[where].clone()
    x[0, 1, -1, 5] = bad
    inp[where] = x
    out, lse = decode_call(decode, inp)
    ref, ref_lse = reference_attention(*(inp[n] for n in TENSORS), prefix_index=inp["prefix_index"],
                                       kv_mask=inp["kv_mask"], causal=True, scale=0.125,
                                       prefix_mask=inp["prefix_mask"])
    assert not torch.isfinite(ref).all()  # the case is not vacuous
    for kind in (torch.isnan, torch.isinf):
        assert torch.equal(kind(out), kind(ref)), f"out: {kind.__name__} pattern differs from the reference"
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite].to(out.dtype), rtol=1e-4, atol=1e-5)


def test_prefix_mask_layouts(impl):
    """uint8, strided (every other column of a wider mask) and column-major masks give the bits
    of the bool mask; an all-True mask gives the bits of no mask."""
    decode, device = impl
    inp = prefix_masked_inputs(BF16, device, Lq=2, T=37, P=90, prefix_padding="right")
    out, lse = check_case(decode, inp, desc="bool mask")
    mask = inp["prefix_mask"]
    wide = torch.zeros(mask.shape[0], 2 * mask.shape[1], dtype=torch.bool, device=device)
    wide[:, ::2] = mask
    for other in (mask.to(torch.uint8), wide[:, ::2], mask.t().contiguous().t()):
        got = decode_call(decode, inp, scale=1 / 8, prefix_mask=other)
        assert torch.equal(got[0], out) and torch.equal(got[1], lse), f"strides {other.stride()}, {other.dtype}"
    plain = dict(inp, prefix_mask=None)
    want = decode_call(decode, plain)
    got = decode_call(decode, plain, prefix_mask=torch.ones_like(mask))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_prefix_mask_is_not_declined(monkeypatch):
    """The CUDA decode backend takes prefix_mask: no reason names it (a GPU simulated on a CPU)."""
    from prefix_kernels._core.problem import Problem
    import prefix_kernels.backends.cuda as cuda

    monkeypatch.setattr(cuda, "_device_unavailable", lambda device: "")
    monkeypatch.setattr(cuda.build, "disabled", lambda: False)
    p = Problem(B=4, Hq=8, Hkv=2, Lq=1, Lk=37, D=64, G=2, P=33, dtype=BF16, device=torch.device("cuda"),
                has_prefix_mask=True)
    assert cuda.decode_reasons(p) == []


@pytest.mark.gpu
def test_prefix_mask_through_the_public_op(cuda_backend):
    """shared_prefix_decode(backend="cuda", prefix_mask=...) reaches the kernels with the mask."""
    from prefix_kernels import shared_prefix_decode

    inp = prefix_masked_inputs(BF16, "cuda", Lq=2, T=37, P=257)
    with torch.inference_mode():
        out = shared_prefix_decode(*(inp[n] for n in TENSORS), prefix_index=inp["prefix_index"],
                                   kv_mask=inp["kv_mask"], prefix_mask=inp["prefix_mask"], backend="cuda")
    direct, _ = cuda_backend(*(inp[n] for n in TENSORS), inp["prefix_index"], inp["kv_mask"], True, None,
                             prefix_mask=inp["prefix_mask"])
    assert torch.equal(out, direct)
    ref, _ = reference_attention(*(inp[n] for n in TENSORS), prefix_index=inp["prefix_index"],
                                 kv_mask=inp["kv_mask"], prefix_mask=inp["prefix_mask"],
                                 compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("sms", (1, 8, 132))
def test_split_counts_emulated(sms):
    """The plan splits keys to fill `sms` multiprocessors: 1 gives the fewest splits, 132 the most.
    (On a GPU the binding passes the device's own count; the emulation can try several.)"""
    inp = make_inputs(2, 8, 2, 1, 700, 1500, 128, 1, BF16, padding="left", requires_grad=False)
    check_case(functools.partial(_emulated_backend(), sms=sms), inp, desc=f"{sms} SMs")


@pytest.mark.gpu
def test_opcheck_and_compile(cuda_backend):
    inp = make_inputs(3, 4, 2, 2, 37, 5, 64, 2, FP16, device="cuda", padding="left", requires_grad=False)
    args = (*(inp[n] for n in TENSORS), inp["prefix_index"], inp["kv_mask"], True, 0.125)
    torch.library.opcheck(torch.ops.prefix_kernels.decode_cuda.default, args)
    masked = prefix_masked_inputs(FP16, "cuda", Lq=2, T=37, P=40)
    torch.library.opcheck(torch.ops.prefix_kernels.decode_cuda.default,
                          (*(masked[n] for n in TENSORS), masked["prefix_index"], masked["kv_mask"], True, 0.125,
                           False, masked["prefix_mask"]))

    def step(*a):
        out, lse = cuda_backend(*a)
        return out * 2, lse

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(*args)
    want = step(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_small_index_dtypes_reach_the_binding_as_int32(monkeypatch):
    """The public op takes int8/int16/uint8 prefix_index; the binding takes int32/int64 only."""
    from types import SimpleNamespace

    import prefix_kernels.backends.cuda as cuda

    seen = []
    binding = SimpleNamespace(decode_cuda=lambda *args: seen.append(args[5].dtype))
    monkeypatch.setattr(cuda, "torch", SimpleNamespace(int32=torch.int32, int64=torch.int64,
                                                       ops=SimpleNamespace(prefix_kernels=binding)))
    inp = make_inputs(3, 4, 2, 1, 5, 3, 64, 2, FP16, requires_grad=False)
    for dtype in (torch.int8, torch.int16, torch.uint8, torch.int32, torch.int64):
        cuda.decode_forward(*(inp[n] for n in TENSORS), inp["prefix_index"].to(dtype), None)
    assert seen == [torch.int32] * 4 + [torch.int64]


@pytest.mark.parametrize("B", [8, 64, 256])
@pytest.mark.parametrize("P", [1024, 4096, 16384])
def test_plan_split_partials_within_a_tenth_of_the_step(B, P):
    """The CUDA plan (spd_make_plan, compiled for the emulation) at the decode benchmark's shapes
    (bf16, Hq 32, Hkv 8, D 128, T 256, an H100's 132 SMs): every split's fp32 partials, written
    and read back, weigh at most a tenth of the bytes the step reads, and long prefixes are still
    split to fill the GPU."""
    import ctypes

    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import spd_emu

    if spd_emu.compiler() is None:
        pytest.skip("no g++ to build the emulation")
    dll = spd_emu.build()
    Hq, Hkv, D, T = 32, 8, 128, 256
    plan = spd_emu.Plan()
    problem = spd_emu.Problem(spd_emu.DTYPES[torch.bfloat16], B, Hq, Hkv, 1, T, D, 1, P)
    assert dll.spd_make_plan(ctypes.byref(problem), spd_emu.H100_SMS, ctypes.byref(plan)) is None
    rows = B * Hq
    step = 2 * (Hkv * P + B * Hkv * T) * D * 2 + 2 * rows * D * 2
    assert 2 * rows * (D + 1) * 4 * (plan.prefix_splits + plan.request_splits) <= 0.1 * step
    if B == 8 and P >= 4096:
        assert plan.prefix_splits > 1


def _emu():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
    import spd_emu

    if spd_emu.compiler() is None:
        pytest.skip("no g++ to build the emulation")
    return spd_emu, spd_emu.build()


# (B, G, index pattern, dtype, stride): chunks of 256 requests and of 256 prefixes crossed, unused
# prefixes (between and after the used ones), every request on one prefix, int32 and int64, a
# strided index.
GROUPING = [
    (7, 3, "mod", torch.int64, 1),
    (300, 5, "mod", torch.int32, 1),
    (600, 300, "random", torch.int64, 2),
    (70, 400, "random", torch.int32, 3),
    (9, 4, "all_last", torch.int64, 1),
]


@pytest.mark.parametrize("B,G,pattern,index_dtype,stride", GROUPING)
def test_group_kernel_builds_the_tables_emulated(B, G, pattern, index_dtype, stride):
    """spd_launch groups the requests by prefix on the device (group_kernel, one block) instead
    of the binding's torch ops: its order, starts and block_starts equal _core.grouping's (a
    stable sort: batch order within a prefix), and the outputs are bit-identical to passing those
    tables in."""
    from prefix_kernels._core.grouping import row_block_starts, sorted_by_prefix

    spd_emu, dll = _emu()
    gen = torch.Generator().manual_seed(B * 1000 + G)
    if pattern == "mod":
        index = torch.arange(B) * 7 % G
    elif pattern == "random":
        index = torch.randint(0, G, (B,), generator=gen)
    else:
        index = torch.full((B,), G - 1)
    backing = torch.full((B * stride,), -1, dtype=index_dtype)  # the gaps hold an invalid index
    backing[::stride] = index.to(index_dtype)
    prefix_index = backing[::stride]
    inp = make_inputs(B, 2, 1, 1, 3, 16, 64, G, FP16, padding=None, requires_grad=False)
    args = [inp[n] for n in TENSORS]

    workspace = []
    out, lse = spd_emu.decode(dll, *args, prefix_index, None, True, 0.125, group_ws=workspace)
    ref_out, ref_lse = spd_emu.decode(dll, *args, prefix_index.contiguous().long(), None, True, 0.125, tables=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)

    plan = spd_emu.Plan()
    problem = spd_emu.Problem(spd_emu.DTYPES[FP16], B, 2, 1, 1, 3, 64, G, 16)
    dll.spd_make_plan(spd_emu.ctypes.byref(problem), spd_emu.H100_SMS, spd_emu.ctypes.byref(plan))
    order, starts = sorted_by_prefix(index, B, G, "cpu")
    block_starts = row_block_starts(starts, plan.group_rows, plan.rows_per_block, G)
    ws = workspace[0]
    assert torch.equal(ws[:B], order)
    assert torch.equal(ws[B:B + G + 1], starts)
    assert torch.equal(ws[B + G + 1:B + 2 * G + 2], block_starts)


def test_no_index_needs_no_tables_emulated():
    """Without prefix_index (every request on prefix 0, whatever G) spd_launch builds no table and
    launches no grouping kernel: the prefix grid is exactly the stacked rows' blocks. Same result,
    bit for bit, as the tables path, with G > 1 (prefixes 1.. unused) and rows crossing blocks."""
    spd_emu, dll = _emu()
    inp = make_inputs(70, 4, 2, 2, 5, 33, 64, 3, BF16, padding="left", requires_grad=False)
    args = [inp[n] for n in TENSORS]
    workspace = []
    out, lse = spd_emu.decode(dll, *args, None, inp["kv_mask"], True, 0.125, group_ws=workspace)
    ref_out, ref_lse = spd_emu.decode(dll, *args, None, inp["kv_mask"], True, 0.125, tables=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.all(workspace[0] == -7)  # untouched
    check_case(functools.partial(spd_emu.decode, dll), {**inp, "prefix_index": None}, desc="no index, G 3")
