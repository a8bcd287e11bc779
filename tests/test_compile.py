"""torch.library registration: opcheck passes and torch.compile traces the op with fullgraph."""

import pytest
import torch
from torch.library import opcheck

from prefix_kernels import shared_prefix_attention


def _inputs(dtype=torch.float32, Lk=7, G=2):
    B, Hq, Hkv, Lq, P, D = 3, 4, 2, 5, 6, 32
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = mk(B, Hq, Lq, D), mk(B, Hkv, Lk, D), mk(B, Hkv, Lk, D)
    pk, pv = mk(G, Hkv, P, D), mk(G, Hkv, P, D)
    index = torch.tensor([1, 0, 1]) if G == 2 else None
    mask = torch.ones(B, Lk, dtype=torch.bool)
    mask[0, :min(3, Lk)] = False
    return q, k, v, pk, pv, index, mask


# Without dlse the torch backend's CPU path takes its fused backward, whose gradients come in
# another layout than the explicit path's: the fake must state the layout both end in.
# bf16 on the torch backend, one prefix: ATen's CPU flash kernel returns its lse laid out
# (B, Lq, Hq), which the op once returned as it was, against its fake's contiguous (B, Hq, Lq):
# inductor stopped. (triton in bf16 does not run under the interpreter: tl.dot of bf16 blocks.)
@pytest.mark.parametrize("Lk", [7, 0])
@pytest.mark.parametrize("with_dlse", [True, False], ids=["dlse", "no_dlse"])
@pytest.mark.parametrize("backend,dtype", [("cpu_kernel", torch.float32), ("torch_split", torch.float32),
                                           ("torch_split", torch.bfloat16), ("triton", torch.float32)],
                         ids=["cpu_kernel", "torch_split", "torch_split-bf16", "triton"])
def test_opcheck_fwd_and_bwd(backend, dtype, with_dlse, Lk):
    q, k, v, pk, pv, index, mask = _inputs(dtype, Lk=Lk, G=2 if dtype == torch.float32 else 1)
    scale = 0.2
    opcheck(torch.ops.prefix_kernels.fwd.default, (q, k, v, pk, pv, index, mask, True, scale, backend))
    out, lse = torch.ops.prefix_kernels.fwd(q, k, v, pk, pv, index, mask, True, scale, backend)
    dout, dlse = torch.randn_like(out), (torch.randn_like(lse) if with_dlse else None)
    args = [None if t is None else t.detach() for t in (dout, dlse, q, k, v, pk, pv)]
    args += [index, mask, out.detach(), lse.detach()]
    opcheck(torch.ops.prefix_kernels.bwd.default, (*args, True, scale, backend))


def test_compile_fullgraph_matches_eager():
    q, k, v, pk, pv, index, mask = _inputs()

    def loss(q, k, v, pk, pv, index, mask):
        out, lse = shared_prefix_attention(q, k, v, pk, pv, prefix_index=index, kv_mask=mask, return_lse=True)
        return (out * out).sum() + lse.sum()

    # aot_eager traces forward and backward through the fake implementations (what inductor
    # sees) in seconds; fullgraph=True fails on any graph break.
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    tensors = (q, k, v, pk, pv)
    got = compiled(*tensors, index, mask)
    got_grads = torch.autograd.grad(got, tensors)
    want = loss(*tensors, index, mask)
    want_grads = torch.autograd.grad(want, tensors)
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)


def test_compiled_call_checks_prefix_index_values():
    """Tracing cannot see prefix_index's values; the compiled call must still refuse [0, 7] with
    G = 2 rather than read past prefix_k (it returned NaN, and segfaulted at 10**9)."""
    q, k, v, pk, pv, index, mask = _inputs()

    def f(q, k, v, pk, pv, index):
        return shared_prefix_attention(q, k, v, pk, pv, prefix_index=index)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(q, k, v, pk, pv, index)
        with pytest.raises(ValueError, match="prefix_index"):
            compiled(q, k, v, pk, pv, torch.tensor([0, 7, 1]))


@pytest.mark.parametrize("with_prefix", [False, True], ids=["plain", "prefix_cache"])
def test_patched_model_compiles_fullgraph(with_prefix):
    """A transformers model on "prefix_kernels" attention, with and without a PrefixCache, compiles
    with fullgraph=True (aot_eager: the graphs inductor would get) and matches eager, gradients of
    the prefix included."""
    pytest.importorskip("transformers")
    import prefix_kernels
    from hf_models import batch, build_model
    from prefix_kernels.hf import PrefixCache

    prefix_kernels.apply_prefix_kernels()
    try:
        model = build_model("llama", "prefix_kernels")
        prefix_kernels.apply_prefix_kernels(model)
        ids, mask, _ = batch(3, 9, "left")
        P = 4 if with_prefix else 0
        prefix = [(torch.randn(1, 2, P, 16, requires_grad=True), torch.randn(1, 2, P, 16, requires_grad=True))
                  for _ in range(2)]
        full_mask = torch.cat([torch.ones(3, P, dtype=torch.long), mask], 1)

        def loss(ids, full_mask):
            cache = PrefixCache(prefix) if with_prefix else None
            return model(input_ids=ids, attention_mask=full_mask, past_key_values=cache).logits.square().mean()

        leaves = [t for pair in prefix for t in pair] if with_prefix else list(model.lm_head.parameters())
        want = loss(ids, full_mask)
        want_grads = torch.autograd.grad(want, leaves)
        got = torch.compile(loss, fullgraph=True, backend="aot_eager")(ids, full_mask)
        got_grads = torch.autograd.grad(got, leaves)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        prefix_kernels.revert_prefix_kernels()
