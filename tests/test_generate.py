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
