"""completion_logits: each distinct prompt runs once, its completions against it, and the logits and
every parameter's gradient equal the stock forward over the concatenated rows.

Tolerances: logits within 1e-5 (fp32; the two paths sum the same terms in another order), each
parameter's gradient within 1e-4 of that gradient's largest entry plus 1e-7 absolute (a gradient
that is exactly zero in exact arithmetic, e.g. a key bias under softmax, is rounding noise of
~1e-8 in both paths). bf16 is held to the gap between two stock implementations (eager and SDPA)
on the same batch.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

import prefix_kernels  # noqa: E402
from hf_models import build_model  # noqa: E402
from prefix_kernels import completion_logits  # noqa: E402
from prefix_kernels._core.log import forget_logged  # noqa: E402
from prefix_kernels.hf import distinct_prompts  # noqa: E402

MODELS = ["llama", "gpt2", "opt", "qwen3", "gemma", "gpt_neox"]


@pytest.fixture(autouse=True)
def patched():
    prefix_kernels.apply_prefix_kernels()
    yield
    prefix_kernels.revert_prefix_kernels()


def rows(G=3, n=4, Lp=7, Lc=5, seed=0, vocab=100):
    """G left-padded prompts (lengths Lp, 4, 1, ...), n completions each, shuffled as RL trainers
    hold them, right-padded completions of lengths 1..Lc."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (G, Lp), generator=g)
    lengths = torch.tensor([Lp, 4, 1, 6, 2][:G])
    pmask = torch.arange(Lp)[None] >= (Lp - lengths)[:, None]
    index = torch.arange(G).repeat_interleave(n)[torch.randperm(G * n, generator=g)]
    comp = torch.randint(3, vocab, (G * n, Lc), generator=g)
    clen = torch.randint(1, Lc + 1, (G * n,), generator=g)
    cmask = torch.arange(Lc)[None] < clen[:, None]
    return prompts, pmask, index, comp, cmask


def stock_logits(model, prompts, pmask, index, comp, cmask, position_ids=None):
    Lp = prompts.shape[1]
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    out = model(input_ids=torch.cat([prompts[index], comp], 1),
                attention_mask=torch.cat([pmask[index], cmask], 1).long(), **kwargs)
    return out.logits[:, Lp - 1:-1]


def loss_of(logits, cmask):
    return (logits.float() * cmask[..., None]).square().mean()


def assert_same_grads(ours, stock, rtol=1e-4, atol=1e-7):
    for (name, a), b in zip(ours.named_parameters(), stock.parameters()):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        assert a.grad is not None, f"{name}: no gradient"
        err = float((a.grad.float() - b.grad.float()).abs().max())
        assert err <= rtol * float(b.grad.float().abs().max()) + atol, f"{name}: gradient differs by {err}"


def run_both(model_type, *, ours_model=None, prompt_index=False, **build):
    stock = build_model(model_type, "eager", **build)
    ours = ours_model if ours_model is not None else build_model(model_type, "prefix_kernels", **build)
    prompts, pmask, index, comp, cmask = rows()
    expected = stock_logits(stock, prompts, pmask, index, comp, cmask)
    loss_of(expected, cmask).backward()
    if prompt_index:
        out = completion_logits(ours, prompts, comp, prompt_mask=pmask, completion_mask=cmask, prompt_index=index)
    else:
        out = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
    loss_of(out.logits, cmask).backward()
    return stock, ours, out, expected, cmask


@pytest.mark.parametrize("model_type", MODELS)
def test_logits_and_gradients_match_stock(model_type):
    stock, ours, out, expected, cmask = run_both(model_type)
    assert out.shared and out.prompts == 3
    valid = cmask[..., None].expand_as(expected)
    torch.testing.assert_close(out.logits[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert_same_grads(ours, stock)


def test_prompt_index_form_equals_row_form():
    stock, ours, out, expected, cmask = run_both("llama", prompt_index=True)
    valid = cmask[..., None].expand_as(expected)
    torch.testing.assert_close(out.logits[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert_same_grads(ours, stock)


def test_distinct_prompts_compares_ids_only_under_the_mask():
    ids = torch.tensor([[0, 5, 6], [9, 5, 6], [0, 5, 7], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]]).bool()
    unique, masks, index = distinct_prompts(ids, mask)
    assert unique.shape[0] == 3  # rows 0 and 1 differ only under padding; row 3 has another mask
    assert index[0] == index[1] and len({int(index[0]), int(index[2]), int(index[3])}) == 3
    assert torch.equal(masks[index], mask)


def test_lora_model():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(3)
    stock = peft.get_peft_model(build_model("llama", "eager"), config)
    torch.manual_seed(3)
    ours = prefix_kernels.apply_prefix_kernels(peft.get_peft_model(build_model("llama", "eager"), config))
    prompts, pmask, index, comp, cmask = rows()
    loss_of(stock_logits(stock, prompts, pmask, index, comp, cmask), cmask).backward()
    out = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
    assert out.shared
    loss_of(out.logits, cmask).backward()
    assert_same_grads(ours, stock)
    assert any("lora" in n and p.grad is not None for n, p in ours.named_parameters())


def test_gradient_checkpointing():
    ours = build_model("llama", "prefix_kernels")
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.train()
    stock, ours, out, expected, cmask = run_both("llama", ours_model=ours)
    assert out.shared
    assert_same_grads(ours, stock)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_without_grad(mode):
    ours = build_model("llama", "prefix_kernels")
    stock = build_model("llama", "eager")
    prompts, pmask, index, comp, cmask = rows()
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
        expected = stock_logits(stock, prompts, pmask, index, comp, cmask)
    valid = cmask[..., None].expand_as(expected)
    torch.testing.assert_close(out.logits[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_position_ids_are_used_as_stock_uses_them():
    ours, stock = build_model("llama", "prefix_kernels"), build_model("llama", "eager")
    prompts, pmask, index, comp, cmask = rows()
    full_mask = torch.cat([pmask[index], cmask], 1).long()
    position_ids = (full_mask.cumsum(1) - 1).clamp(min=0)  # positions that skip the left padding
    expected = stock_logits(stock, prompts, pmask, index, comp, cmask, position_ids=position_ids)
    out = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask,
                            position_ids=position_ids)
    valid = cmask[..., None].expand_as(expected)
    torch.testing.assert_close(out.logits[valid], expected[valid], rtol=1e-5, atol=1e-5)
    default = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
    assert not torch.allclose(default.logits[valid], expected[valid])  # the positions did matter
    bad = position_ids.clone()
    bad[(index == index[0]).nonzero()[1], 0] += 1  # two rows of one prompt disagree on its positions
    with pytest.raises(ValueError, match="position_ids"):
        completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask,
                          position_ids=bad)


def test_hidden_states_are_the_output_layers_input():
    ours, stock = build_model("llama", "prefix_kernels"), build_model("llama", "eager")
    prompts, pmask, index, comp, cmask = rows()
    out = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask,
                            return_hidden_states=True)
    torch.testing.assert_close(ours.lm_head(out.last_hidden_state), out.logits, rtol=1e-5, atol=1e-5)
    only = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask,
                             return_logits=False)
    assert only.logits is None
    torch.testing.assert_close(only.last_hidden_state, out.last_hidden_state, rtol=1e-5, atol=1e-5)
    Lp = prompts.shape[1]
    stock_out = stock(input_ids=torch.cat([prompts[index], comp], 1),
                      attention_mask=torch.cat([pmask[index], cmask], 1).long(), output_hidden_states=True)
    valid = cmask[..., None].expand_as(out.last_hidden_state)
    torch.testing.assert_close(out.last_hidden_state[valid], stock_out.hidden_states[-1][:, Lp - 1:-1][valid],
                               rtol=1e-5, atol=1e-5)


def test_dpo_pairs_share_their_prompt():
    """DPO: chosen and rejected completions of each prompt (G = 2 per prompt)."""
    ours, stock = build_model("qwen3", "prefix_kernels"), build_model("qwen3", "eager")
    prompts, pmask, _, comp, cmask = rows(G=4, n=2)
    index = torch.arange(4).repeat(2)  # chosen rows first, then rejected rows, as DPO trainers batch them
    expected = stock_logits(stock, prompts, pmask, index, comp, cmask)
    loss_of(expected, cmask).backward()
    out = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
    assert out.prompts == 4
    loss_of(out.logits, cmask).backward()
    assert_same_grads(ours, stock)


def test_bf16_within_the_gap_between_two_stock_attentions():
    stock = build_model("llama", "eager", dtype=torch.bfloat16)
    sdpa = build_model("llama", "sdpa", dtype=torch.bfloat16)
    ours = build_model("llama", "prefix_kernels", dtype=torch.bfloat16)
    truth = build_model("llama", "eager", dtype=torch.float32)  # float64 eager: finfo.min masks overflow to NaN
    prompts, pmask, index, comp, cmask = rows()
    with torch.no_grad():
        ref = stock_logits(truth, prompts, pmask, index, comp, cmask)
        valid = cmask[..., None].expand_as(ref)
        gap = max(float((stock_logits(m, prompts, pmask, index, comp, cmask).double() - ref.double())[valid].abs().max())
                  for m in (stock, sdpa))
        out = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
    err = float((out.logits.double() - ref.double())[valid].abs().max())
    assert out.shared and err <= 2 * gap + 1e-3, (err, gap)


def test_mixture_of_experts_is_exact():
    """Routing is per token: logits and gradients are the stock ones (a router auxiliary loss,
    not computed here, would count each prompt token once instead of once per completion)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    def build(attn):
        torch.manual_seed(0)
        config = MixtralConfig(vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=128, sliding_window=None)
        return MixtralForCausalLM._from_config(config, attn_implementation=attn)

    stock, ours = build("eager"), build("prefix_kernels")
    prompts, pmask, index, comp, cmask = rows()
    expected = stock_logits(stock, prompts, pmask, index, comp, cmask)
    loss_of(expected, cmask).backward()
    out = completion_logits(ours, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
    assert out.shared
    valid = cmask[..., None].expand_as(expected)
    torch.testing.assert_close(out.logits[valid], expected[valid], rtol=1e-5, atol=1e-5)
    loss_of(out.logits, cmask).backward()
    assert_same_grads(ours, stock)


def _fallback_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "runs the stock concatenated forward" in r.getMessage()]


@pytest.mark.parametrize("why,build", [
    ("dropout", lambda: build_model("llama", "prefix_kernels", attention_dropout=0.1).train()),
    ("sliding window", lambda: build_model("mistral", "prefix_kernels", sliding_window=6)),
    ("not 'prefix_kernels'", lambda: build_model("llama", "sdpa")),
])
def test_what_cannot_be_exact_runs_stock_with_a_warning(why, build, caplog):
    forget_logged()
    model = build()
    prompts, pmask, index, comp, cmask = rows()
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        torch.manual_seed(5)
        out = completion_logits(model, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
    assert not out.shared
    said = _fallback_warnings(caplog)
    assert len(said) == 1 and why in said[0]
    torch.manual_seed(5)
    expected = stock_logits(model, prompts, pmask, index, comp, cmask)
    torch.testing.assert_close(out.logits, expected)


def test_prompts_are_held_once():
    """No (B, Hkv, Lp, D) tensor, nor the concatenated rows (B, Lp + Lc, ...), forward or backward:
    the allocation recorder of tests/test_no_copy.py over a whole training step. B = 5 completions
    of G = 2 prompts, Lp = 23 (sizes chosen as there so that such tensors are identifiable)."""
    from test_no_copy import AllocationRecorder, per_request_prefix_copies

    B, Lp, Lc, Hkv, D = 5, 23, 6, 2, 16
    model = build_model("llama", "prefix_kernels")
    prompts, pmask, _, comp, cmask = rows(G=2, n=3, Lp=Lp, Lc=Lc)
    index = torch.tensor([0, 1, 0, 1, 1])
    comp, cmask = comp[:B], cmask[:B]
    rec = AllocationRecorder()
    with rec:
        out = completion_logits(model, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
        loss_of(out.logits, cmask).backward()
    assert out.shared and rec.allocs
    assert not per_request_prefix_copies(rec.allocs, B=B, Hkv=Hkv, P=Lp, Lk=Lc, D=D)
    stock = build_model("llama", "eager")  # the detector fires on the stock concatenated rows
    rec = AllocationRecorder()
    with rec:
        loss_of(stock_logits(stock, prompts, pmask, index, comp, cmask), cmask).backward()
    assert per_request_prefix_copies(rec.allocs, B=B, Hkv=Hkv, P=Lp, Lk=Lc, D=D)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: dict(a, completion_ids=a["completion_ids"][:, :0], completion_mask=None), ValueError, "Lc = 0"),
    (lambda a: dict(a, prompt_mask=a["prompt_mask"].flip(1)), ValueError, "left-padded"),
    (lambda a: dict(a, prompt_ids=a["prompt_ids"][:3]), ValueError, "prompt_ids has 3 rows"),
    (lambda a: dict(a, prompt_ids=a["prompt_ids"].float()), TypeError, "prompt_ids must be an integer tensor"),
    (lambda a: dict(a, completion_mask=a["completion_mask"][:, :2]), ValueError, "completion_mask must have"),
    (lambda a: dict(a, prompt_index=torch.zeros(2, dtype=torch.long)), ValueError, "prompt_index must be"),
    (lambda a: dict(a, position_ids=torch.zeros(1, 3, dtype=torch.long)), ValueError, "position_ids must have"),
])
def test_bad_arguments_are_named(change, exc, match):
    model = build_model("llama", "prefix_kernels")
    prompts, pmask, index, comp, cmask = rows()
    args = dict(prompt_ids=prompts[index], completion_ids=comp, prompt_mask=pmask[index], completion_mask=cmask)
    args = change(args)
    with pytest.raises(exc, match=match):
        completion_logits(model, args.pop("prompt_ids"), args.pop("completion_ids"), **args)


def test_prompt_learning_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_model("llama", "prefix_kernels"),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prompts, pmask, index, comp, cmask = rows()
    with pytest.raises(ValueError, match="prompt_tuning"):
        completion_logits(model, prompts[index], comp, prompt_mask=pmask[index], completion_mask=cmask)
