"""prefix_kernels.generate: a shared prompt computed once, outputs equal to model.generate."""

import pytest
import torch

pytest.importorskip("transformers")

import prefix_kernels  # noqa: E402
from hf_models import batch, build_model  # noqa: E402
from prefix_kernels.hf import PrefixCache  # noqa: E402

MODELS = ["llama", "gpt2", "qwen2"]


@pytest.fixture(autouse=True)
def patched():
    yield
    prefix_kernels.revert_prefix_kernels()


def _models(model_type):
    return build_model(model_type, "eager").eval(), build_model(model_type, "sdpa").eval()


def _shared(S=7, seed=5):
    return torch.randint(3, 100, (1, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_common_prompt_batch_matches_generate(model_type, mode):
    """A batch of left-padded requests behind one system prompt: token-identical to
    model.generate on the concatenated prompts."""
    ref_model, model = _models(model_type)
    shared = _shared()
    suffix, mask, _ = batch(3, 5, "left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    if mode == "beam":
        kw.update(num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        full = torch.cat([shared.expand(3, -1), suffix], 1)
        fmask = torch.cat([torch.ones(3, 7, dtype=torch.long), mask], 1)
        want = ref_model.generate(input_ids=full, attention_mask=fmask, **kw)
        got = prefix_kernels.generate(model, suffix, mask, shared_prefix=shared, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("model_type", MODELS)
def test_samples_from_one_prompt_match_generate(model_type):
    """N samples from one prompt, same seed: the same samples as model.generate."""
    ref_model, model = _models(model_type)
    prompt = _shared(9, seed=7)
    kw = dict(max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=4, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(11)
        want = ref_model.generate(input_ids=prompt, **kw)
        torch.manual_seed(11)
        got = prefix_kernels.generate(model, prompt, **kw)
    assert got.shape == (4, 14)
    assert torch.equal(got, want)


def test_prompt_runs_once_and_is_kept_once(monkeypatch):
    """The shared prompt runs once at batch 1; the cache holds its K/V once, (1, Hkv, S, D)."""
    _, model = _models("llama")
    shared = _shared(6)
    suffix, mask, _ = batch(4, 3, "left")
    batches, caches = [], []
    handle = model.model.register_forward_pre_hook(
        lambda m, a, k: batches.append(tuple((k.get("input_ids") if k.get("input_ids") is not None else a[0]).shape)),
        with_kwargs=True)
    original = PrefixCache.from_cache.__func__

    def spy(cls, cache, prefix_index=None):
        caches.append(original(cls, cache, prefix_index))
        return caches[-1]

    monkeypatch.setattr(PrefixCache, "from_cache", classmethod(spy))
    with torch.no_grad():
        prefix_kernels.generate(model, suffix, mask, shared_prefix=shared, max_new_tokens=3, do_sample=False,
                                pad_token_id=0, num_beams=2, num_return_sequences=2)
    handle.remove()
    assert batches[0] == (1, 6)  # the shared prompt, once, at batch 1
    assert all(b[0] == 8 for b in batches[1:])  # 4 requests x 2 beams, own tokens only
    layer = caches[0].layers[0]
    assert layer.prefix_keys.shape == (1, 2, 6, 16)
    assert layer.keys.shape[0] == 8  # the own part grew per beam; the prefix stayed (1, ...)


def test_generate_refuses_bad_arguments():
    _, model = _models("llama")
    with pytest.raises(ValueError, match="input_ids"):
        prefix_kernels.generate(model, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="shared_prefix"):
        prefix_kernels.generate(model, torch.ones(2, 3, dtype=torch.long), shared_prefix=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cache"):
        prefix_kernels.generate(model, torch.ones(1, 3, dtype=torch.long), past_key_values=None)


def _greedy_scores(**extra):
    return dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
                **extra)


def _assert_same_output(got, want):
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_num_return_sequences_from_a_generation_config():
    """Not passed as a keyword, it comes from the generation config, as in model.generate."""
    from transformers import GenerationConfig

    ref_model, model = _models("llama")
    shared, (suffix, mask, _) = _shared(), batch(2, 3, "left")
    config = GenerationConfig(max_new_tokens=4, do_sample=True, top_k=20, num_return_sequences=3, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(3)
        want = ref_model.generate(input_ids=torch.cat([shared.expand(2, -1), suffix], 1),
                                  attention_mask=torch.cat([torch.ones(2, 7, dtype=torch.long), mask], 1),
                                  generation_config=config)
        torch.manual_seed(3)
        got = prefix_kernels.generate(model, suffix, mask, shared_prefix=shared, generation_config=config)
    assert want.shape[0] == 6 and torch.equal(got, want)


@pytest.mark.parametrize("B", [1, 2])
def test_requests_without_own_tokens(B):
    """Empty own input_ids: the shared prompt alone, run once (it once ran twice: generate fed the
    whole sequence again at its first step, and the scores moved by up to 0.5)."""
    ref_model, model = _models("llama")
    shared = _shared()
    with torch.no_grad():
        want = ref_model.generate(input_ids=shared.expand(B, -1), **_greedy_scores())
        got = prefix_kernels.generate(model, torch.zeros(B, 0, dtype=torch.long), shared_prefix=shared,
                                      **_greedy_scores())
    _assert_same_output(got, want)


SLIDING_FIRST = {  # layer 0 slides over 4 keys (Gemma2's own order; Qwen2 told so)
    "gemma2": dict(sliding_window=4),
    "qwen2": dict(sliding_window=4, use_sliding_window=True, layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("model_type", sorted(SLIDING_FIRST))
def test_sliding_window_layer_shorter_than_the_prompt(model_type):
    """A first layer sliding over 4 keys behind a 7-token shared prompt: the prompt's cache must
    keep all 7 (a sliding cache layer keeps 3, and generate then re-ran 4 of them)."""
    attn = "eager" if model_type == "gemma2" else "sdpa"  # transformers has no SDPA Gemma2
    ref_model = build_model(model_type, "eager", **SLIDING_FIRST[model_type]).eval()
    model = build_model(model_type, attn, **SLIDING_FIRST[model_type]).eval()
    shared, (suffix, mask, _) = _shared(), batch(2, 5, "left")
    with torch.no_grad():
        want = ref_model.generate(input_ids=torch.cat([shared.expand(2, -1), suffix], 1),
                                  attention_mask=torch.cat([torch.ones(2, 7, dtype=torch.long), mask], 1),
                                  **_greedy_scores())
        got = prefix_kernels.generate(model, suffix, mask, shared_prefix=shared, **_greedy_scores())
    _assert_same_output(got, want)


@pytest.mark.parametrize("form", ["common_prompt", "samples"])
def test_hidden_states_cover_the_shared_prompt(form):
    ref_model, model = _models("llama")
    kw = _greedy_scores(output_hidden_states=True)
    with torch.no_grad():
        if form == "samples":
            prompt = _shared(8)
            kw.update(do_sample=True, num_return_sequences=3)
            torch.manual_seed(5)
            want = ref_model.generate(input_ids=prompt, **kw)
            torch.manual_seed(5)
            got = prefix_kernels.generate(model, prompt, **kw)
        else:
            shared, suffix = _shared(), torch.randint(3, 100, (2, 3), generator=torch.Generator().manual_seed(1))
            want = ref_model.generate(input_ids=torch.cat([shared.expand(2, -1), suffix], 1), **kw)
            got = prefix_kernels.generate(model, suffix, shared_prefix=shared, **kw)
    _assert_same_output(got, want)
    assert len(got.hidden_states) == len(want.hidden_states)
    for step_got, step_want in zip(got.hidden_states, want.hidden_states):
        for a, b in zip(step_got, step_want):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_generate_refuses_what_it_cannot_return_as_generate_would():
    from hf_models import build_peft

    _, model = _models("llama")
    own, shared = torch.ones(2, 3, dtype=torch.long), _shared()
    with pytest.raises(ValueError, match="use_cache"):
        prefix_kernels.generate(model, own, shared_prefix=shared, use_cache=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="output_attentions"):
        prefix_kernels.generate(model, own, shared_prefix=shared, output_attentions=True, max_new_tokens=2)
    # A PEFT prefix-tuning model: its virtual tokens would be lost behind the prompt's cache.
    prefix_kernels.apply_prefix_kernels()
    peft_model = build_peft("llama", "prefix_kernels", "prefix")
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        prefix_kernels.generate(peft_model, own, shared_prefix=shared, max_new_tokens=2)
