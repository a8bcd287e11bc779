"""Malformed calls raise ValueError / TypeError whose message names the argument."""

from __future__ import annotations

import re

import pytest
import torch

from prefix_kernels import NoBackendError, shared_prefix_attention

from helpers import make_inputs, op_args

B, HQ, HKV, LQ, LK, P, D, G = 2, 4, 2, 3, 5, 6, 16, 3


def base():
    inp = make_inputs(B, HQ, HKV, LQ, LK, P, D, G, torch.float32, "cpu", padding="right",
                      requires_grad=False)
    args, kwargs = op_args(inp)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    call = dict(zip(names, args))
    call.update(kwargs)
    call.update(causal=True, scale=None, return_lse=False, backend="torch")
    return call


def invoke(call):
    call = dict(call)
    args = [call.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    return shared_prefix_attention(*args, **call)


def word(*names):
    """Regex matching any of the argument names as a whole word (prefix_k does
    not count as a match for k)."""
    return r"(?<![A-Za-z0-9_])(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z0-9_])"


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


VE, TE, EITHER = ValueError, TypeError, (ValueError, TypeError)

# (id, changes to the base call, expected exception(s), regex the message must match)
CASES = [
    # --- ndim / not a tensor
    ("q_3d", lambda c: {"q": c["q"][0]}, VE, word("q")),
    ("k_5d", lambda c: {"k": c["k"][None]}, VE, word("k")),
    ("v_3d", lambda c: {"v": c["v"][:, 0]}, VE, word("v")),
    ("prefix_k_3d", lambda c: {"prefix_k": c["prefix_k"][0]}, VE, word("prefix_k")),
    ("prefix_v_5d", lambda c: {"prefix_v": c["prefix_v"][None]}, VE, word("prefix_v")),
    ("q_not_tensor", lambda c: {"q": c["q"].tolist()}, TE, word("q")),
    # --- batch / heads / lengths / head dim mismatches
    ("k_batch", lambda c: {"k": t(B + 1, HKV, LK, D), "v": t(B + 1, HKV, LK, D)}, VE, word("q", "k")),
    ("v_batch", lambda c: {"v": t(B + 1, HKV, LK, D)}, VE, word("k", "v")),
    ("v_len", lambda c: {"v": t(B, HKV, LK + 1, D)}, VE, word("k", "v")),
    ("v_heads", lambda c: {"v": t(B, 1, LK, D)}, VE, word("k", "v")),
    ("k_head_dim", lambda c: {"k": t(B, HKV, LK, D + 16), "v": t(B, HKV, LK, D + 16)}, VE, word("q", "k")),
    ("prefix_k_head_dim", lambda c: {"prefix_k": t(G, HKV, P, 32), "prefix_v": t(G, HKV, P, 32)}, VE,
     word("q", "prefix_k")),
    ("hq_not_multiple_of_hkv", lambda c: {"q": t(B, 3, LQ, D)}, VE, word("q", "k")),
    ("hkv_gt_hq", lambda c: {"k": t(B, 8, LK, D), "v": t(B, 8, LK, D),
                             "prefix_k": t(G, 8, P, D), "prefix_v": t(G, 8, P, D)}, VE, word("q", "k")),
    ("prefix_k_heads", lambda c: {"prefix_k": t(G, 1, P, D), "prefix_v": t(G, 1, P, D)}, VE,
     word("k", "prefix_k")),
    ("prefix_v_len", lambda c: {"prefix_v": t(G, HKV, P + 1, D)}, VE, word("prefix_k", "prefix_v")),
    ("prefix_v_groups", lambda c: {"prefix_v": t(G + 1, HKV, P, D)}, VE, word("prefix_k", "prefix_v")),
    ("no_prefix_groups", lambda c: {"prefix_k": t(0, HKV, P, D), "prefix_v": t(0, HKV, P, D),
                                    "prefix_index": None}, VE, word("prefix_k")),
    # --- prefix_index
    ("prefix_index_float", lambda c: {"prefix_index": torch.zeros(B)}, TE, word("prefix_index")),
    ("prefix_index_long_shape", lambda c: {"prefix_index": torch.zeros(B + 1, dtype=torch.long)}, VE,
     word("prefix_index")),
    ("prefix_index_2d", lambda c: {"prefix_index": torch.zeros(B, 1, dtype=torch.long)}, VE,
     word("prefix_index")),
    ("prefix_index_eq_G", lambda c: {"prefix_index": torch.tensor([0, G])}, VE, word("prefix_index")),
    ("prefix_index_negative", lambda c: {"prefix_index": torch.tensor([-1, 0], dtype=torch.int32)}, VE,
     word("prefix_index")),
    ("prefix_index_out_of_range_G1", lambda c: {"prefix_k": c["prefix_k"][:1], "prefix_v": c["prefix_v"][:1],
                                                "prefix_index": torch.tensor([0, 1])}, VE, word("prefix_index")),
    ("prefix_index_list", lambda c: {"prefix_index": [0, 1]}, EITHER, word("prefix_index")),
    # --- kv_mask
    ("kv_mask_shape", lambda c: {"kv_mask": torch.ones(B, LK + 1, dtype=torch.bool)}, VE, word("kv_mask")),
    ("kv_mask_1d", lambda c: {"kv_mask": torch.ones(LK, dtype=torch.bool)}, VE, word("kv_mask")),
    ("kv_mask_int", lambda c: {"kv_mask": torch.ones(B, LK, dtype=torch.int64)}, EITHER, word("kv_mask")),
    ("kv_mask_float", lambda c: {"kv_mask": torch.ones(B, LK)}, EITHER, word("kv_mask")),
    # --- devices (meta provokes a mismatch on a CPU-only machine)
    ("k_meta", lambda c: {"k": c["k"].to("meta")}, EITHER, word("k")),
    ("prefix_v_meta", lambda c: {"prefix_v": c["prefix_v"].to("meta")}, EITHER, word("prefix_v")),
    ("prefix_index_meta", lambda c: {"prefix_index": c["prefix_index"].to("meta")}, EITHER,
     word("prefix_index")),
    ("kv_mask_meta", lambda c: {"kv_mask": c["kv_mask"].to("meta")}, EITHER, word("kv_mask")),
    # --- dtypes
    ("q_float64", lambda c: {k: c[k].double() for k in ("q", "k", "v", "prefix_k", "prefix_v")}, TE,
     word("q")),
    ("q_int", lambda c: {"q": c["q"].long()}, TE, word("q")),
    ("v_float64", lambda c: {"v": c["v"].double()}, TE, word("v")),
    ("prefix_k_int", lambda c: {"prefix_k": c["prefix_k"].int()}, TE, word("prefix_k")),
    ("prefix_v_fp16_mixed", lambda c: {"prefix_v": c["prefix_v"].half()}, EITHER, word("prefix_v")),
    # --- head dim out of [16, 256]
    ("head_dim_8", lambda c: {"q": t(B, HQ, LQ, 8), "k": t(B, HKV, LK, 8), "v": t(B, HKV, LK, 8),
                              "prefix_k": t(G, HKV, P, 8), "prefix_v": t(G, HKV, P, 8)}, VE,
     word("q", "D", "head") + "|head dim"),
    ("head_dim_512", lambda c: {"q": t(B, HQ, LQ, 512), "k": t(B, HKV, LK, 512), "v": t(B, HKV, LK, 512),
                                "prefix_k": t(G, HKV, P, 512), "prefix_v": t(G, HKV, P, 512)}, VE,
     word("q", "D", "head") + "|head dim"),
    # --- scale / backend
    ("scale_str", lambda c: {"scale": "0.5"}, TE, word("scale")),
    ("scale_nan", lambda c: {"scale": float("nan")}, VE, word("scale")),
    ("scale_inf", lambda c: {"scale": float("inf")}, VE, word("scale")),
    ("scale_int_past_float", lambda c: {"scale": 10**400}, VE, word("scale")),  # float() overflows
    ("backend_unknown", lambda c: {"backend": "cudnn"}, VE, word("backend")),
    ("backend_not_str", lambda c: {"backend": 1}, EITHER, word("backend")),
    ("causal_str", lambda c: {"causal": "false"}, TE, word("causal")),  # bool("false") is True
    ("causal_none", lambda c: {"causal": None}, TE, word("causal")),
    # --- likely mistakes named with their fix
    ("several_prefixes_without_index", lambda c: {"prefix_index": None}, VE,
     r"G=3 prefixes but prefix_index is None: pass prefix_index"),
    ("qkv_in_transformers_layout", lambda c: {"q": c["q"].transpose(1, 2), "k": c["k"].transpose(1, 2),
                                              "v": c["v"].transpose(1, 2)}, VE,
     r"\(B, L, H, D\) layout.*q\.transpose\(1, 2\), k\.transpose\(1, 2\), v\.transpose\(1, 2\)"),
]


@pytest.mark.parametrize("change,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_call(change, exc, pattern):
    call = base()
    call.update(change(call))
    with pytest.raises(exc, match=pattern):
        invoke(call)


def test_enough_cases():
    assert len(CASES) >= 20


def test_layout_hint_only_where_the_transposed_reading_fits():
    """A shape error that the (B, L, H, D) reading does not explain keeps blaming the shape."""
    call = base()
    call.update(q=call["q"].transpose(1, 2))  # q alone transposed: k, v as given, so no layout story
    with pytest.raises(ValueError) as info:
        invoke(call)
    assert "transpose" not in str(info.value)


def test_one_prefix_needs_no_index():
    call = base()
    call.update(prefix_k=call["prefix_k"][:1], prefix_v=call["prefix_v"][:1], prefix_index=None)
    assert invoke(call).shape == (B, HQ, LQ, D)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_base_call_is_valid(backend):
    # The table above is only meaningful if the unmodified call works.
    call = base()
    call["backend"] = backend
    out = invoke(call)
    assert out.shape == (B, HQ, LQ, D)


def test_no_backend_error_triton_bf16_on_cpu():
    assert issubclass(NoBackendError, ValueError)
    call = base()
    for name in ("q", "k", "v", "prefix_k", "prefix_v"):
        call[name] = call[name].bfloat16()
    call["backend"] = "triton"
    with pytest.raises(NoBackendError) as info:
        invoke(call)
    msg = str(info.value)
    assert "triton" in msg
    assert re.search(r"bfloat16|bf16", msg), msg
    # "auto" on CPU falls to the torch backend, which handles bf16.
    call["backend"] = "auto"
    assert invoke(call).dtype == torch.bfloat16


@pytest.mark.parametrize("triton_version, numpy_version, clash", [
    ("3.6.0", "2.4.6", True),  # checked: every looped kernel raises TypeError in the interpreter
    ("3.6.0", "2.2.6", False),  # checked: the triton tests pass (with deprecation warnings)
    ("3.6.0", "2.3.5", False),  # numpy 2.3 still only warns
    ("3.8.1", "2.4.0", True),  # not checked, so declined
    ("3.9.0", "2.4.6", False),  # CI's pair
    ("3.10.0+git1234", "3.0.0rc1", False),
])
def test_interpreter_numpy_clash(triton_version, numpy_version, clash):
    from prefix_kernels.backends.triton import interpreter_numpy_clash

    reason = interpreter_numpy_clash(triton_version, numpy_version)
    assert (reason is not None) == clash
    if clash:
        assert triton_version in reason and numpy_version in reason and "triton >= 3.9" in reason


def test_interpreter_numpy_clash_declines_triton_on_cpu(monkeypatch):
    from prefix_kernels.backends import registry, triton

    monkeypatch.setattr(triton, "interpreted", lambda: True)
    monkeypatch.setattr(triton, "installed_interpreter_clash", lambda: "the interpreter clashes")
    registry.forget_plans()
    call = base()
    call["backend"] = "triton"
    with pytest.raises(NoBackendError, match="the interpreter clashes"):
        invoke(call)
    call["backend"] = "auto"  # falls to the torch backend
    assert invoke(call).shape == (B, HQ, LQ, D)


def test_no_backend_error_is_catchable_as_value_error():
    call = base()
    for name in ("q", "k", "v", "prefix_k", "prefix_v"):
        call[name] = call[name].bfloat16()
    call["backend"] = "triton"
    with pytest.raises(ValueError):
        invoke(call)


def test_prefix_index_checked_again_after_in_place_change():
    # A validated prefix_index mutated in place must be validated again.
    call = base()
    invoke(call)
    call["prefix_index"][0] = G
    with pytest.raises(ValueError, match=word("prefix_index")):
        invoke(call)


def test_prefix_index_written_behind_the_version_counter():
    # Writes through .numpy() (or .data) do not bump ._version: a CPU index is checked every call.
    call = base()
    invoke(call)
    call["prefix_index"].numpy()[0] = G
    with pytest.raises(ValueError, match=word("prefix_index")):
        invoke(call)


@pytest.mark.parametrize("fn", ["shared_prefix_attention", "shared_prefix_decode"])
def test_prefix_index_made_in_inference_mode(fn):
    # An inference tensor has no version counter; reading it once crashed every call.
    import prefix_kernels

    call = base()
    args = [call.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    with torch.inference_mode():
        index = call["prefix_index"].clone()
        out = getattr(prefix_kernels, fn)(*args, prefix_index=index, kv_mask=call["kv_mask"], backend="torch")
        want = shared_prefix_attention(*args, prefix_index=index, kv_mask=call["kv_mask"], backend="reference")
        torch.testing.assert_close(out, want)
        bad = torch.tensor([0, G])
        with pytest.raises(ValueError, match=word("prefix_index")):
            getattr(prefix_kernels, fn)(*args, prefix_index=bad, backend="torch")


def test_backend_override_from_the_environment(monkeypatch):
    call = dict(base(), backend="auto")
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="PREFIX_KERNELS_BACKEND"):
        invoke(call)
    # "cuda" exists on the decode path only: it must not break the training op, which stays on auto.
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "cuda")
    invoke(call)
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "reference")
    monkeypatch.setattr("prefix_kernels.backends.reference.forward",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("reference ran")))
    with pytest.raises(RuntimeError, match="reference ran"):
        invoke(call)


def test_numpy_scale_is_a_float():
    import numpy as np

    call = base()
    want = invoke(dict(call, scale=0.25))
    for scale in (np.float32(0.25), np.float64(0.25)):
        assert torch.equal(invoke(dict(call, scale=scale)), want)


@pytest.mark.parametrize("fn", ["shared_prefix_attention", "shared_prefix_decode"])
def test_forward_mode_ad_is_refused(fn):
    # The custom ops have no jvp rule, and torch gave a zero tangent for them without an error.
    import torch.autograd.forward_ad as fwAD

    import prefix_kernels

    call = base()
    args = [call.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    op = getattr(prefix_kernels, fn)

    def f(q):
        return op(q, *args[1:], prefix_index=call["prefix_index"], backend="torch")

    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(f, (args[0],), (torch.ones_like(args[0]),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        f(fwAD.make_dual(args[0], torch.ones_like(args[0])))
    f(args[0])  # a plain call inside no dual level is untouched
