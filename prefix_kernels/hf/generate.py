"""`prefix_kernels.generate`: generation that computes a shared prompt once and keeps its K/V once.

Two serving cases share a prompt across requests:
  1. many samples from one prompt (best-of-n, RL rollouts): `model.generate(prompt,
     num_return_sequences=N)` encodes the prompt N times and decodes against N copies of its cache;
  2. different requests behind one common system or few-shot prompt.
Here the shared part runs once at batch 1; its per-layer K/V become a `PrefixCache` (one copy, never
expanded), and `model.generate` continues from it on the full sequences, so it returns exactly what
`model.generate` returns for them. Every decode step's attention reads the shared K/V once for the
batch (on CUDA through the decode kernels).
"""

from __future__ import annotations

from typing import Optional

import torch

from transformers.cache_utils import DynamicCache

from . import compat
from .cache import PrefixCache
from .models import peft_type, transformers_model
from .patch import apply_prefix_kernels, cache_key


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _setting(model, generate_kwargs: dict, name: str):
    """A generation setting as model.generate resolves it: the keyword, else the generation_config
    passed in, else the model's own generation config."""
    if name in generate_kwargs:
        return generate_kwargs[name]
    config = generate_kwargs.get("generation_config")
    if config is None:
        config = getattr(model, "generation_config", None)
    return getattr(config, name, None)


def _refuse(model, generate_kwargs: dict) -> None:
    """Raise for what this path cannot return as model.generate would."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"model: a PEFT {peft_type(peft_config)} model; its virtual tokens would be lost behind the shared "
            "prompt's cache. Call its own generate() (patched by apply_prefix_kernels) on the full inputs")
    if "past_key_values" in generate_kwargs or "cache" in generate_kwargs:
        raise ValueError("generate_kwargs: a cache cannot be passed; the shared prefix's cache is built here")
    if _setting(model, generate_kwargs, "use_cache") is False:
        raise ValueError("use_cache=False: this path keeps the shared prompt in the cache; call model.generate")
    if _setting(model, generate_kwargs, "output_attentions"):
        raise ValueError("output_attentions=True: the shared prompt's attention runs once, outside generate, and "
                         "its weights would be missing from the first step's; call model.generate")


def _prepend_shared_hidden_states(result, shared_hidden: tuple) -> None:
    """The first step's hidden states as model.generate returns them: the shared prompt's positions
    (computed once, at batch 1) before the positions fed at that step, per layer."""
    hidden = getattr(result, "hidden_states", None)
    if not hidden:
        return
    first = tuple(torch.cat([h_shared.expand(h.shape[0], -1, -1), h], dim=1)
                  for h_shared, h in zip(shared_hidden, hidden[0]))
    result.hidden_states = (first, *hidden[1:])


def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             shared_prefix: Optional[torch.Tensor] = None, num_return_sequences: Optional[int] = None,
             **generate_kwargs):
    """Generate with a prompt shared by every sequence, computed once.

    Args:
        model: a transformers causal LM; it is switched to "prefix_kernels" attention
            (`apply_prefix_kernels(model)`), which gives the same outputs as SDPA/eager.
        input_ids: with `shared_prefix`: (B, L) each request's own tokens that follow the shared
            prefix (left-padded, with `attention_mask`). Without it: one prompt (1, L), whose
            first L - 1 tokens are shared by all `num_return_sequences` samples.
        attention_mask: (B, L) for `input_ids` (1 = token, 0 = padding); None: no padding.
        shared_prefix: (1, S) or (S,) token ids that every request starts with (no padding).
        num_return_sequences, **generate_kwargs: as for `model.generate` (sampling, beams, a
            generation_config, ...); None takes the generation config's.

    Returns:
        what ``model.generate(cat(shared_prefix, input_ids), ...)`` returns: full sequences (shared
        prefix + own tokens + new tokens), or a generate output object if asked for one (the first
        step's hidden states cover the shared prompt too).

    Raises ValueError for what this path cannot return as model.generate would: a PEFT
    prompt-learning model (call its own generate()), use_cache=False, output_attentions=True, a
    cache passed in.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, L) tensor of token ids, got {getattr(input_ids, 'shape', input_ids)}")
    if shared_prefix is None:
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids: without shared_prefix, pass one prompt (1, L) to sample from, got batch {input_ids.shape[0]}; "
                "for a batch behind a common prompt, pass that prompt as shared_prefix"
            )
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask: a single prompt to sample from must not be padded")
        shared_prefix, input_ids = input_ids[:, :-1], input_ids[:, -1:]
        attention_mask = None
    else:
        if not isinstance(shared_prefix, torch.Tensor):
            raise TypeError(f"shared_prefix must be a tensor of token ids, got {type(shared_prefix).__name__}")
        shared_prefix = shared_prefix.reshape(1, -1) if shared_prefix.dim() == 1 else shared_prefix
        if shared_prefix.dim() != 2 or shared_prefix.shape[0] != 1:
            raise ValueError(f"shared_prefix must be (1, S) or (S,) token ids, got {tuple(shared_prefix.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    _refuse(model, generate_kwargs)
    if num_return_sequences is not None:
        generate_kwargs["num_return_sequences"] = num_return_sequences

    apply_prefix_kernels(model)
    device = input_ids.device
    shared_prefix = shared_prefix.to(device)
    if input_ids.shape[1] == 0 and shared_prefix.shape[1] > 0:
        # generate() feeds the tokens past the cache at its first step: with no own token it
        # would feed the whole sequence again. The last shared token becomes everyone's own.
        shared_prefix, input_ids = shared_prefix[:, :-1], shared_prefix[:, -1:].expand(input_ids.shape[0], 1)
        attention_mask = None
    B, S = input_ids.shape[0], shared_prefix.shape[1]
    full = torch.cat([shared_prefix.expand(B, -1), input_ids], dim=1)
    own_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    mask = torch.cat([own_mask.new_ones(B, S), own_mask], dim=1)
    if S == 0:
        return model.generate(input_ids=full, attention_mask=mask, **generate_kwargs)

    hidden = bool(_setting(model, generate_kwargs, "output_hidden_states"))
    with torch.no_grad():
        # A cache of full layers: a sliding-window layer would keep only the window's last tokens
        # of the prompt, and the requests' keys would then sit at the wrong distance from it.
        prompt_cache = {compat.cache_kwarg(transformers_model(model)): DynamicCache()}
        prompt_out = model(input_ids=shared_prefix, use_cache=True, output_hidden_states=hidden, **prompt_cache)
    cache = PrefixCache.from_cache(_returned_cache(prompt_out))
    # generate() continues from a cache holding the first S tokens of `full`: it feeds only the
    # rest at the first step, with positions counted from S (the cache's length).
    cache_kwarg = {cache_key(model, {}): cache}  # "cache" from transformers 5.24, "past_key_values" before
    result = model.generate(input_ids=full, attention_mask=mask, **cache_kwarg, **generate_kwargs)
    if hidden:
        _prepend_shared_hidden_states(result, prompt_out.hidden_states)
    return result
