"""shared_prefix_decode (Lq = 1..16, forward only) against reference_attention in float64.

Tolerance as in helpers.check_quantity (FlashAttention-style): max|op - truth| <= 2 max|same -
truth| + floor, where truth is the reference in float64 and same is the reference computed in
the input dtype; lse likewise on the rows that see a key, and exactly -inf (with output exactly
0) on the rows that see none.

Matrix from the issue: Lq in {1, 4} x T in {1, 37, 300} x P in {0, 5, 257} in full, with heads
(GQA Hq=8/Hkv=2, MQA Hq=4/Hkv=1), G in {1, 2} (mixed prefix_index), left padding or none (a
fully padded request in every padded case), causal on/off, dtype fp32/fp16 (not bf16: tl.dot of
two bf16 blocks is wrong under the triton 3.9 interpreter), D in {16, 32, 80} and B in {3, 5}
assigned so that every pair of values of any two axes occurs (test_op.covering_set). The triton
lane runs the kernels under the interpreter on a CPU, with two key splits per part so that the
split-and-merge path (and splits that see only padding) is exercised.
"""

from __future__ import annotations


import pytest
import torch
from torch.library import opcheck

from conftest import triton_interpreting
from helpers import (
    DTYPE_NAMES,
    TENSOR_ARGS,
    check_quantity,
    describe,
    gpu_examples,
    make_inputs,
    run_same_dtype,
    run_truth,
)
from test_no_copy import AllocationRecorder, per_request_prefix_copies, prefix_row_buffers
from test_op import covering_set, uncovered_pairs

import prefix_kernels
from prefix_kernels import NoBackendError, shared_prefix_attention, shared_prefix_decode
from prefix_kernels._core import config
from prefix_kernels.backends import registry
from prefix_kernels._core.problem import Problem
from prefix_kernels.api import routes_to_decode

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("PREFIX_KERNELS_BACKEND", raising=False)


def decode_args(inp):
    args = tuple(inp[n] for n in TENSOR_ARGS)
    kwargs = {"prefix_index": inp.get("prefix_index"), "kv_mask": inp.get("kv_mask")}
    if inp.get("prefix_mask") is not None:
        kwargs["prefix_mask"] = inp["prefix_mask"]
    return args, kwargs


def run_decode(inp, **kw):
    args, kwargs = decode_args(inp)
    kwargs.update(kw)
    return shared_prefix_decode(*args, **kwargs)


def assert_decode_close(inp, *, backend, causal=True, scale=None, desc=""):
    """Forward-only version of helpers.assert_close_to_reference; returns (out, lse, truth)."""
    q = inp["q"]
    dtype = q.dtype
    B, Hq, Lq, D = q.shape
    desc = desc or describe(backend=backend, dtype=dtype, causal=causal)
    out, lse = run_decode(inp, causal=causal, scale=scale, return_lse=True, backend=backend)
    dummy = torch.zeros(B, Hq, Lq, D, dtype=dtype, device=q.device)
    truth = run_truth(inp, causal=causal, scale=scale, dout=dummy, dlse=None, with_lse=True, need_grads=False)
    same = run_same_dtype(inp, causal=causal, scale=scale, dout=dummy, dlse=None, with_lse=True, need_grads=False)

    assert out.dtype == dtype and tuple(out.shape) == (B, Hq, Lq, D) and out.device == q.device, desc
    assert lse.dtype == FP32 and tuple(lse.shape) == (B, Hq, Lq), desc
    assert not torch.isnan(truth["out"]).any() and not torch.isnan(truth["lse"]).any()
    assert not torch.isnan(out).any(), f"[{desc}] out contains NaN"
    assert not torch.isnan(lse).any(), f"[{desc}] lse contains NaN"
    assert not torch.isposinf(lse).any(), f"[{desc}] lse contains +inf"
    empty = torch.isneginf(truth["lse"])
    assert torch.equal(torch.isneginf(lse), empty), f"[{desc}] lse: -inf pattern differs from the truth"
    assert torch.all(out[empty] == 0), f"[{desc}] out is not exactly 0 on rows with no visible key"
    check_quantity("out", out, same["out"], truth["out"], dtype, desc)
    check_quantity("lse", lse, same["lse"], truth["lse"], FP32, desc, finite_mask=~empty)
    return out, lse, truth


# --------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------

BASE = {"Lq": [1, 4], "T": [1, 37, 300], "P": [0, 5, 257]}
EXTRA = {
    "heads": ["gqa", "mqa"],
    "G": [1, 2],
    "padding": ["left", None],
    "causal": [True, False],
    "dtype": [FP32, FP16],
    "D": [16, 32, 80],
    "B": [3, 5],
}
HEADS = {"gqa": (8, 2), "mqa": (4, 1)}
CASES = covering_set(BASE, EXTRA)


def case_id(c):
    return (f"Lq{c['Lq']}-T{c['T']}-P{c['P']}-{c['heads']}-G{c['G']}-{c['padding'] or 'nopad'}-"
            f"{'causal' if c['causal'] else 'full'}-{DTYPE_NAMES[c['dtype']]}-D{c['D']}-B{c['B']}")


def run_case(c, backend, device):
    Hq, Hkv = HEADS[c["heads"]]
    inp = make_inputs(c["B"], Hq, Hkv, c["Lq"], c["T"], c["P"], c["D"], c["G"], c["dtype"], device,
                      padding=c["padding"], requires_grad=False)
    return assert_decode_close(inp, backend=backend, causal=c["causal"], desc=f"{backend}:{case_id(c)}")


def test_matrix_covers_every_pair():
    assert len(CASES) >= 18
    assert not uncovered_pairs(CASES, {**BASE, **EXTRA})
    assert len({case_id(c) for c in CASES}) == len(CASES)
    # the empty-row case: no prefix and a fully padded request
    assert any(c["P"] == 0 and c["padding"] == "left" for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_decode_matrix(case, triton_device):
    run_case(case, "triton", triton_device)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_decode_matrix(case):
    run_case(case, "torch", "cpu")


def test_reference_decode_backend():
    inp = make_inputs(3, 8, 2, 4, 37, 5, 32, 2, FP32, "cpu", padding="left", requires_grad=False)
    assert_decode_close(inp, backend="reference")


# --------------------------------------------------------------------------
# Focused cases
# --------------------------------------------------------------------------

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend_device(request):
    if request.param == "triton":
        return "triton", request.getfixturevalue("triton_device")
    return "torch", "cpu"


@pytest.mark.parametrize("Lq,T", [(1, 37), (4, 37), (4, 1)])
def test_no_prefix_fully_padded_request_is_empty(backend_device, Lq, T):
    """P == 0: the fully padded request sees nothing -> out 0, lse -inf; never NaN. With T < Lq
    (causal) the first Lq - T rows of every request see nothing either."""
    backend, device = backend_device
    inp = make_inputs(3, 8, 2, Lq, T, 0, 32, 1, FP32, device, padding="left", requires_grad=False)
    assert inp["lengths"][-1] == 0
    out, lse, truth = assert_decode_close(inp, backend=backend, causal=True)
    assert torch.all(out[-1] == 0) and torch.all(torch.isneginf(lse[-1]))
    assert torch.isfinite(lse[0, :, -1]).all()
    if T < Lq:
        assert torch.all(torch.isneginf(lse[:, :, : Lq - T]))


def test_no_keys_at_all(backend_device):
    backend, device = backend_device
    inp = make_inputs(2, 2, 1, 3, 0, 0, 16, 2, FP32, device, requires_grad=False)
    out, lse = run_decode(inp, return_lse=True, backend=backend)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_many_prefixes_some_unused(backend_device):
    """G = 5 with prefixes 0 and 2 unused and the others shared unevenly: the prefix kernel's
    search over row blocks must skip empty prefixes."""
    backend, device = backend_device
    inp = make_inputs(7, 4, 2, 3, 9, 20, 16, 5, FP32, device, padding="left", requires_grad=False,
                      index_dtype=torch.int32)
    inp["prefix_index"] = torch.tensor([4, 4, 1, 3, 4, 1, 3], dtype=torch.int32, device=device)
    assert_decode_close(inp, backend=backend, causal=True)


def test_one_prefix_for_all_with_several_in_the_tensor(backend_device):
    backend, device = backend_device
    inp = make_inputs(3, 4, 2, 2, 9, 20, 16, 2, FP32, device, mixed_index=False, requires_grad=False)
    assert inp["prefix_index"].tolist() == [0, 0, 0]
    out, _, _ = assert_decode_close(inp, backend=backend)
    with pytest.raises(ValueError, match="pass prefix_index"):
        run_decode(dict(inp, prefix_index=None), backend=backend)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=DTYPE_NAMES.get)
def test_strided_inputs_and_arbitrary_mask(backend_device, dtype):
    """Transposed (B, L, H, D) views read in place; a kv_mask with holes, not only left padding."""
    backend, device = backend_device
    inp = make_inputs(3, 8, 2, 4, 45, 7, 32, 2, dtype, device, transposed=True, requires_grad=False)
    assert not inp["q"].is_contiguous() and not inp["k"].is_contiguous()
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 45, generator=g) < 0.6
    mask[:, -1] = True
    inp["kv_mask"] = mask.to(device)
    assert_decode_close(inp, backend=backend)


@pytest.mark.parametrize("scale", [0.3, 1.7])
def test_custom_scale(backend_device, scale):
    backend, device = backend_device
    inp = make_inputs(2, 4, 1, 2, 20, 9, 32, 1, FP32, device, padding="left", requires_grad=False)
    out, _, _ = assert_decode_close(inp, backend=backend, scale=scale)
    assert not torch.allclose(out, run_decode(inp, backend=backend), atol=1e-3)


@pytest.mark.parametrize("D", [48, 112, 256])
def test_head_dims_triton(D, triton_device):
    inp = make_inputs(2, 2, 1, 2, 9, 7, D, 2, FP32, triton_device, padding="left", requires_grad=False)
    assert_decode_close(inp, backend="triton")


def test_lq_16_several_row_blocks(triton_device):
    """Lq = 16 with group 4: 64 rows per (request, kv head), more than one own-cache row block
    under the interpreter, and 16-row prefix blocks that hold parts of two requests."""
    inp = make_inputs(3, 4, 1, 16, 40, 21, 16, 2, FP16, triton_device, padding="left", requires_grad=False)
    assert_decode_close(inp, backend="triton")


def test_many_splits_merge_in_chunks(triton_device, monkeypatch):
    """More partials per row (19) than the merge kernel's 16-wide chunk."""
    from prefix_kernels.backends.triton import tiles

    monkeypatch.setattr(tiles, "CPU_SPLITS", 12)
    inp = make_inputs(2, 4, 2, 1, 300, 257, 16, 1, FP32, triton_device, padding="left", requires_grad=False)
    assert_decode_close(inp, backend="triton")


@pytest.mark.parametrize("fuse", [False, True], ids=["3launches", "fused"])
def test_triton_wide_row_offsets(triton_device, monkeypatch, fuse):
    """The 64-bit row-offset variant (WIDE, taken when rows x row stride can pass 2**31, a long
    cache) computes the same as the 32-bit one."""
    from prefix_kernels.backends.triton import tiles

    calls = []
    monkeypatch.setattr(tiles, "needs_wide_rows", lambda *a: calls.append(a) or True)
    monkeypatch.setitem(config.FUSE_PARTS, "triton", fuse)
    inp = make_inputs(3, 4, 2, 2, 70, 40, 16, 2, FP16, triton_device, padding="left", requires_grad=False,
                      prefix_padding="right")
    assert_decode_close(inp, backend="triton")
    assert calls


def test_wide_rows_only_where_offsets_pass_2_31():
    from prefix_kernels.backends.triton import tiles

    assert not tiles.needs_wide_rows((16384, 8 * 128), (4096, 128))
    assert tiles.needs_wide_rows((16384, 8 * 128), (1 << 21, 1024))  # 2M cached keys at 8 heads x 128


# (B, Hq, Hkv, Lq, T, P, G, padding, causal): both parts with more programs in one than the other
# (the unpaired tail of the fused grid), several prefixes, padding, and one part empty.
FUSED = [
    (3, 4, 2, 1, 37, 5, 1, None, True),
    (5, 8, 2, 3, 70, 257, 2, "left", True),
    (4, 4, 1, 4, 300, 40, 2, "left", False),
    (2, 4, 2, 2, 9, 0, 1, "left", True),  # no prefix: the own part alone
    (3, 4, 2, 2, 0, 33, 2, None, False),  # no own keys: the prefix part alone
]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,T,P,G,padding,causal", FUSED)
def test_triton_fused_parts(triton_device, monkeypatch, B, Hq, Hkv, Lq, T, P, G, padding, causal):
    """fuse_parts runs the prefix and own programs in one interleaved grid: right against the
    reference, bit-identical to the three-launch path (FUSE_MERGE off) under the interpreter (same
    splits, same partials, same merge), and the fused kernel is the one launched when both parts
    have keys."""
    inp = make_inputs(B, Hq, Hkv, Lq, T, P, 16, G, FP16, triton_device, padding=padding, requires_grad=False)
    launched = spy_decode_launches(monkeypatch)["decode_parts_kernel"]
    monkeypatch.setitem(config.FUSE_PARTS, "triton", True)
    out, lse, _ = assert_decode_close(inp, backend="triton", causal=causal)
    assert len(launched) == (1 if P and T else 0)
    if triton_interpreting():
        monkeypatch.setitem(config.FUSE_PARTS, "triton", False)
        monkeypatch.setitem(config.FUSE_MERGE, "triton", False)
        out3, lse3 = run_decode(inp, causal=causal, return_lse=True, backend="triton")
        assert torch.equal(out, out3) and torch.equal(lse, lse3)
        assert len(launched) == (1 if P and T else 0)


# --------------------------------------------------------------------------
# The merge fused into the own-cache kernel (FUSE_MERGE, one own split)
# --------------------------------------------------------------------------

DECODE_KERNELS = ("decode_prefix_kernel", "decode_own_kernel", "decode_merge_kernel", "decode_parts_kernel")


class LaunchSpy:
    """Stands in for one kernel object of the Triton decode launcher: records each launch's grid
    and keyword arguments (constexprs, warps), then launches the real kernel."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append((grid, kwargs))
            return launch(*args, **kwargs)

        return run


def spy_decode_launches(monkeypatch) -> dict:
    """{kernel name: [(grid, keyword arguments), ...]}, filled by every launch the Triton decode
    launcher makes from now on (cleared by the caller between runs)."""
    from prefix_kernels.backends.triton import decode as launcher

    calls = {}
    for name in DECODE_KERNELS:
        calls[name] = []
        monkeypatch.setattr(launcher, name, LaunchSpy(getattr(launcher, name), calls[name]))
    return calls


def merged_in_own(calls) -> bool:
    """Whether the launches recorded by spy_decode_launches merged in the own kernel: one own
    launch with MERGE and one split, and no merge launch. Raises on a mixture."""
    own = calls["decode_own_kernel"]
    if any(kw["MERGE"] for _, kw in own):
        assert len(own) == 1 and own[0][0][1] == 1, own  # one launch, one split
        assert not calls["decode_merge_kernel"] and not calls["decode_parts_kernel"], calls
        return True
    return False


def forget_launches(calls):
    for launches in calls.values():
        launches.clear()


# (B, Hq, Hkv, Lq, T, P, G, padding, prefix_padding, causal, dtype, cpu_splits). Under the
# interpreter each part takes tiles.CPU_SPLITS splits of its 32-key tiles, so T <= 32 (or
# cpu_splits 1) gives the own part the one split that FUSE_MERGE needs, while P > 32 keeps two
# prefix partials to merge with it.
FUSED_MERGE = [
    (3, 8, 2, 1, 20, 0, 1, "left", None, True, FP32, 2),  # no prefix: nothing to merge; an empty request
    (3, 4, 2, 3, 0, 45, 2, None, None, False, FP16, 2),  # no own key: the merge launch stays
    (5, 8, 2, 3, 25, 57, 3, "left", None, True, FP16, 2),  # three prefixes (prefix_index), two prefix splits
    (4, 4, 1, 1, 30, 70, 2, "right", None, False, FP32, 2),  # MQA, right padding
    (5, 4, 2, 4, 17, 40, 2, "left", "left", True, FP32, 2),  # prefix_mask: the last request sees nothing
    (3, 8, 2, 16, 9, 21, 2, "left", "right", True, FP16, 2),  # Lq 16 > T: two own row blocks; rows see nothing
    (3, 8, 2, 3, 70, 100, 1, "left", None, True, FP32, 1),  # no prefix_index; three own tiles in one split
    (2, 4, 2, 2, 32, 33, 1, None, None, False, FP16, 2),  # a full own tile; a prefix split of one key
]


def fused_merge_id(c):
    B, Hq, Hkv, Lq, T, P, G, padding, prefix_padding, causal, dtype, splits = c
    return (f"B{B}-Hq{Hq}-Hkv{Hkv}-Lq{Lq}-T{T}-P{P}-G{G}-{padding or 'nopad'}-pm{prefix_padding or 'none'}-"
            f"{'causal' if causal else 'full'}-{DTYPE_NAMES[dtype]}-splits{splits}")


# Between the fused merge and the merge launch: fp32 rounding (another summation order) of values
# of order 1, so a few fp32 ulps; an fp16 output may round to the neighbouring fp16 value.
FP32_ROUNDING = dict(rtol=4e-6, atol=4e-6)
OUT_ROUNDING = {FP32: FP32_ROUNDING, FP16: dict(rtol=2**-10, atol=2**-14)}


@pytest.mark.parametrize("case", FUSED_MERGE, ids=fused_merge_id)
def test_triton_fused_merge(triton_device, monkeypatch, case):
    """With one own split the own kernel merges the prefix partials itself (no merge launch):
    right against the float64 reference (rows that see nothing: out 0, lse -inf, no NaN), and
    equal to the three launches (FUSE_MERGE off) up to fp32 rounding."""
    from prefix_kernels.backends.triton import tiles

    B, Hq, Hkv, Lq, T, P, G, padding, prefix_padding, causal, dtype, splits = case
    monkeypatch.setattr(tiles, "CPU_SPLITS", splits)
    inp = make_inputs(B, Hq, Hkv, Lq, T, P, 16, G, dtype, triton_device, padding=padding,
                      prefix_padding=prefix_padding, requires_grad=False)
    if G == 1:
        inp["prefix_index"] = None
    calls = spy_decode_launches(monkeypatch)
    monkeypatch.setitem(config.FUSE_MERGE, "triton", True)
    out, lse, truth = assert_decode_close(inp, backend="triton", causal=causal, desc=fused_merge_id(case))
    if not triton_interpreting():
        return  # on a GPU the launcher picks its own splits: the path below is not this one
    assert merged_in_own(calls) == (T > 0)
    assert len(calls["decode_merge_kernel"]) == (0 if T else 1)
    assert len(calls["decode_prefix_kernel"]) == (1 if P else 0)
    if (P == 0 or prefix_padding) and padding == "left":  # a request with no key at all
        assert torch.isneginf(truth["lse"]).any()  # the rows that see nothing are covered

    forget_launches(calls)
    monkeypatch.setitem(config.FUSE_MERGE, "triton", False)
    out3, lse3 = run_decode(inp, causal=causal, return_lse=True, backend="triton")
    assert not merged_in_own(calls) and len(calls["decode_merge_kernel"]) == 1
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse3))
    torch.testing.assert_close(lse, lse3, **FP32_ROUNDING)
    torch.testing.assert_close(out, out3, **OUT_ROUNDING[dtype])


@pytest.mark.parametrize("T,fuse_merge,fuse_parts,merged", [
    (20, True, False, True),  # one own split: the own kernel merges
    (70, True, False, False),  # two own splits: the merge launch
    (20, False, False, False),  # FUSE_MERGE off
    (20, True, True, False),  # FUSE_PARTS: the prefix programs share the own programs' grid
])
def test_triton_merge_launch_only_where_needed(triton_device, monkeypatch, T, fuse_merge, fuse_parts, merged):
    """No merge launch exactly when the own part has one split, the parts run in separate
    launches and FUSE_MERGE is on; the merge launch otherwise. Right against the reference each
    way."""
    inp = make_inputs(3, 4, 2, 2, T, 50, 16, 2, FP32, triton_device, padding="left", requires_grad=False)
    calls = spy_decode_launches(monkeypatch)
    monkeypatch.setitem(config.FUSE_MERGE, "triton", fuse_merge)
    monkeypatch.setitem(config.FUSE_PARTS, "triton", fuse_parts)
    assert_decode_close(inp, backend="triton")
    if not triton_interpreting():
        return
    own_splits = {grid[1] for grid, _ in calls["decode_own_kernel"]}
    assert own_splits == (set() if fuse_parts else {1 if T <= 32 else 2})
    assert merged_in_own(calls) == merged
    assert len(calls["decode_merge_kernel"]) == (0 if merged else 1)


@pytest.mark.parametrize("fuse_merge", [True, False], ids=["fused_merge", "3launches"])
@pytest.mark.parametrize("where", ["q", "k", "v", "prefix_k", "prefix_v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_triton_nan_and_inf_propagate_like_the_reference(triton_device, monkeypatch, where, bad, fuse_merge):
    """Decode's version of test_numerics' test: a NaN or Inf in an input gives NaN and Inf exactly
    where the reference gives them (a hidden key does not leak into rows that cannot see it), with
    the merge in the own kernel (T = 6: one own split) and in its own launch."""
    from prefix_kernels.backends.reference import reference_attention

    monkeypatch.setitem(config.FUSE_MERGE, "triton", fuse_merge)
    inp = make_inputs(3, 4, 2, 5, 6, 40, 16, 1, FP32, triton_device, padding="right", requires_grad=False)
    x = inp[where].clone()
    x[0 if where.startswith("prefix") else 1, 0, 2, 3] = bad
    inp[where] = x
    calls = spy_decode_launches(monkeypatch)
    out = run_decode(inp, causal=True, backend="triton")
    ref, _ = reference_attention(*(inp[n] for n in TENSOR_ARGS), prefix_index=inp["prefix_index"],
                                 kv_mask=inp["kv_mask"], causal=True)
    assert not torch.isfinite(ref).all()  # the case is not vacuous
    if triton_interpreting():
        assert merged_in_own(calls) == fuse_merge
    for name, kind in (("NaN", torch.isnan), ("Inf", torch.isinf)):
        assert torch.equal(kind(out), kind(ref)), (
            f"{name} pattern differs: triton {int(kind(out).sum())}, reference {int(kind(ref).sum())}")
    finite = torch.isfinite(ref)
    # Both sides fp32 (exact products): they differ by a few fp32 roundings (3e-7 measured here).
    torch.testing.assert_close(out[finite], ref[finite].to(out.dtype), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=DTYPE_NAMES.get)
def test_deterministic(backend_device, dtype):
    backend, device = backend_device
    inp = make_inputs(5, 8, 2, 4, 37, 40, 32, 2, dtype, device, padding="left", requires_grad=False)
    first = run_decode(inp, return_lse=True, backend=backend)
    second = run_decode(inp, return_lse=True, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b), f"{backend}: two identical calls differ"


def test_output_memory_layout(backend_device):
    backend, device = backend_device
    inp = make_inputs(2, 4, 2, 3, 6, 5, 16, 1, FP32, device, requires_grad=False)
    out = run_decode(inp, backend=backend)
    assert out.transpose(1, 2).is_contiguous()  # (B, Lq, Hq, D) memory, as the op's


# --------------------------------------------------------------------------
# Errors, forward-only guard, dispatch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("Lq", [0, 17])
def test_lq_out_of_range_names_q(Lq):
    inp = make_inputs(2, 4, 2, Lq, 6, 5, 16, 1, FP32, "cpu", requires_grad=False)
    with pytest.raises(ValueError, match=r"\bq\b"):
        run_decode(inp)


def test_requires_grad_raises_pointing_to_the_op():
    inp = make_inputs(2, 4, 2, 1, 6, 5, 16, 1, FP32, "cpu", requires_grad=False)
    inp["prefix_k"].requires_grad_(True)
    with pytest.raises(RuntimeError, match="shared_prefix_attention") as err:
        run_decode(inp)
    assert "prefix_k" in str(err.value)
    with torch.no_grad():
        out = run_decode(inp)
    with torch.inference_mode():
        out2 = run_decode(inp)
    assert torch.equal(out, out2)


def test_other_bad_inputs_are_checked():
    inp = make_inputs(2, 4, 2, 1, 6, 5, 16, 1, FP32, "cpu", requires_grad=False)
    with pytest.raises(ValueError, match="kv_mask"):
        run_decode(dict(inp, kv_mask=torch.ones(2, 7, dtype=torch.bool)))
    with pytest.raises(ValueError, match="backend"):
        run_decode(inp, backend="flash")


def test_auto_on_cpu_is_torch():
    inp = make_inputs(3, 8, 2, 4, 37, 5, 32, 2, FP32, "cpu", padding="left", requires_grad=False)
    auto = run_decode(inp, return_lse=True)
    torch_ = run_decode(inp, return_lse=True, backend="torch")
    for a, b in zip(auto, torch_):
        assert torch.equal(a, b)


def _problem(device, Lq=1):
    return Problem(B=2, Hq=4, Hkv=2, Lq=Lq, Lk=6, D=16, G=1, P=5, dtype=FP16, device=torch.device(device))


def test_shared_prefix_attention_auto_routes_cuda_inference_to_decode():
    """The routing rule, on a Problem that says cuda (no CUDA needed to decide)."""
    x = torch.zeros(1)
    x_grad = torch.zeros(1, requires_grad=True)
    cuda = _problem("cuda")
    assert routes_to_decode("auto", cuda, (x, x))
    assert routes_to_decode("auto", _problem("cuda", Lq=16), (x, x))
    assert not routes_to_decode("auto", _problem("cuda", Lq=17), (x, x))
    assert not routes_to_decode("triton", cuda, (x, x))  # a backend named explicitly is the op's
    assert not routes_to_decode("auto", _problem("cpu"), (x, x))
    assert not routes_to_decode("auto", cuda, (x, x_grad))  # training: the op's kernels
    with torch.no_grad():
        assert routes_to_decode("auto", cuda, (x, x_grad))


def test_shared_prefix_attention_auto_on_cpu_is_unchanged():
    inp = make_inputs(2, 4, 2, 1, 6, 5, 16, 1, FP32, "cpu", requires_grad=False)
    args, kwargs = decode_args(inp)
    with torch.no_grad():
        a = shared_prefix_attention(*args, **kwargs)
        b = shared_prefix_attention(*args, **kwargs, backend="torch")
    assert torch.equal(a, b)


@pytest.fixture
def fake_cuda(monkeypatch):
    """The registry's "cuda" entry replaced by a fake that declines D > 128 and computes with the
    torch split path, counting its calls; plans are forgotten before and after."""
    from prefix_kernels.backends import torch_split
    from prefix_kernels.backends.base import Backend

    calls = []

    def decode_reasons(p):
        if p.device.type != "cuda":
            return [f"CUDA kernels need CUDA tensors, got {p.device.type}"]
        return [] if p.D <= 128 else ["D > 128 not compiled"]

    def decode_forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale):
        calls.append((q.shape, causal, scale))
        out, lse = torch_split.forward(q, k, v, prefix_k, prefix_v, prefix_index, kv_mask, causal, scale)
        return out.contiguous(), lse  # (B, Hq, Lq, D) memory: the custom op re-lays it out

    fake = Backend("cuda", "cuda", function=lambda kind: decode_forward, decode_reasons=decode_reasons)
    monkeypatch.setitem(registry.IMPLEMENTATIONS, "cuda", fake)
    registry.forget_plans()
    yield calls
    registry.forget_plans()


def test_cuda_backend_declines_with_its_reason(monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_DISABLE_CUDA", "1")
    inp = make_inputs(2, 4, 2, 1, 6, 5, 16, 1, FP32, "cpu", requires_grad=False)
    with pytest.raises(NoBackendError, match="cuda: not CUDA tensors"):
        run_decode(inp, backend="cuda")
    assert any("disabled by PREFIX_KERNELS_DISABLE_CUDA" in r for r in
               registry.public_reasons("cuda", _problem("cuda"), decode=True))


def test_registry_runs_the_backend_it_planned(fake_cuda):
    from prefix_kernels.backends import torch_split as torch_backend

    assert registry.public_reasons("cuda", _problem("cuda"), decode=True) == []
    big = Problem(B=2, Hq=4, Hkv=2, Lq=1, Lk=6, D=256, G=1, P=5, dtype=FP16, device=torch.device("cuda"))
    assert registry.public_reasons("cuda", big, decode=True) == ["D > 128 not compiled"]
    assert registry.public_reasons("cuda", _problem("cpu"), decode=True) == ["CUDA kernels need CUDA tensors, got cpu"]
    assert registry.plan("auto", _problem("cuda"), decode=True) == "cuda"

    # The custom op runs the planned backend's decode function (called directly: CPU tensors here).
    inp = make_inputs(2, 4, 2, 3, 6, 5, 16, 1, FP32, "cpu", requires_grad=False)
    args = [inp[n] for n in TENSOR_ARGS]
    out, lse = torch.ops.prefix_kernels.decode(*args, None, None, True, 0.25, "cuda")
    assert fake_cuda == [((2, 4, 3, 16), True, 0.25)]
    want, want_lse = torch_backend.forward(*args, None, None, True, 0.25)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert out.stride() == want.stride()

    # The choice is traceable: torch.compile bakes it into the graph with no break.
    def choose(x):
        p = Problem(B=2, Hq=4, Hkv=2, Lq=1, Lk=6, D=x.shape[-1], G=1, P=5, dtype=x.dtype, device=torch.device("cuda"))
        return x * (2.0 if registry.plan("auto", p, decode=True) == "cuda" else 3.0)

    compiled = torch.compile(choose, fullgraph=True, backend="aot_eager")
    assert torch.all(compiled(torch.ones(2, 16)) == 2)
    assert torch.all(compiled(torch.ones(2, 256)) == 3)  # "cuda" declines D = 256: "triton" is next


def test_plan_is_made_once_per_kind_of_call(fake_cuda, monkeypatch):
    asked = []
    fake = registry.IMPLEMENTATIONS["cuda"]
    counting = type(fake)("cuda", "cuda", function=fake.function,
                          decode_reasons=lambda p: asked.append(p) or fake.decode_reasons(p))
    monkeypatch.setitem(registry.IMPLEMENTATIONS, "cuda", counting)
    for _ in range(5):
        assert registry.plan("auto", _problem("cuda"), decode=True) == "cuda"
    assert len(asked) == 1
    monkeypatch.setenv("PREFIX_KERNELS_DISABLE_CUDA", "1")  # a variable that changes choices: planned anew
    registry.plan("auto", _problem("cuda"), decode=True)
    assert len(asked) == 2


def test_exported():
    assert prefix_kernels.shared_prefix_decode is shared_prefix_decode
    assert "shared_prefix_decode" in prefix_kernels.__all__


def test_prefix_tables_without_host_sync():
    from prefix_kernels._core.grouping import row_block_starts as _block_starts, sorted_by_prefix

    index = torch.tensor([4, 4, 1, 3, 4, 1, 3])
    order, starts = sorted_by_prefix(index, 7, 5, index.device)
    assert order.tolist() == [2, 5, 3, 6, 0, 1, 4]
    assert starts.tolist() == [0, 0, 2, 2, 4, 7]
    # R = 3 rows per request, 4-row blocks: prefix 1 -> 6 rows (2 blocks), 3 -> 2, 4 -> 9 rows (3)
    assert _block_starts(starts, 3, 4, 5).tolist() == [0, 0, 2, 2, 4, 7]


@pytest.mark.parametrize("B", [8, 64, 256])
@pytest.mark.parametrize("P", [1024, 4096, 16384])
def test_split_partials_stay_within_a_tenth_of_the_step(B, P):
    """At the decode benchmark's shapes (Hq 32, Hkv 8, D 128, T 256, bf16) the fp32 partials of
    every split, written and read back, weigh at most a tenth of the bytes the step reads."""
    from prefix_kernels.backends.triton import tiles

    Hq, Hkv, D, T, rows = 32, 8, 128, 256, B * 32
    step = 2 * (Hkv * P + B * Hkv * T) * D * 2 + 2 * rows * D * 2
    p_cap, o_cap = tiles.split_caps(step, rows, D, P, T)
    p = tiles.choose_splits(-(-B * 4 // 64) * Hkv, P, 64, 132, p_cap)
    o = tiles.choose_splits(B * Hkv, T, 64, 132, o_cap)
    assert 2 * rows * (D + 1) * 4 * (p + o) <= tiles.PARTIAL_SHARE * step
    assert p >= 2 or P < 4096  # long prefixes are still split to fill the GPU


def test_choose_splits():
    from prefix_kernels.backends.triton.tiles import MAX_SPLITS, choose_splits

    big = 1 << 20
    assert choose_splits(10, 0, 64, 132, big) == 0
    assert choose_splits(10, 1000, 32, None, 1) == 2  # CPU: fixed, small
    assert choose_splits(10, 20, 32, None, big) == 1
    assert choose_splits(1024, 256, 64, 132, big) == 1  # the grid already fills the GPU
    assert choose_splits(64, 256, 64, 132, big) == 2  # at most keys / 128
    assert choose_splits(8, 16384, 64, 132, big) == 33  # two waves
    assert choose_splits(1, 1 << 20, 64, 132, big) == MAX_SPLITS
    assert choose_splits(8, 16384, 64, 132, 4) == 4  # partials may not outweigh the keys read
    assert choose_splits(8, 16384, 64, 132, 0) == 1


def test_merge_fits_in_registers():
    """The fused merge's register guard (tiles.merge_fits): 16 fp32 accumulator values per thread
    at most on a GPU (on_gpu reads only the device's type: nothing touches CUDA)."""
    from prefix_kernels.backends.triton import tiles

    gpu = torch.device("cuda")
    assert tiles.merge_fits(16, 128, 8, gpu)  # Lq = 1, GQA up to 16: the serving case
    assert tiles.merge_fits(32, 128, 8, gpu) and tiles.merge_fits(16, 256, 8, gpu)
    assert not tiles.merge_fits(64, 128, 8, gpu) and not tiles.merge_fits(32, 256, 8, gpu)
    assert tiles.merge_fits(32, 64, 4, gpu) and not tiles.merge_fits(64, 64, 4, gpu)  # spilled on sm_80
    assert tiles.merge_fits(128, 256, 1, torch.device("cpu"))  # the interpreter has no registers


# --------------------------------------------------------------------------
# No per-request prefix copy (the detector of test_no_copy.py)
# --------------------------------------------------------------------------

NB, NHKV, NHQ, NLQ, NLK, NP, ND = 5, 2, 4, 3, 4, 23, 16  # test_no_copy's distinguishing sizes


def _recorded_decode(backend, device, G):
    inp = make_inputs(NB, NHQ, NHKV, NLQ, NLK, NP, ND, G, FP32, device, padding="left", requires_grad=False)
    rec = AllocationRecorder()
    with rec:
        out, lse = run_decode(inp, return_lse=True, backend=backend)
    assert out.shape == (NB, NHQ, NLQ, ND)
    return rec


def test_decode_detector_fires_on_reference():
    rec = _recorded_decode("reference", "cpu", 2)
    assert per_request_prefix_copies(rec.allocs)


@pytest.mark.parametrize("G", [1, 2])
def test_decode_makes_no_prefix_copy(backend_device, G):
    backend, device = backend_device
    rec = _recorded_decode(backend, device, G)
    assert not rec.opaque, f"{backend}: could not look inside {rec.opaque}"
    assert "prefix_kernels.decode.default" in rec.opened or "prefix_kernels::decode" in str(rec.opened)
    assert rec.allocs
    assert not per_request_prefix_copies(rec.allocs), rec.allocs
    assert not prefix_row_buffers(rec.allocs), rec.allocs


# --------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# --------------------------------------------------------------------------


def _op_inputs():
    inp = make_inputs(3, 4, 2, 2, 7, 6, 32, 2, FP32, "cpu", padding="left", requires_grad=False)
    inp["prefix_index"] = torch.tensor([1, 0, 1])
    return inp


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_decode(backend):
    inp = _op_inputs()
    args = [inp[n] for n in TENSOR_ARGS]
    impl = "torch_split" if backend == "torch" else backend
    opcheck(torch.ops.prefix_kernels.decode.default, (*args, inp["prefix_index"], inp["kv_mask"], True, 0.2, impl))


def test_compile_fullgraph_matches_eager():
    inp = _op_inputs()
    args, kwargs = decode_args(inp)

    def step(q, k, v, pk, pv, index, mask):
        out, lse = shared_prefix_decode(q, k, v, pk, pv, prefix_index=index, kv_mask=mask, return_lse=True,
                                        backend="triton")
        return out * 2, lse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(*args, kwargs["prefix_index"], kwargs["kv_mask"])
        want = step(*args, kwargs["prefix_index"], kwargs["kv_mask"])
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# Randomised shapes (derandomized hypothesis: the same examples every run)
# --------------------------------------------------------------------------

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def decode_case(draw, max_B=6, max_T=70, max_P=70, dims=(16, 24, 40, 64, 96), dtypes=(FP32, FP16)):
    Hkv = draw(st.integers(1, 2))
    return dict(
        B=draw(st.integers(1, max_B)), Hkv=Hkv, ratio=draw(st.sampled_from([1, 2, 3, 4])),
        Lq=draw(st.integers(1, 16)), T=draw(st.integers(0, max_T)), P=draw(st.integers(0, max_P)),
        D=draw(st.sampled_from(dims)), G=draw(st.integers(1, 4)),
        padding=draw(st.sampled_from([None, "left", "right"])), causal=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)), transposed=draw(st.booleans()),
    )


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(c=decode_case())
def test_triton_decode_random_shapes(c, triton_device):
    inp = make_inputs(c["B"], c["Hkv"] * c["ratio"], c["Hkv"], c["Lq"], c["T"], c["P"], c["D"], c["G"],
                      c["dtype"], triton_device, padding=c["padding"], transposed=c["transposed"],
                      requires_grad=False)
    assert_decode_close(inp, backend="triton", causal=c["causal"], desc=f"triton:{describe(**c)}")


# GPU fuzzing of the decode kernels (skipped without CUDA): larger caches and prefixes, bf16, and
# the CUDA backend on the head dims it compiles.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@settings(max_examples=gpu_examples(150), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(c=decode_case(max_B=48, max_T=700, max_P=700, dims=(64, 80, 96, 128, 256), dtypes=(FP32, FP16, BF16)))
def test_gpu_decode_random_shapes(backend, c):
    inp = make_inputs(c["B"], c["Hkv"] * c["ratio"], c["Hkv"], c["Lq"], c["T"], c["P"], c["D"], c["G"],
                      c["dtype"], "cuda", padding=c["padding"], transposed=c["transposed"],
                      requires_grad=False)
    assert_decode_close(inp, backend=backend, causal=c["causal"], desc=f"{backend}:{describe(**c)}")


# --------------------------------------------------------------------------
# GPU lane (skipped without CUDA): realistic decode sizes
# --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("Lq", [1, 16])
def test_gpu_decode_realistic(dtype, Lq):
    inp = make_inputs(64, 32, 8, Lq, 256, 1024, 128, 2, dtype, "cuda", padding="left", requires_grad=False)
    out, lse, _ = assert_decode_close(inp, backend="triton", desc=f"gpu:{DTYPE_NAMES[dtype]}-Lq{Lq}")
    again = run_decode(inp, return_lse=True, backend="triton")
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])
    # shared_prefix_attention(auto) without gradients takes the decode path.
    args, kwargs = decode_args(inp)
    auto_decode = shared_prefix_decode(*args, **kwargs, return_lse=True)
    auto_op = shared_prefix_attention(*args, **kwargs, return_lse=True)
    assert torch.equal(auto_op[0], auto_decode[0]) and torch.equal(auto_op[1], auto_decode[1])


@pytest.mark.gpu
@pytest.mark.parametrize("B,P,T", [(1, 16384, 300), (2, 37, 8192), (256, 1024, 64)])
def test_gpu_decode_split_extremes(B, P, T):
    """Small batches with long prefixes or caches (many splits, merge in chunks) and a batch
    large enough that each part runs without splits."""
    inp = make_inputs(B, 32, 8, 1, T, P, 128, 3, FP16, "cuda", padding="left", requires_grad=False)
    assert_decode_close(inp, backend="triton", desc=f"gpu:B{B}-P{P}-T{T}")


# ---- a decode step inside a CUDA graph -------------------------------------------------------


def test_index_check_makes_no_host_sync_while_capturing(monkeypatch):
    """While a CUDA graph is being captured a host sync is an error: the range check of
    prefix_index becomes a device-side assert (simulated here on CPU tensors, where the assert
    fires at once)."""
    from prefix_kernels._core import problem

    monkeypatch.setattr(problem, "capturing", lambda x: True)
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("host sync while capturing"))
    problem.check_index_range(torch.tensor([0, 2, 1]), 3)
    with pytest.raises(RuntimeError, match=r"prefix_index values must be in \[0, G\) = \[0, 2\)"):
        problem.check_index_range(torch.tensor([0, 2, 1]), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_decode_step_replays_in_a_cuda_graph(backend):
    """A decode step (two prefixes, padding, a prefix_mask) captured once and replayed with new
    queries gives the eager result: no host sync, no allocation outside the graph's pool."""
    if backend == "cuda" and registry.public_reasons("cuda", Problem(4, 8, 2, 1, 64, 128, 2, 96, torch.bfloat16,
                                                                     torch.device("cuda"), True), decode=True):
        pytest.skip("the CUDA decode extension cannot run here")
    torch.manual_seed(0)
    inp = make_inputs(4, 8, 2, 1, 64, 96, 128, 2, torch.bfloat16, "cuda", padding="left", requires_grad=False,
                      prefix_padding="right")
    args = (inp["q"], inp["k"], inp["v"], inp["prefix_k"], inp["prefix_v"])
    kw = dict(prefix_index=inp["prefix_index"], kv_mask=inp["kv_mask"], prefix_mask=inp["prefix_mask"],
              backend=backend)
    static_q = inp["q"].clone()
    for _ in range(2):  # warm: builds, compiles and plans outside the capture
        shared_prefix_decode(static_q, *args[1:], **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = shared_prefix_decode(static_q, *args[1:], **kw)
    for seed in (1, 2):
        torch.manual_seed(seed)
        static_q.copy_(torch.randn_like(static_q))
        graph.replay()
        torch.testing.assert_close(static_out, shared_prefix_decode(static_q, *args[1:], **kw), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# FUSE_PARTS "auto": the model that decides the fused launch
# ------------------------------------------------------------------------------------------------


def test_parts_overlap_gain_follows_the_model():
    """The serial/overlapped ratio of the decode parts at the benchmark's shapes (Hq 32, Hkv 8,
    D 128, T 256, one prefix) on an H100: 1 where the prefix part is memory-bound (B = 8), growing
    with B and P where its matrix products outlast its read; the largest shapes cross the
    threshold, the small ones do not."""
    from prefix_kernels._core import gpus

    h100 = gpus.gpu_specs("NVIDIA H100 80GB HBM3")
    gain = lambda B, P, T=256: config.parts_overlap_gain(B, 32, 8, 1, T, P, 1, 128, h100)  # noqa: E731
    assert gain(8, 16384) == pytest.approx(1.0)
    assert gain(64, 1024) < gain(64, 4096) < gain(64, 16384)
    assert gain(64, 4096) < gain(256, 4096)
    assert gain(256, 16384) >= config.FUSE_PARTS_GAIN > gain(64, 1024)
    assert gain(256, 16384, T=0) == pytest.approx(1.0)  # nothing to overlap with
    # By hand at B 256, P 16384: 68.7 GFLOP at 45% of 989 TFLOP/s, 67 + 268 MB at 85% of 3.35 TB/s.
    t_math = 4 * 256 * 32 * 16384 * 128 / (989e12 * 0.45)
    prefix, own = 2 * 8 * 16384 * 128 * 2 / (3.35e12 * 0.85), 2 * 256 * 8 * 256 * 128 * 2 / (3.35e12 * 0.85)
    assert gain(256, 16384) == pytest.approx((max(t_math, prefix) + own) / max(t_math, prefix + own))


def test_fuse_parts_auto_decides_by_the_model(monkeypatch):
    """FUSE_PARTS "auto" fuses where the model's gain reaches FUSE_PARTS_GAIN on a GPU the table
    knows, in 16-bit with both parts present; True/False force it; off CUDA (no datasheet entry)
    it never fuses."""
    from prefix_kernels._core import gpus

    q16 = torch.empty(256, 32, 1, 128, dtype=torch.bfloat16)
    assert config.FUSE_PARTS == {"triton": "auto", "cuda": "auto"}
    assert not config.fuse_parts("triton", q16, 256, 16384, 1, 8)  # a CPU tensor: no GPU entry
    monkeypatch.setattr(gpus, "device_specs", lambda device: gpus.gpu_specs("NVIDIA H100 80GB HBM3"))
    assert config.fuse_parts("triton", q16, 256, 16384, 1, 8)
    assert config.fuse_parts("cuda", q16, 256, 16384, 1, 8)
    assert not config.fuse_parts("triton", q16[:8], 256, 16384, 1, 8)  # B 8: memory-bound prefix
    assert not config.fuse_parts("triton", q16, 0, 16384, 1, 8)  # no own keys
    assert not config.fuse_parts("triton", q16, 256, 0, 1, 8)  # no prefix keys
    assert not config.fuse_parts("triton", q16.float(), 256, 16384, 1, 8)  # fp32: no tensor-core model
    monkeypatch.setitem(config.FUSE_PARTS, "triton", False)
    assert not config.fuse_parts("triton", q16, 256, 16384, 1, 8)
    monkeypatch.setitem(config.FUSE_PARTS, "triton", True)
    assert config.fuse_parts("triton", q16[:8], 0, 0, 1, 8)


@pytest.mark.parametrize("gain,launched", [(2.0, 1), (1.0, 0)])
def test_triton_launcher_takes_the_auto_decision(triton_device, monkeypatch, gain, launched):
    """With FUSE_PARTS "auto" the Triton launcher asks the model for each call: the fused grid is
    launched exactly when the model's gain reaches the threshold (the GPU facts patched in)."""
    from prefix_kernels._core import gpus
    monkeypatch.setattr(gpus, "device_specs", lambda device: gpus.gpu_specs("H100"))
    monkeypatch.setattr(config, "parts_overlap_gain", lambda *a: gain)
    calls = spy_decode_launches(monkeypatch)
    inp = make_inputs(3, 4, 2, 1, 37, 40, 16, 2, FP16, triton_device, padding="left", requires_grad=False)
    assert_decode_close(inp, backend="triton")
    assert len(calls["decode_parts_kernel"]) == launched
