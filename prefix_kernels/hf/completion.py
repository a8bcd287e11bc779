"""Shared-prompt training and scoring: each distinct prompt runs once, its completions against it.

In RL fine-tuning (GRPO, RLOO: G completions per prompt) and preference training (DPO: chosen and
rejected share a prompt) a causal decoder computes every prompt token the same way for each of
its completions: the prompt's positions see only the prompt. `completion_logits` runs each
distinct prompt but its last token once (left-padded to a common length, keeping each layer's
keys and values with autograd), then runs every row's last prompt token and completion against
those keys and values as a shared prefix (`PrefixCache`, the prompt's padding as the prefix
mask): the kernels read each prompt once for all of its completions and reduce its gradient
across them. The logits and the gradients of
every parameter are those of the stock forward over the concatenated rows.

Where that cannot be exact, the stock concatenated forward runs instead, with a one-time
warning (never a silently different result): dropout acting in training, a sliding window shorter
than prompt + completion, attention that is not causal, a model whose attention is not
"prefix_kernels" (call `prefix_kernels.apply_prefix_kernels(model)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .._core.log import log_once
from . import compat, delivery
from .cache import PrefixCache
from .models import PROMPT_LEARNING, peft_type, transformers_model, uses_prefix_kernels
from .prompt import _returned_cache, checkpointing_off, dropout_in_training


@dataclass
class CompletionOutput:
    """logits (B, Lc, V): logits[:, t] predicts completion_ids[:, t] (None when not asked for);
    last_hidden_state (B, Lc, H): the final hidden states at the same positions (after the model's
    final norm, the input of its output layer), when asked for; shared: whether the prompts ran
    once (False: the stock concatenated forward ran, see the module docstring); prompts: the
    number of distinct prompts that ran."""

    logits: Optional[torch.Tensor]
    last_hidden_state: Optional[torch.Tensor] = None
    shared: bool = True
    prompts: int = 0


def _as_mask(mask, like, name) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {tuple(like.shape)} or None, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have the shape of its ids, {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must hold 0/1 or bool values (an integer or bool tensor), got {mask.dtype}")
    return mask.to(device=like.device, dtype=torch.bool)


def _check_ids(ids, name, rows=None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = "(G, Lp) or (B, Lp)" if name == "prompt_ids" else "(B, Lc)"
        raise ValueError(f"{name} must be a 2-D integer tensor {shape}, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if rows is not None and ids.shape[0] != rows:
        raise ValueError(f"{name} has {ids.shape[0]} rows, expected {rows}")


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(unique ids (G, Lp), unique masks (G, Lp), index (B,)): rows equal in ids and mask (ids
    compared where the mask is 1) found once each, index naming each row's prompt.

    Cost: one sort of the B rows of 2 * Lp integers on their device (torch.unique(dim=0)), and one
    device sync for the number of distinct rows: small beside a forward over the prompts."""
    keys = torch.cat([prompt_ids.masked_fill(~prompt_mask, 0), prompt_mask.long()], dim=1)
    unique, index = torch.unique(keys, dim=0, return_inverse=True)
    Lp = prompt_ids.shape[1]
    return unique[:, :Lp].to(prompt_ids.dtype), unique[:, Lp:].bool(), index


def first_rows(index: torch.Tensor, G: int) -> torch.Tensor:
    """(G,) for each of the G distinct prompts that `index` names, one row that has it."""
    rows = torch.empty(G, dtype=torch.long, device=index.device)
    return rows.scatter_(0, index, torch.arange(index.numel(), device=index.device))


def _why_not_shared(model, base, Lp: int, Lc: int) -> Optional[str]:
    """Why the shared-prompt path would not be exact for this model and these lengths (None: it is)."""
    if not uses_prefix_kernels(model):
        impl = getattr(base.config, "_attn_implementation", None)
        return (f"the model's attention is {impl!r}, not 'prefix_kernels': call "
                "prefix_kernels.apply_prefix_kernels(model) first")
    dropout = dropout_in_training(base)
    if dropout is not None:
        return f"dropout acts in training ({dropout}): each copy of a prompt would draw its own mask in stock"
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    window = getattr(config, "sliding_window", None)
    used = getattr(config, "use_sliding_window", True) is not False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        used = used and any("sliding" in str(t) for t in layer_types)
    if used and isinstance(window, int) and window < Lp + Lc:
        return f"a sliding window of {window} tokens is shorter than prompt + completion ({Lp} + {Lc})"
    for module in base.modules():
        if getattr(module, "is_causal", True) is False and hasattr(module, "layer_idx"):
            return f"{type(module).__name__} attends both ways: its prompt states would see the completion"
    return None


def completion_logits(model: nn.Module, prompt_ids: torch.Tensor, completion_ids: torch.Tensor, *,
                      prompt_mask: Optional[torch.Tensor] = None, completion_mask: Optional[torch.Tensor] = None,
                      prompt_index: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                      return_logits: bool = True, return_hidden_states: bool = False) -> CompletionOutput:
    """Logits of every completion token, with each distinct prompt run once.

    Args:
        model: a transformers causal LM, or a PEFT model wrapping one (LoRA and the like), after
            ``prefix_kernels.apply_prefix_kernels(model)``. Prompt-learning PEFT models are refused.
        prompt_ids: (G, Lp) the distinct prompts with ``prompt_index`` (B,) naming each completion's
            prompt; or (B, Lp), one row per completion as RL trainers hold them, with
            ``prompt_index=None``: rows equal in ids and mask are found and each runs once (one
            sort of the rows and one device sync; see `distinct_prompts`). Left-padded.
        completion_ids: (B, Lc) completions, right-padded.
        prompt_mask: like prompt_ids, 1 on tokens, 0 on (left) padding. None: no padding.
        completion_mask: (B, Lc), 1 on tokens, 0 on (right) padding. None: no padding.
        position_ids: (B, Lp + Lc), as the stock call below would take them (rows that share a
            prompt must agree on its positions). None: the positions the model derives itself.
        return_logits: compute the logits (False: only the hidden states, for fused linear + loss).
        return_hidden_states: also return the final hidden states at the same positions.

    Returns a CompletionOutput whose ``logits`` (B, Lc, V) equal, and whose gradients with respect
    to every parameter equal, those of the stock forward over the concatenated rows::

        full = model(input_ids=cat([prompt_ids[index], completion_ids], 1),
                     attention_mask=cat([prompt_mask[index], completion_mask], 1),
                     position_ids=position_ids).logits
        full[:, Lp - 1:-1]        # logits[:, t] predicts completion_ids[:, t]

    (to rounding: the shared path sums the same terms in another order). Runs under grad mode,
    no_grad or inference_mode alike. Each distinct prompt's keys and values are held once: no
    (B, Hkv, Lp, D) tensor is made, forward or backward. With gradient checkpointing the prompt
    pass keeps its activations (it needs its cache; one pass over the distinct prompts only) and
    the completion pass is checkpointed as configured.

    Mixture-of-experts models: routing is per token, so logits and gradients are exact; a router
    auxiliary loss (not computed here) would count each prompt token once instead of once per
    completion.
    """
    base = transformers_model(model)
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_type(peft_config) in PROMPT_LEARNING:
        raise ValueError(f"model: a PEFT {peft_type(peft_config).lower()} model; its virtual tokens come before the "
                         "prompt, so the prompt is no shared prefix of its own. completion_logits takes plain models "
                         "and adapters such as LoRA")
    _check_ids(completion_ids, "completion_ids")
    B, Lc = completion_ids.shape
    if Lc == 0:
        raise ValueError("completion_ids has no tokens (Lc = 0): there is no completion token to predict")
    _check_ids(prompt_ids, "prompt_ids", rows=None if prompt_index is not None else B)
    Lp = prompt_ids.shape[1]
    if Lp == 0:
        raise ValueError("prompt_ids has no tokens (Lp = 0): the first completion token has nothing to be predicted from")
    device = completion_ids.device
    prompt_mask = _as_mask(prompt_mask, prompt_ids, "prompt_mask")
    completion_mask = _as_mask(completion_mask, completion_ids, "completion_mask")
    if prompt_index is not None:
        if not isinstance(prompt_index, torch.Tensor) or prompt_index.shape != (B,) or prompt_index.is_floating_point():
            raise ValueError(f"prompt_index must be a ({B},) integer tensor naming each completion's prompt row")
        G = prompt_ids.shape[0]
        lo, hi = int(prompt_index.min()), int(prompt_index.max())
        if lo < 0 or hi >= G:
            raise ValueError(f"prompt_index values must be in [0, {G}) (the rows of prompt_ids), got [{lo}, {hi}]")
        prompt_index = prompt_index.to(device=device, dtype=torch.long)
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompt_mask: prompts must be left-padded (their last column a token): the last prompt "
                         "token predicts the first completion token")
    if position_ids is not None and tuple(position_ids.shape) != (B, Lp + Lc):
        raise ValueError(f"position_ids must have shape (B, Lp + Lc) = ({B}, {Lp + Lc}), got {tuple(position_ids.shape)}")

    why = _why_not_shared(model, base, Lp, Lc)
    if why is not None:
        log_once(f"prefix_kernels: completion_logits runs the stock concatenated forward: {why}")
        return _stock(model, base, prompt_ids, completion_ids, prompt_mask, completion_mask, prompt_index,
                      position_ids, return_logits, return_hidden_states)

    if prompt_index is None:
        prompts, masks, prompt_index = distinct_prompts(prompt_ids, prompt_mask)
    else:
        prompts, masks = prompt_ids, prompt_mask
    G = prompts.shape[0]
    prompt_pos = None
    if position_ids is not None:
        position_ids = position_ids.to(device)
        prompt_pos = position_ids[first_rows(prompt_index, G), :Lp]
        if not torch.equal(prompt_pos[prompt_index], position_ids[:, :Lp]):
            raise ValueError("position_ids: rows that share a prompt give it different positions; its states would "
                             "differ per completion, so it cannot be shared")

    delivery.install(base)
    cache_kwarg = compat.cache_kwarg(base)
    hidden_wanted = return_hidden_states or not return_logits
    # The prompt pass: each distinct prompt but its last token, once, through the decoder stack;
    # its cache (kept with autograd) is the shared prefix. The last prompt token runs with each
    # completion, so that one pass gives every wanted position (no logits of the prompt pass to
    # join to the completions'): logits[:, t] predicts completion_ids[:, t].
    shared = Lp - 1
    prefix = None
    if shared > 0:
        prompt_kwargs = dict(input_ids=prompts[:, :shared], attention_mask=masks[:, :shared].long(), use_cache=True,
                             return_dict=True, **{cache_kwarg: DynamicCache()})
        if prompt_pos is not None:
            prompt_kwargs["position_ids"] = prompt_pos[:, :shared]
        with checkpointing_off(base):
            out = _decoder(model)(**prompt_kwargs)
        prefix = PrefixCache.from_cache(_returned_cache(out), prefix_index=prompt_index,
                                        prefix_mask=masks[:, :shared])
        del out
    kwargs = dict(input_ids=torch.cat([prompts[prompt_index][:, shared:], completion_ids[:, :-1]], 1),
                  attention_mask=torch.cat([masks[prompt_index], completion_mask[:, :-1]], 1).long(),
                  return_dict=True)
    if prefix is not None:
        kwargs.update(use_cache=True, **{cache_kwarg: prefix})
    if position_ids is not None:
        kwargs["position_ids"] = position_ids[:, shared:-1]
    if return_logits:
        out = model(**kwargs, output_hidden_states=hidden_wanted)
        logits, hidden = out.logits, (out.hidden_states[-1] if hidden_wanted else None)
    else:
        logits, hidden = None, _last_hidden(_decoder(model)(**kwargs))
    return CompletionOutput(logits, hidden, True, G)


def _decoder(model):
    """The decoder stack (no output layer) of a causal LM or of the PEFT model wrapping it; adapters
    such as LoRA live inside its modules, so they act as in the full model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def _last_hidden(out) -> torch.Tensor:
    last = getattr(out, "last_hidden_state", None)
    return last if last is not None else out.hidden_states[-1]


def _stock(model, base, prompt_ids, completion_ids, prompt_mask, completion_mask, prompt_index, position_ids,
           return_logits, return_hidden_states) -> CompletionOutput:
    """The stock forward over the concatenated rows (what the shared path equals)."""
    if prompt_index is not None:
        prompt_ids, prompt_mask = prompt_ids[prompt_index], prompt_mask[prompt_index]
    Lp = prompt_ids.shape[1]
    kwargs = dict(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                  attention_mask=torch.cat([prompt_mask, completion_mask], 1).long(), return_dict=True)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if return_logits:
        out = model(**kwargs, output_hidden_states=return_hidden_states)
        logits = out.logits[:, Lp - 1:-1]
        hidden = out.hidden_states[-1][:, Lp - 1:-1] if return_hidden_states else None
    else:
        logits, hidden = None, _last_hidden(_decoder(model)(**kwargs))[:, Lp - 1:-1]
    distinct = prompt_ids.shape[0]
    return CompletionOutput(logits, hidden, False, distinct)
