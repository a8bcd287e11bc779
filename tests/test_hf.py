"""transformers + PEFT integration: the patched model against stock PEFT with eager attention.

Every comparison builds the same tiny random model twice (same seeds, so the same weights and
the same prompt-encoder initialisation), once with attn_implementation="eager" (stock PEFT) and
once with "prefix_kernels", and runs the same batch. fp32 targets from the issue: loss relative
error <= 1e-5 and every trainable parameter's gradient relative error <= 1e-4.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import prefix_kernels  # noqa: E402
from hf_models import assert_matches, batch, build_model, build_peft, loss_and_grads, peft_version  # noqa: E402
from hf_models import peft_config as hf_peft_config  # noqa: E402
from prefix_kernels._core.log import forget_logged  # noqa: E402
from prefix_kernels.hf import PrefixCache  # noqa: E402
from prefix_kernels.hf import attention as hf_attention  # noqa: E402

MODELS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "opt", "gpt_neox"]
ACCELERATED = [m for m in MODELS if m != "gemma2"]  # gemma2's logit softcapping falls back to eager


# peft < 0.20 fills Gemma2's prefix cache from the wrong layers' tensors (see compat.check_peft_prefix_layout):
# prefix_kernels refuses it, and stock PEFT there is no reference to compare with.
OLD_PEFT_GEMMA2 = "peft < 0.20 builds Gemma2's prefix cache from the wrong layers; prefix_kernels refuses it"


def skip_gemma2_prefix_on_old_peft(model_type):
    if model_type == "gemma2" and peft_version() < (0, 20):
        pytest.skip(OLD_PEFT_GEMMA2)


@pytest.fixture(autouse=True)
def patched():
    warnings.filterwarnings("ignore", category=FutureWarning)
    prefix_kernels.apply_prefix_kernels()
    yield
    prefix_kernels.revert_prefix_kernels()


def compare(model_type, method="prefix", padding="left", projection=False, gc=False, B=3, L=9, P=5, **kw):
    ids, mask, labels = batch(B, L, padding)
    stock = loss_and_grads(build_peft(model_type, "eager", method, P, projection, **kw), ids, mask, labels)
    ours_model = build_peft(model_type, "prefix_kernels", method, P, projection, gradient_checkpointing=gc, **kw)
    ours = loss_and_grads(ours_model, ids, mask, labels)
    assert_matches(stock, ours)
    return ours_model, stock, ours


# ------------------------------------------------------------------ prefix tuning / P-tuning v2


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("projection", [False, True], ids=["ptuning_v2", "projection"])
def test_prefix_tuning_matches_stock(model_type, projection):
    skip_gemma2_prefix_on_old_peft(model_type)
    compare(model_type, "prefix", "left", projection)


@pytest.mark.skipif(peft_version() >= (0, 20), reason="peft >= 0.20 builds Gemma2's prefix cache correctly")
def test_gemma2_prefix_tuning_refused_on_old_peft():
    with pytest.raises(NotImplementedError, match="peft >= 0.20"):
        build_peft("gemma2", "prefix_kernels", "prefix")


@pytest.mark.parametrize("padding", ["right", None])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_prefix_tuning_paddings(model_type, padding):
    compare(model_type, "prefix", padding)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("projection", [False, True], ids=["ptuning_v2", "projection"])
def test_gradient_checkpointing_with_prefix_tuning(model_type, projection):
    """Stock PEFT refuses gradient checkpointing with prefix tuning; patched it works and matches
    stock PEFT without checkpointing. Checkpointing is enabled before get_peft_model, the case
    PEFT refuses."""
    model, _, ours = compare(model_type, "prefix", "left", projection, gc=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_reentrant_checkpointing_is_made_non_reentrant():
    """Reentrant checkpointing (transformers 4.57's default, or asked for) replays every layer's
    backward through the one shared prefix graph; the patch switches it to non-reentrant, and
    revert_prefix_kernels() gives the user's use_reentrant=True back (it stayed False)."""
    ids, mask, labels = batch()
    stock = loss_and_grads(build_peft("llama", "eager", "prefix", projection=True), ids, mask, labels)
    model = build_model("llama", "prefix_kernels")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, hf_peft_config("prefix", 5, True, model.config))
    assert_matches(stock, loss_and_grads(pm, ids, mask, labels))

    def reentrant():
        return [m._gradient_checkpointing_func.keywords["use_reentrant"] for m in model.modules()
                if getattr(m, "gradient_checkpointing", False)]

    assert reentrant() and not any(reentrant())
    prefix_kernels.revert_prefix_kernels()
    assert reentrant() and all(reentrant())


def test_stock_peft_still_refuses_checkpointing_on_models_not_patched():
    model = build_model("llama", "eager")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


# ------------------------------------------------------------------ prompt tuning / P-tuning v1


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompt_tuning_matches_stock(model_type, method):
    compare(model_type, method, "left")


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompt_tuning_right_padding_and_checkpointing(method):
    compare("llama", method, "right", gc=True)


def test_prompt_pass_runs_at_batch_one():
    """The soft prompt's P positions run once at batch 1: the decoder sees B*L + P tokens, not B*(P+L)."""
    pm = build_peft("llama", "prefix_kernels", "prompt", P=5)
    seen = []
    handle = pm.get_base_model().model.norm.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))
    ids, mask, labels = batch(4, 7)
    pm(input_ids=ids, attention_mask=mask, labels=labels)
    handle.remove()
    assert seen == [(1, 5), (4, 7)]


# ------------------------------------------------------------------ the triton backend (interpreter on CPU)


@pytest.mark.parametrize("model_type,method", [("llama", "prefix"), ("qwen3", "prefix"), ("gpt2", "prompt")])
def test_triton_backend_matches_stock(model_type, method, monkeypatch, triton_device):
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "triton")
    if triton_device != "cpu":
        pytest.skip("the GPU lane covers triton on CUDA")
    compare(model_type, method, "left", B=2, L=5, P=3)


# ------------------------------------------------------------------ no per-request copy


def test_prefix_is_never_copied_per_request():
    """Record every allocation of a patched forward + backward: none holds B copies of a layer's
    prefix (B, Hkv, P, D), and the prefix encoder ran at batch 1."""
    from test_no_copy import AllocationRecorder

    B, L, P, Hkv, D = 5, 7, 23, 2, 16
    pm = build_peft("llama", "prefix_kernels", "prefix", P=P, projection=True)
    ids, mask, labels = batch(B, L)
    rec = AllocationRecorder()
    with rec:
        out = pm(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
    per_request = B * Hkv * P * D
    bad = [(name, shape) for name, shape, numel in rec.allocs if numel and numel % per_request == 0]
    assert not bad, f"per-request prefix-sized allocations: {bad}"
    # the stock path makes exactly such copies: the detector can fail
    stock = build_peft("llama", "eager", "prefix", P=P, projection=True)
    rec = AllocationRecorder()
    with rec:
        stock(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert any(numel and numel % per_request == 0 for _, _, numel in rec.allocs)


def test_prefix_cache_leaves_prefix_alone():
    pk, pv = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    cache = PrefixCache([(pk, pv), (pk, pv)])
    cache._delivered = True
    own = torch.randn(3, 2, 5, 8)
    for i in range(2):
        k, v = cache.update(own, own + 1, i)
        assert k.shape == (3, 2, 5, 8)
    assert cache.get_seq_length() == 9
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([0, 1, 4]))
    cache.crop(-2)
    layer = cache.layers[0]
    assert layer.prefix_keys is pk and layer.prefix_values is pv
    assert layer.keys.shape == (3, 2, 3, 8) and cache.get_seq_length() == 7
    torch.testing.assert_close(layer.keys[0], own[2, :, :3])
    cache.crop(100)  # positive: an own length (older transformers); nothing to remove
    assert cache.get_seq_length() == 7
    cache.reset()
    assert cache.get_seq_length() == 4 and cache.layers[0].prefix_keys is pk


def test_prefix_of_the_wrong_head_size_is_refused():
    """A prefix whose head size is not the keys' (PEFT < 0.18 on Qwen3-like head_dim) raises, naming it."""
    model = prefix_kernels.apply_prefix_kernels(build_model("llama", "prefix_kernels"))
    ids, mask, _ = batch(2, 4)
    with pytest.raises(ValueError, match="kv heads of size 8.*2 of size 16"):
        model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1),
              past_key_values=PrefixCache([(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))] * 2))


def test_prefix_cache_refuses_unprepared_model():
    """A PrefixCache on a model whose stack was not hooked would silently drop the prefix: it raises."""
    model = build_model("llama", "prefix_kernels")
    cache = PrefixCache([(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))] * 2)
    ids, mask, _ = batch(2, 4)
    with pytest.raises(RuntimeError, match="apply_prefix_kernels"):
        model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1),
              past_key_values=cache)
    prefix_kernels.apply_prefix_kernels(model)
    model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1),
          past_key_values=PrefixCache([(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))] * 2))


def test_prefix_cache_used_on_a_prepared_model_is_still_refused_by_an_unprepared_one():
    """The check is made at every forward, not only at a cache's first use: a cache that ran on a
    prepared model and is then handed (with its own keys cropped away) to an unprepared one raises."""
    prepared = prefix_kernels.apply_prefix_kernels(build_model("llama", "prefix_kernels"))
    unprepared = build_model("llama", "prefix_kernels")
    unprepared.load_state_dict(prepared.state_dict())
    ids, mask, _ = batch(2, 4)
    full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1)
    cache = PrefixCache([(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))] * 2)
    with torch.no_grad():
        prepared(input_ids=ids, attention_mask=full_mask, past_key_values=cache)
        cache.crop(-4)
        with pytest.raises(RuntimeError, match="apply_prefix_kernels"):
            unprepared(input_ids=ids, attention_mask=full_mask, past_key_values=cache)
        cache.crop(-4)
        # and a failed forward on the prepared model does not leave the cache marked as delivered
        with pytest.raises(IndexError):  # a token id past the vocabulary: raised inside the stack
            prepared(input_ids=ids + 10**6, attention_mask=full_mask, past_key_values=cache)
        cache.reset()
        with pytest.raises(RuntimeError, match="apply_prefix_kernels"):
            unprepared(input_ids=ids, attention_mask=full_mask, past_key_values=cache)


def test_prefix_cache_with_more_entries_than_layers_is_refused():
    model = prefix_kernels.apply_prefix_kernels(build_model("llama", "prefix_kernels"))
    ids, mask, _ = batch(2, 4)
    cache = PrefixCache([(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))] * 3)
    with pytest.raises(ValueError, match="holds 3 layers.*2 decoder layers"):
        model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1),
              past_key_values=cache)


# ------------------------------------------------------------------ plain models, fallbacks, patch lifecycle


@pytest.mark.parametrize("model_type", MODELS)
def test_model_without_prefix_matches_sdpa(model_type):
    ids, mask, _ = batch(3, 9, "left")
    with torch.no_grad():
        # gemma2 has no SDPA path in transformers (softcapping): its own eager attention is the reference
        ref_attn = "eager" if model_type == "gemma2" else "sdpa"
        ref = build_model(model_type, ref_attn)(input_ids=ids, attention_mask=mask).logits
        out = build_model(model_type, "prefix_kernels")(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)


def _fallback_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_softcapping_falls_back_with_a_warning(method, caplog):
    if method == "prefix":
        skip_gemma2_prefix_on_old_peft("gemma2")
    forget_logged()
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        compare("gemma2", method)
    assert any("soft-capping" in m for m in _fallback_warnings(caplog))


def test_short_sliding_window_falls_back_and_matches(caplog):
    """Mistral with a 6-token window over 5 + 9 keys: the kernel cannot do it; eager does."""
    forget_logged()
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        compare("mistral", "prefix", sliding_window=6)
    assert any("sliding window" in m for m in _fallback_warnings(caplog))


def test_long_sliding_window_uses_the_kernel(caplog, monkeypatch):
    forget_logged()
    calls = []
    original = hf_attention.api.attention
    monkeypatch.setattr(hf_attention.api, "attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        compare("qwen2", "prefix", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert calls and not _fallback_warnings(caplog)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_opt_uses_the_kernel(method, caplog, monkeypatch):
    """OPT's mask is causal + padding: the kernel takes it (transformers 4.57 hands OPT a 4-D additive
    mask of its own making, recognised exactly; 5.x hands it our 2-D mask)."""
    forget_logged()
    calls = []
    original = hf_attention.api.attention
    monkeypatch.setattr(hf_attention.api, "attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        compare("opt", method, "left")
        compare("opt", method, "right")
    assert calls and not _fallback_warnings(caplog)


def test_attention_dropout_falls_back(caplog):
    forget_logged()
    pm = build_peft("gpt2", "prefix_kernels", "prefix", attn_pdrop=0.1)
    ids, mask, labels = batch()
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        loss_and_grads(pm, ids, mask, labels)
    assert any("dropout" in m for m in _fallback_warnings(caplog))


def test_apply_twice_and_revert():
    prefix_kernels.apply_prefix_kernels()
    prefix_kernels.apply_prefix_kernels()
    compare("llama", "prefix")
    prefix_kernels.revert_prefix_kernels()
    assert peft.PeftModel.get_prompt.__module__.startswith("peft")
    pm = build_peft("llama", "prefix_kernels", "prefix")
    ids, mask, labels = batch()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert not isinstance(getattr(out, "past_key_values", None), PrefixCache)  # stock PEFT cache again
    stock = loss_and_grads(build_peft("llama", "eager", "prefix"), ids, mask, labels)
    assert_matches(stock, loss_and_grads(pm, ids, mask, labels))


def test_apply_to_existing_peft_model_and_revert_restores_it():
    prefix_kernels.revert_prefix_kernels()
    pm = build_peft("llama", "sdpa", "prefix")
    prefix_kernels.apply_prefix_kernels(pm)
    assert pm.get_base_model().config._attn_implementation == "prefix_kernels"
    ids, mask, labels = batch()
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out.past_key_values, PrefixCache)
    prefix_kernels.revert_prefix_kernels()
    assert pm.get_base_model().config._attn_implementation == "sdpa"


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_models_not_patched_are_left_alone_with_one_warning(method, caplog):
    """With the patch applied, a PEFT model on sdpa attention runs stock PEFT exactly, and says
    once that the patch does nothing for it (a model built without attn_implementation=
    "prefix_kernels", or wrapped by PEFT before the patch, would otherwise run stock in silence)."""
    forget_logged()
    ids, mask, labels = batch()
    pm = build_peft("llama", "sdpa", method)
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        for _ in range(2):
            out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert not isinstance(out.past_key_values, PrefixCache)
    assert pm.get_base_model().config._attn_implementation == "sdpa"
    said = [r.getMessage() for r in caplog.records if "has no effect on this model" in r.getMessage()]
    assert len(said) == 1 and "'sdpa' attention" in said[0] and "apply_prefix_kernels(model)" in said[0]
    prefix_kernels.apply_prefix_kernels(pm)  # the fix it names
    forget_logged()
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        caplog.clear()
        pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_apply_refuses_what_it_cannot_serve():
    with pytest.raises(TypeError, match="model"):
        prefix_kernels.apply_prefix_kernels(torch.nn.Linear(2, 2))
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        prefix_kernels.apply_prefix_kernels(t5)
    assert t5.config._attn_implementation != "prefix_kernels"


# ------------------------------------------------------------------ dtypes and training loops


def test_bf16_model_trains_close_to_stock():
    ids, mask, labels = batch()
    stock = loss_and_grads(build_peft("llama", "eager", "prefix", dtype=torch.bfloat16), ids, mask, labels)
    ours = loss_and_grads(build_peft("llama", "prefix_kernels", "prefix", dtype=torch.bfloat16), ids, mask, labels)
    assert abs(float(stock[0]) - float(ours[0])) <= 2e-2 * abs(float(stock[0]))
    for name, g in stock[1].items():
        assert ours[1][name].dtype == torch.bfloat16
        assert float((ours[1][name].float() - g.float()).norm() / g.float().norm()) < 5e-2


def test_trainer_steps_match_stock(tmp_path):
    from transformers import Trainer, TrainingArguments

    ids, mask, labels = batch(4, 8)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(4)]
    losses = {}
    for attn in ("eager", "prefix_kernels"):
        pm = build_peft("llama", attn, "prefix", projection=True)
        args = TrainingArguments(output_dir=str(tmp_path / attn), per_device_train_batch_size=2, max_steps=3,
                                 learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                                 save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=pm, args=args, train_dataset=rows)
        trainer.train()
        losses[attn] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["eager"]) == 3
    torch.testing.assert_close(torch.tensor(losses["prefix_kernels"]), torch.tensor(losses["eager"]),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ generation with PEFT prefix tuning


def _greedy_by_full_forward(pm, ids, mask, steps, pad=0):
    """Greedy decoding by recomputing stock PEFT's forward on the whole sequence at every step, with
    generate's position convention (mask cumsum - 1; PEFT adds P): the truth for generate()."""
    eos = pm.get_base_model().generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos if eos is not None else -1])[None, :]
    seq, m = ids, mask
    done = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    for _ in range(steps):
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
        nxt = pm(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        nxt = nxt.masked_fill(done, pad)  # finished rows are padded, as generate does
        done |= (nxt == eos).any(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_prefix_tuning_greedy_generate_is_exact(model_type):
    """Patched generate (PrefixCache, one token per step) against greedy decoding by full stock
    forwards. Stock PEFT's own generate() cannot be the reference here: with transformers 5.24 and
    peft 0.21 it injects `past_key_values` while generate passes `cache`, and its logits differ
    from its own forward by ~0.5 (measured)."""
    ids, mask, _ = batch(3, 6, "left")
    with torch.no_grad():
        truth = _greedy_by_full_forward(build_peft(model_type, "eager", "prefix", projection=True).eval(), ids, mask, 6)
        pm = build_peft(model_type, "prefix_kernels", "prefix", projection=True).eval()
        got = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, truth)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_prefix_tuning_beam_search_reorders_only_own_cache(model_type):
    """Beam search with the cache (beam reorders act on the PrefixCache) equals beam search that
    recomputes everything each step (no cache, nothing to reorder), token for token."""
    ids, mask, _ = batch(3, 6, "left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=3, num_return_sequences=2)
    pm = build_peft(model_type, "prefix_kernels", "prefix", projection=True).eval()
    with torch.no_grad():
        cached = pm.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        recomputed = pm.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert cached.shape == (6, 12)
    assert torch.equal(cached, recomputed)


def test_prefix_tuning_sampling_runs():
    ids, mask, _ = batch(3, 6, "left")
    pm = build_peft("llama", "prefix_kernels", "prefix").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=10,
                          num_return_sequences=2, pad_token_id=0)
    assert out.shape == (6, 11) and torch.equal(out[::2, :6], ids)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompt_learning_generate_with_padding_matches_stock(method):
    """PEFT's own generate() for prompt tuning / P-tuning on a left-padded batch gives stock PEFT's
    tokens. (On transformers 5.24 + peft 0.21 stock hands the model a mask shorter than its keys,
    which transformers pads with False at the end; the mask builder once raised a kernel shape
    error there and now pads the same way.)"""
    ids, mask, _ = batch(2, 6, "left")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = build_peft("llama", "eager", method).eval().generate(input_ids=ids, attention_mask=mask, **kwargs)
        got = build_peft("llama", "prefix_kernels", method).eval().generate(input_ids=ids, attention_mask=mask,
                                                                            **kwargs)
    assert torch.equal(got, want)


def test_prompt_tuning_loss_comes_first():
    """model(...)[0] and return_dict=False give the loss first, as stock: the patched forward once
    set it last (a ModelOutput keeps its keys in the order they are set)."""
    ids, mask, labels = batch()
    pm = build_peft("llama", "prefix_kernels", "prompt")
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert list(out.keys())[0] == "loss" and out[0].dim() == 0
    assert pm(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)[0].dim() == 0


def test_prompt_tuning_with_dropout_runs_stock_forward(caplog):
    """OPT keeps hidden dropout 0.1 (functional, read from its layers): at batch 1 the prompt
    positions would share one dropout mask across the batch. Stock PEFT's forward runs instead,
    with a warning, and gives stock's loss for the same seed."""
    forget_logged()
    ids, mask, labels = batch()
    losses = []
    for attn in ("eager", "prefix_kernels"):
        pm = build_peft("opt", attn, "prompt", dropout=0.1).train()
        torch.manual_seed(0)
        with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
            losses.append(pm(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert any("dropout" in r.getMessage() and "prompt tuning" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)


def test_autocast_with_rope(caplog):
    """Under bf16 autocast RoPE leaves q and k in fp32 and v in bf16 (a linear's output); the
    kernel once refused the mixed dtypes. Loss and gradients as eager's under the same autocast."""
    ids, mask, labels = batch()
    results = []
    for attn in ("eager", "prefix_kernels"):
        pm = build_peft("llama", attn, "prefix")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in pm.parameters() if p.requires_grad]))
    (loss_e, grads_e), (loss_o, grads_o) = results
    torch.testing.assert_close(loss_o, loss_e, rtol=1e-3, atol=0)  # bf16 attention: ~3 digits
    for g_o, g_e in zip(grads_o, grads_e):
        assert (g_o - g_e).norm() <= 3e-2 * g_e.norm()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_output_attentions_falls_back_to_eager(method, caplog):
    """The kernels compute no attention weights: output_attentions=True takes the eager fallback
    (with the warning) and returns stock eager's weights over prefix + own keys."""
    forget_logged()
    ids, mask, labels = batch()
    stock = build_peft("llama", "eager", method)(input_ids=ids, attention_mask=mask, output_attentions=True)
    with caplog.at_level(logging.WARNING, logger="prefix_kernels"):
        ours = build_peft("llama", "prefix_kernels", method)(input_ids=ids, attention_mask=mask,
                                                           output_attentions=True)
    assert any("output_attentions" in m for m in _fallback_warnings(caplog))
    assert len(ours.attentions) == len(stock.attentions) == 2
    for a, b in zip(ours.attentions, stock.attentions):
        if method == "prompt":  # ours: the own tokens' rows over prompt + own keys (logits are (B, L, V) too)
            b = b[:, :, -a.shape[2]:]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _multi_prefix_case(G=3, P=4, L=6, B=3, seed=5):
    """A prepared Llama, its unpatched twin, per-layer prefixes (G, 2, P, 16), ids and a mask with P leading ones."""
    model = prefix_kernels.apply_prefix_kernels(build_model("llama", "eager").eval())
    ref = build_model("llama", "eager").eval()
    g = torch.Generator().manual_seed(seed)
    prefixes = [(torch.randn(G, 2, P, 16, generator=g), torch.randn(G, 2, P, 16, generator=g)) for _ in range(2)]
    ids = torch.randint(3, 100, (B, L), generator=torch.Generator().manual_seed(1))
    return model, ref, prefixes, ids, torch.ones(B, P + L, dtype=torch.long)


def _materialised(prefixes, idx):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, pair in enumerate(prefixes):
        if pair is not None:
            cache.update(pair[0][idx].clone(), pair[1][idx].clone(), i)
    return cache


def test_prefix_index_is_checked_on_the_eager_fallback_too():
    """output_attentions takes the eager fallback, which indexes the prefixes itself: a uint8 index
    must select as integers there too (it selected as a boolean mask), and -1 must raise."""
    model, ref, prefixes, ids, mask = _multi_prefix_case()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, past_key_values=_materialised(prefixes, [1, 1, 1])).logits
        for kw in ({}, {"output_attentions": True}):
            idx = torch.tensor([1, 1, 1], dtype=torch.uint8)
            got = model(input_ids=ids, attention_mask=mask, past_key_values=PrefixCache(prefixes, idx), **kw).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            with pytest.raises(ValueError, match="prefix_index"):
                model(input_ids=ids, attention_mask=mask, past_key_values=PrefixCache(prefixes, torch.tensor([0, 1, -1])),
                      **kw)


def test_layers_without_prefix_keep_positions_and_ignore_prefix_index():
    """[None, prefix] and [prefix, None] with G = 2: positions count from P whichever layer lacks a
    prefix (with layer 0 prefix-less they counted from 0, so forward and generate disagreed by
    2.4e-2 on transformers 5.24), and the index applies to the prefixed layers only (G = 2 raised)."""
    model, _, prefixes, ids, mask = _multi_prefix_case(G=2, B=2)
    idx = torch.tensor([1, 0])
    from_p = torch.arange(4, 4 + ids.shape[1])[None].expand(2, -1)  # positions P, P + 1, ...
    for layers in ([None, prefixes[1]], [prefixes[0], None]):
        assert PrefixCache(layers, idx).get_seq_length() == 4
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, past_key_values=PrefixCache(layers, idx)).logits
            want = model(input_ids=ids, attention_mask=mask, past_key_values=PrefixCache(layers, idx),
                         position_ids=from_p).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefix_cache_errors_name_what_to_do():
    model, _, prefixes, ids, mask = _multi_prefix_case()
    with pytest.raises(ValueError, match="holds 1 layers"):  # fewer entries than the model's layers
        model(input_ids=ids, attention_mask=mask, past_key_values=PrefixCache(prefixes[:1], torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match=r"repeat_interleave\(2\)"):  # beams need the index expanded
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2, pad_token_id=0,
                       past_key_values=PrefixCache(prefixes, torch.tensor([0, 1, 2])))


# ------------------------------------------------------------------ torch.compile of a PEFT training step


def _compiled_peft_step(pm, backend="eager", fullgraph=False):
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(lambda ids, mask, labels: pm(input_ids=ids, attention_mask=mask, labels=labels).loss,
                         backend=backend, fullgraph=fullgraph)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_compiled_peft_step_is_one_graph_from_the_first_call(method):
    """torch.compile(fullgraph=True) of a PEFT step, the model built as the README says (apply, then
    attn_implementation="prefix_kernels"): the first call once registered the decoder-stack hook
    inside the traced forward (a graph break: fullgraph raised 'setattr() on unsupported type').
    One layer: dynamo's tracing is most of the time."""
    ids, mask, labels = batch()
    stock = loss_and_grads(build_peft("llama", "eager", method, num_hidden_layers=1), ids, mask, labels)
    pm = build_peft("llama", "prefix_kernels", method, num_hidden_layers=1).train()
    loss = _compiled_peft_step(pm, fullgraph=True)(ids, mask, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert_matches(stock, (loss.detach(), grads))


def test_compile_survives_another_model_dying_meanwhile():
    """Dynamo once guarded on the keys of the WeakKeyDictionary of prepared models (read by every
    forward): an earlier model freed by a gc cycle while the step compiled (a long inductor
    compile does that) crashed guard building with IndexError. The backend collects as inductor
    would, deterministically."""
    import gc

    ids, mask, labels = batch()
    gc.collect()
    gc.disable()
    try:
        old = build_peft("llama", "prefix_kernels", "prefix", num_hidden_layers=1)
        old(input_ids=ids, attention_mask=mask)
        old.cycle = [old]  # garbage from here on, freed by the next gc cycle
        del old
        pm = build_peft("llama", "prefix_kernels", "prefix", num_hidden_layers=1).train()
        pm(input_ids=ids, attention_mask=mask)

        def collecting_backend(gm, example_inputs):
            gc.collect()
            return gm.forward

        loss = _compiled_peft_step(pm, backend=collecting_backend)(ids, mask, labels)
    finally:
        gc.enable()
    want = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)


def test_mask_builder_drops_a_mask_without_padding():
    """A padding mask of ones is no mask: kernels take their unmasked path (the composed
    backend's flash kernels take no mask at all); real padding is kept."""
    from prefix_kernels.hf.attention import mask_forward

    ones = torch.ones(2, 6, dtype=torch.long)
    assert mask_forward(batch_size=2, kv_length=6, attention_mask=ones) is None
    padded = ones.clone()
    padded[1, :2] = 0
    assert torch.equal(mask_forward(batch_size=2, kv_length=6, attention_mask=padded), padded)
    assert mask_forward(batch_size=2, kv_length=8, attention_mask=ones)[:, 6:].eq(0).all()  # padded with False
