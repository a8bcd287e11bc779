"""Input builders and the FlashAttention-style accuracy check shared by the tests.

Tolerance rule (as in the FlashAttention test-suite): for every checked
quantity ``x`` (out, lse, dq, dk, dv, dprefix_k, dprefix_v)

    max|x_op - truth| <= 2 * max|x_same_dtype - truth| + floor

where ``truth`` is ``reference_attention`` computed in float64 from the very
same (already rounded) inputs, ``x_same_dtype`` is ``reference_attention``
computed in the input dtype (plain PyTorch at that precision, i.e. the error a
straightforward implementation makes), and ``floor`` is a small term tied to
the dtype: ``FLOOR_REL[dtype] * eps(dtype) * max|truth| + FLOOR_ABS[dtype] * eps(dtype)``.
The floor only protects against the (rare) case where the same-dtype error is
accidentally tiny; it is orders of magnitude below what an off-by-one mask or a
dropped prefix block produces.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from prefix_kernels import shared_prefix_attention
from prefix_kernels._core import accuracy
from prefix_kernels.backends.reference import reference_attention

TENSOR_ARGS = ("q", "k", "v", "prefix_k", "prefix_v")
GRAD_NAMES = {n: "d" + n for n in TENSOR_ARGS}


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GPU_EXAMPLES_ENV = "PREFIX_KERNELS_GPU_EXAMPLES"


def benchmark_module(name: str):
    """A module of benchmarks/, which is no package (its scripts import each other by name): imported
    with that folder on sys.path for the import only."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def gpu_examples(default: int) -> int:
    """How many cases a GPU fuzzing test draws: $PREFIX_KERNELS_GPU_EXAMPLES when set, else
    `default`. Every new set of constexprs and integer specialisations costs a Triton compile
    (1.6 s of CPU each, measured cold for sm_90), so a lent GPU session, which has minutes, draws fewer
    (benchmarks/gpu_session.py sets it); a GPU of one's own runs the default."""
    value = os.environ.get(GPU_EXAMPLES_ENV, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{GPU_EXAMPLES_ENV} must be a positive integer, got {value!r}")
    return int(value)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def make_lengths(B: int, Lk: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-request valid lengths in [0, Lk].

    When B >= 2 and Lk > 0 the last request is fully padded (length 0) and the
    first has at least one key; with B >= 3 the first request is unpadded.
    """
    if Lk == 0:
        return torch.zeros(B, dtype=torch.long)
    lengths = torch.randint(0, Lk + 1, (B,), generator=generator)
    if B >= 2:
        lengths[-1] = 0
        lengths[0] = max(int(lengths[0]), 1)
    if B >= 3:
        lengths[0] = Lk
    return lengths


def lengths_to_mask(lengths: torch.Tensor, Lk: int, padding: str) -> torch.Tensor:
    j = torch.arange(Lk)[None, :]
    lengths = lengths[:, None]
    if padding == "right":  # valid keys first, padding at the end
        return j < lengths
    if padding == "left":  # padding first, valid keys at the end
        return j >= (Lk - lengths)
    raise ValueError(padding)


def make_prefix_index(B: int, G: int, mixed: bool = True) -> Optional[torch.Tensor]:
    """Mixed assignment of requests to prefixes (deterministic).

    When ``mixed`` is False everybody uses prefix 0: None for G = 1, zeros otherwise (several
    prefixes without an index are refused).  When
    mixed and G > 1, consecutive requests use different prefixes, starting
    from the *last* prefix so that prefix 0 is not trivially the first one.
    """
    if not mixed:
        # every request on prefix 0: no index at all where that is allowed (G = 1)
        return None if G == 1 else torch.zeros(B, dtype=torch.long)
    return torch.tensor([(G - 1 - b) % G for b in range(B)], dtype=torch.long)


def make_inputs(
    B: int,
    Hq: int,
    Hkv: int,
    Lq: int,
    Lk: int,
    P: int,
    D: int,
    G: int,
    dtype: torch.dtype,
    device: Any = "cpu",
    *,
    padding: Optional[str] = None,
    mixed_index: bool = True,
    transposed: bool = False,
    requires_grad: bool = True,
    index_dtype: torch.dtype = torch.int64,
    generator: Optional[torch.Generator] = None,
    prefix_padding: Optional[str] = None,
) -> Dict[str, Any]:
    """Random inputs for ``shared_prefix_attention``.

    Returns a dict with keys q, k, v, prefix_k, prefix_v (leaf tensors with
    requires_grad set when asked), prefix_index (or None) and kv_mask (or
    None), plus "lengths" (the per-request valid lengths, or None).

    ``transposed=True`` builds q/k/v as (B, L, H, D) tensors and returns their
    (B, H, L, D) transposes (non-contiguous, the layout transformers produces);
    prefix_k/prefix_v are built as (G, P, Hkv, D) and transposed likewise.

    ``prefix_padding`` ("left" or "right") adds a (G, P) prefix_mask: prompts of different lengths
    padded to P, one of them (when G > 1) entirely padding, so that rows seeing no prefix key are
    covered too; None: no prefix_mask.
    """
    device = torch.device(device)

    def rnd(*shape_bhld):
        Bx, H, L, Dx = shape_bhld
        if transposed:
            t = torch.randn(Bx, L, H, Dx, generator=generator).to(dtype=dtype, device=device)
            t = t.transpose(1, 2)
        else:
            t = torch.randn(Bx, H, L, Dx, generator=generator).to(dtype=dtype, device=device)
        if requires_grad:
            t.requires_grad_(True)
        return t

    inp: Dict[str, Any] = {
        "q": rnd(B, Hq, Lq, D),
        "k": rnd(B, Hkv, Lk, D),
        "v": rnd(B, Hkv, Lk, D),
        "prefix_k": rnd(G, Hkv, P, D),
        "prefix_v": rnd(G, Hkv, P, D),
    }
    pi = make_prefix_index(B, G, mixed_index)
    inp["prefix_index"] = None if pi is None else pi.to(dtype=index_dtype, device=device)
    if padding is None:
        inp["kv_mask"] = None
        inp["lengths"] = None
    else:
        lengths = make_lengths(B, Lk, generator)
        inp["kv_mask"] = lengths_to_mask(lengths, Lk, padding).to(device)
        inp["lengths"] = lengths
    inp["prefix_mask"] = None
    if prefix_padding is not None:
        prefix_lengths = make_lengths(G, P, generator)
        if G > 1:
            prefix_lengths[G // 2] = 0  # a prefix with every key masked
        inp["prefix_mask"] = lengths_to_mask(prefix_lengths, P, prefix_padding).to(device)
    return inp


def op_args(inp: Dict[str, Any]):
    """(positional tensors, keyword args) for shared_prefix_attention."""
    args = tuple(inp[n] for n in TENSOR_ARGS)
    kwargs = {"prefix_index": inp.get("prefix_index"), "kv_mask": inp.get("kv_mask")}
    if inp.get("prefix_mask") is not None:
        kwargs["prefix_mask"] = inp["prefix_mask"]
    return args, kwargs


def run_op(inp: Dict[str, Any], **kw):
    args, kwargs = op_args(inp)
    kwargs.update(kw)
    return shared_prefix_attention(*args, **kwargs)


def describe(**kw) -> str:
    parts = []
    for key, val in kw.items():
        if isinstance(val, torch.dtype):
            val = DTYPE_NAMES.get(val, str(val))
        parts.append(f"{key}={val}")
    return ",".join(parts)


# --------------------------------------------------------------------------
# Forward + backward runners
# --------------------------------------------------------------------------


def _grads(outputs, grad_outputs, inputs):
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def forward_backward(fn, tensors, kwargs, dout, dlse, with_lse: bool, need_grads: bool = True):
    """Run ``fn(*tensors, **kwargs)``; return dict out, lse (or None) and grads."""
    res = fn(*tensors, **kwargs)
    if with_lse:
        out, lse = res
    else:
        out, lse = res, None
    result = {"out": out, "lse": lse}
    if need_grads:
        if with_lse and dlse is not None:
            outs, gouts = [out, lse], [dout.to(out.dtype), dlse.to(lse.dtype)]
        else:
            outs, gouts = [out], [dout.to(out.dtype)]
        grads = _grads(outs, gouts, list(tensors))
        for name, g in zip(TENSOR_ARGS, grads):
            result[GRAD_NAMES[name]] = g
    return result


def _clones(inp, dtype, requires_grad=True):
    out = []
    for n in TENSOR_ARGS:
        t = inp[n].detach().clone().to(dtype)
        if requires_grad:
            t.requires_grad_(True)
        out.append(t)
    return out


def _reference_fn(compute_dtype):
    def fn(q, k, v, pk, pv, *, prefix_index, kv_mask, causal, scale, prefix_mask=None):
        out, lse = reference_attention(
            q, k, v, pk, pv, prefix_index=prefix_index, kv_mask=kv_mask,
            causal=causal, scale=scale, compute_dtype=compute_dtype, prefix_mask=prefix_mask,
        )
        return out, lse

    return fn


def run_truth(inp, *, causal, scale, dout, dlse, with_lse, need_grads=True):
    """reference_attention in float64 on float64 copies of the inputs."""
    kwargs = {"prefix_index": inp.get("prefix_index"), "kv_mask": inp.get("kv_mask"),
              "prefix_mask": inp.get("prefix_mask"), "causal": causal, "scale": scale}
    tensors = _clones(inp, torch.float64)
    res = forward_backward(_reference_fn(torch.float64), tensors, kwargs,
                           dout.double(), None if dlse is None else dlse.double(),
                           with_lse=True, need_grads=False)
    if need_grads:
        outs, gouts = [res["out"]], [dout.double()]
        if with_lse and dlse is not None:
            outs.append(res["lse"])
            gouts.append(dlse.double().to(res["lse"].dtype))
        for name, g in zip(TENSOR_ARGS, _grads(outs, gouts, tensors)):
            res[GRAD_NAMES[name]] = g
    return {k: (None if v is None else v.detach().double()) for k, v in res.items()}


def run_same_dtype(inp, *, causal, scale, dout, dlse, with_lse, need_grads=True):
    """reference_attention computed in the input dtype: the error plain PyTorch makes."""
    dtype = inp["q"].dtype
    kwargs = {"prefix_index": inp.get("prefix_index"), "kv_mask": inp.get("kv_mask"),
              "prefix_mask": inp.get("prefix_mask"), "causal": causal, "scale": scale}

    def run(compute_dtype):
        tensors = _clones(inp, dtype)
        res = forward_backward(_reference_fn(compute_dtype), tensors, kwargs, dout, None,
                               with_lse=True, need_grads=False)
        if need_grads:
            outs, gouts = [res["out"]], [dout.to(res["out"].dtype)]
            if with_lse and dlse is not None:
                outs.append(res["lse"])
                gouts.append(dlse.to(res["lse"].dtype))
            for name, g in zip(TENSOR_ARGS, _grads(outs, gouts, tensors)):
                res[GRAD_NAMES[name]] = g
        return {k: (None if v is None else v.detach().double()) for k, v in res.items()}

    try:
        return run(dtype)
    except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - depends on torch build
        # Some CPU builds lack half-precision kernels for an op the reference
        # uses (e.g. "addmm_impl_cpu_" not implemented for 'Half' on old
        # torch).  Then estimate the same-dtype error by computing in float32
        # and rounding through the dtype where a kernel would store results:
        # the inputs already are in `dtype`, and out / grads are rounded to
        # `dtype` on return.  lse stays float32, as the kernel keeps it.
        # This underestimates the plain-PyTorch error a little; the floor in
        # the tolerance rule covers the difference.
        if "not implemented" not in str(exc).lower():
            raise
        res = run(torch.float32)
        for key, val in list(res.items()):
            if val is not None and key != "lse":
                res[key] = val.to(dtype).double()
        return res


# --------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------


def _max_abs(x: torch.Tensor) -> float:
    return 0.0 if x.numel() == 0 else float(x.abs().max())


def _assert_no_nan(name, x, desc):
    assert not torch.isnan(x).any(), f"[{desc}] {name} contains NaN"


def check_quantity(name, x_op, x_same, truth, dtype, desc, finite_mask=None):
    """FlashAttention-style check of one quantity; returns (err_op, err_same, bound)."""
    assert x_op.shape == truth.shape, f"[{desc}] {name}: shape {tuple(x_op.shape)} != {tuple(truth.shape)}"
    if finite_mask is not None:
        x_op, x_same, truth = x_op[finite_mask], x_same[finite_mask], truth[finite_mask]
    err_op, err_same, bound = accuracy.measure(x_op, x_same, truth, dtype)
    assert math.isfinite(err_op) and err_op <= bound, (
        f"[{desc}] {name}: max|op - truth| = {err_op:.3e} > 2 * max|same_dtype - truth| "
        f"({err_same:.3e}) + floor ({bound - 2 * err_same:.3e}); max|truth| = {_max_abs(truth.double()):.3e}"
    )
    return err_op, err_same, bound


def assert_close_to_reference(
    inp: Dict[str, Any],
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = True,
    backend: str = "torch",
    check_grads: bool = True,
    desc: str = "",
) -> Dict[str, Any]:
    """Run the op (forward + backward with random dout / dlse) and compare to the truth.

    Returns the op's results (out, lse, dq, dk, dv, dprefix_k, dprefix_v) and
    the truth under "truth" so callers can make extra assertions.
    """
    q = inp["q"]
    dtype = q.dtype
    B, Hq, Lq, D = q.shape
    desc = desc or describe(backend=backend, dtype=dtype, causal=causal, lse=return_lse)

    tensors = [inp[n] for n in TENSOR_ARGS]
    if check_grads:
        assert all(t.requires_grad for t in tensors), "make_inputs(requires_grad=True) expected"
    kwargs = {"prefix_index": inp.get("prefix_index"), "kv_mask": inp.get("kv_mask"),
              "causal": causal, "scale": scale, "return_lse": return_lse, "backend": backend}
    if inp.get("prefix_mask") is not None:
        kwargs["prefix_mask"] = inp["prefix_mask"]

    dout = torch.randn(B, Hq, Lq, D, device=q.device).to(dtype)
    dlse = torch.randn(B, Hq, Lq, device=q.device, dtype=torch.float32) if return_lse else None

    res = forward_backward(shared_prefix_attention, tensors, kwargs, dout, dlse,
                           with_lse=return_lse, need_grads=check_grads)
    truth = run_truth(inp, causal=causal, scale=scale, dout=dout, dlse=dlse,
                      with_lse=return_lse, need_grads=check_grads)
    same = run_same_dtype(inp, causal=causal, scale=scale, dout=dout, dlse=dlse,
                          with_lse=return_lse, need_grads=check_grads)

    out = res["out"]
    assert out.dtype == dtype, f"[{desc}] out dtype {out.dtype} != q dtype {dtype}"
    assert tuple(out.shape) == (B, Hq, Lq, D), f"[{desc}] out shape {tuple(out.shape)}"
    assert out.device == q.device

    # The truth itself must be sane: no NaN anywhere.
    for key, val in truth.items():
        if val is not None:
            _assert_no_nan("reference(float64) " + key, val, desc)

    empty_rows = torch.isneginf(truth["lse"])  # rows with no visible key
    _assert_no_nan("out", out, desc)
    check_quantity("out", out, same["out"], truth["out"], dtype, desc)
    if empty_rows.any():
        assert torch.all(out.detach()[empty_rows] == 0), f"[{desc}] out is not exactly 0 on rows with no visible key"

    if return_lse:
        lse = res["lse"]
        assert lse.dtype == torch.float32, f"[{desc}] lse dtype {lse.dtype} != float32"
        assert tuple(lse.shape) == (B, Hq, Lq), f"[{desc}] lse shape {tuple(lse.shape)}"
        _assert_no_nan("lse", lse, desc)
        lse_d = lse.detach()
        assert torch.equal(torch.isneginf(lse_d), empty_rows), (
            f"[{desc}] lse: -inf pattern differs from the truth "
            f"(op -inf rows: {int(torch.isneginf(lse_d).sum())}, truth: {int(empty_rows.sum())})"
        )
        assert not torch.isposinf(lse_d).any(), f"[{desc}] lse contains +inf"
        # lse is float32 whatever the input dtype: its floor uses eps(float32).
        check_quantity("lse", lse_d, same["lse"], truth["lse"], torch.float32, desc,
                       finite_mask=~empty_rows)

    if check_grads:
        for name in TENSOR_ARGS:
            gname = GRAD_NAMES[name]
            g = res[gname]
            assert g.shape == inp[name].shape, f"[{desc}] {gname} shape"
            _assert_no_nan(gname, g, desc)
            check_quantity(gname, g, same[gname], truth[gname], dtype, desc)
        if empty_rows.any():
            dq = res["dq"].detach()
            assert torch.all(dq[empty_rows] == 0), f"[{desc}] dq is not exactly 0 on rows with no visible key"

    res = dict(res)
    res["truth"] = truth
    res["dout"] = dout
    res["dlse"] = dlse
    return res
