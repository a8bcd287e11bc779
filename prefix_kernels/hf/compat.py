"""Every place where the integration depends on the transformers or PEFT version, in one module.

Supported pairs: transformers 5.x + peft >= 0.18 (tested: 5.24.0 + 0.21.2) and
transformers 4.57 + peft >= 0.17 (tested: 4.57.6 + 0.17.1, CI lane `.ci/hf457.sh`). peft 0.17
cannot be imported on transformers 5.x (it imports `HybridCache`, removed in 5.0). Prefix tuning
of Gemma2/Gemma3 needs peft >= 0.20 on either (see `check_peft_prefix_layout`).

What differs, and where it is handled:

| what                                  | 4.57 / peft 0.17                       | 5.x / peft 0.21                     | handled in                         |
|---------------------------------------|----------------------------------------|-------------------------------------|------------------------------------|
| the model's cache argument            | `past_key_values`                      | `cache` (5.24; old name deprecated) | `cache_kwarg`                      |
| prompt pass caches in training        | Gemma2/Gemma3 create no cache in train | created                             | prompt.py passes its own           |
| mask builder kwargs                   | `cache_position`                       | `q_length`, `q_offset`              | attention.mask_forward (**kwargs)  |
| `Cache.crop(n)`, n > 0                | absolute length (input ids, no prefix) | negative only (5.15+)               | cache.PrefixLayer.crop             |
| GPT-2 `scaling`, top-level kwargs     | `scaling=None`; kwargs dropped         | set; passed                         | attention._scale; delivery (hook)  |
| GC layers drop the cache              | `GradientCheckpointingLayer.__call__`  | `forward_with_checkpointing`        | delivery (prefix rides the kwargs) |
| gradient checkpointing default        | `use_reentrant=True`                   | `use_reentrant=False`               | `force_non_reentrant_checkpointing` |
| OPT attention mask                    | 4-D additive float (own builder)       | 2-D bool from our mask builder      | `padding_from_additive_mask`       |
| PEFT prompt-learning position ids     | dropped (all methods)                  | prefix tuning: + P; others dropped  | `adjust_prompt_learning_kwargs`    |
| generate's `cache_position`           | created; PEFT shifts it by P at prefill| not created (5.x)                   | `shift_cache_position_at_prefill`  |
| PEFT prefix size with `head_dim`      | peft < 0.18: hidden / heads (wrong for Qwen3) | `config.head_dim`            | attention (clear error)            |
| PEFT Gemma2/Gemma3 prefix cache       | peft < 0.20: layers' keys/values mixed | fixed                               | `check_peft_prefix_layout` (error) |
| `from_config(dtype=)`                 | accepted (4.56+; `torch_dtype` deprecated) | accepted                        | nothing to do                      |
"""

from __future__ import annotations

import functools
import logging
import warnings
import weakref

import torch

from .._core.log import log_once
from .._core.masks import visible_keys


def _version(module_name: str) -> tuple:
    try:
        from importlib.metadata import version

        from packaging.version import Version

        return Version(version(module_name)).release
    except Exception:  # not installed: callers only ask when the package is in use
        return ()


def cache_kwarg(model) -> str:
    """The name of a model's cache argument: `cache` from transformers 5.24, `past_key_values` before
    (5.24 still accepts the old name, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ------------------------------------------------------------------ gradient checkpointing


def force_non_reentrant_checkpointing(stack) -> None:
    """Switch the decoder layers of `stack` to non-reentrant checkpointing.

    transformers 4.57 enables gradient checkpointing with `use_reentrant=True` by default (5.x:
    False). Reentrant checkpointing runs each layer's recomputation as its own backward pass, and
    with a shared prefix every layer's pass reaches the one prefix-encoder graph: the second layer
    fails with "Trying to backward through the graph a second time". Non-reentrant checkpointing
    computes the same gradients (a user's explicit use_reentrant=True is overridden as well, with a
    log line, since it cannot work here). A checkpoint function that is not a functools.partial
    (a user's own) is left alone. The function replaced is kept on the module, and
    `restore_checkpointing` puts it back (revert_prefix_kernels)."""
    for module in stack.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if not getattr(module, "gradient_checkpointing", False) or not isinstance(func, functools.partial):
            continue
        if func.keywords.get("use_reentrant") is False:
            continue  # already non-reentrant (missing or None: torch's checkpoint runs reentrant)
        replacement = functools.partial(func.func, *func.args, **{**func.keywords, "use_reentrant": False})
        module._gradient_checkpointing_func = replacement
        module._prefix_kernels_replaced_checkpointing = (func, replacement)
        log_once("prefix_kernels: gradient checkpointing switched to use_reentrant=False (reentrant checkpointing would "
                  "backpropagate through the shared prefix once per layer)", logging.INFO)


def restore_checkpointing(model) -> None:
    """Undo `force_non_reentrant_checkpointing` in `model`, where its function is still the one set
    (checkpointing enabled again since, with whatever kwargs, is the user's and stays)."""
    for module in model.modules():
        replaced = vars(module).pop("_prefix_kernels_replaced_checkpointing", None)
        if replaced is not None and getattr(module, "_gradient_checkpointing_func", None) is replaced[1]:
            module._gradient_checkpointing_func = replaced[0]


# ------------------------------------------------------------------ OPT's 4-D additive mask (4.57)

# The last mask recognised, so the same tensor handed to every layer is checked once per forward.
_last_additive: tuple = (None, -1, None, None)


def padding_from_additive_mask(mask: torch.Tensor, P: int, Lq: int, Lk: int, causal: bool):
    """(B, P + Lk) bool padding mask equivalent to a 4-D additive float mask, or None.

    OPT on transformers 4.57 (and 5.0) does not call the mask builder: `OPTDecoder._update_causal_mask`
    builds a (B, 1, Lq, P + Lk) additive mask (0 where allowed, finfo.min elsewhere) for any attention
    name that is not sdpa/flash/flex. When that mask is exactly causal + padding with the prefix
    visible, its last query row is the padding row, and the kernel can take it. The mask is rebuilt
    from that row and compared exactly; anything else (a bias, another pattern) returns None and the
    attention falls back to eager, so the answer is never different."""
    global _last_additive
    ref, version, key, result = _last_additive
    key_now = (P, Lq, Lk, causal)
    if torch.compiler.is_compiling():
        return None  # the exact check needs the values: compiled graphs take the eager fallback
    if ref is not None and ref() is mask and version == mask._version and key == key_now:
        return result
    result = None
    B = mask.shape[0]
    if mask.shape[1] == 1 and mask.shape[2] == Lq and mask.shape[3] == P + Lk:
        row = mask[:, 0, -1, :] == 0  # (B, P + Lk)
        allowed = torch.cat([row.new_ones(B, 1, Lq, P), visible_keys(B, Lq, Lk, row[:, P:], causal, mask.device)], -1)
        expected = torch.zeros_like(mask).masked_fill(~allowed, torch.finfo(mask.dtype).min)
        if torch.equal(expected, mask):  # one device sync per distinct mask
            result = row
    _last_additive = (weakref.ref(mask), mask._version, key_now, result)
    return result


# ------------------------------------------------------------------ PEFT prompt learning


def adjust_prompt_learning_kwargs(peft_model, config, kwargs: dict) -> None:
    """Position ids (and token type ids) as stock PEFT treats them, in place.

    peft >= 0.20 has `PeftModel._adjust_prompt_learning_kwargs`: prefix tuning shifts position_ids
    by P (the prefix occupies positions 0..P-1), the other methods drop them. Older PEFT (0.17-0.19)
    drops position_ids and token_type_ids for every prompt-learning method, in forward and in
    prepare_inputs_for_generation, with the same warning; the model then derives positions from
    its cache length (P + past), as stock PEFT does."""
    adjust = getattr(peft_model, "_adjust_prompt_learning_kwargs", None)
    if adjust is not None:
        adjust(config, kwargs=kwargs)
        return
    if kwargs.get("position_ids") is not None:
        warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
        kwargs["position_ids"] = None
    if kwargs.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None


def shift_cache_position_at_prefill(inputs: dict, P: int) -> None:
    """At the prefill step of generate (cache_position starts at 0) add P to it, in place.

    transformers 4.57's generate creates `cache_position` (arange over the prompt) and keeps
    counting from it; models take positions and the input ids to feed from it. Stock PEFT (0.17
    and later on 4.57) adds P in place at prefill, so that the prompt sits after the prefix and
    generate's own counter continues from P + L. transformers 5.x's generate creates no
    cache_position: nothing to do."""
    cache_position = inputs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() and int(cache_position[0]) == 0:
        cache_position += P


def check_peft_prefix_layout(peft_model) -> None:
    """Refuse prefix tuning where stock PEFT builds a wrong prefix cache, rather than copy it.

    peft < 0.20 fills Gemma2/Gemma3 prefix caches with `past_key_values[0][layer_idx],
    past_key_values[1][layer_idx]` (the first two layers' tensors instead of layer i's keys and
    values): with 2 layers it mixes keys and values across layers, with more it raises IndexError.
    prefix_kernels would either reproduce that or silently compute something stock PEFT does not."""
    model_type = getattr(getattr(peft_model.get_base_model(), "config", None), "model_type", "") or ""
    if ("gemma2" in model_type or "gemma3_text" in model_type) and _version("peft") < (0, 20):
        raise NotImplementedError(
            f"prefix tuning on {model_type} with prefix_kernels needs peft >= 0.20: peft "
            f"{'.'.join(map(str, _version('peft')))} builds this model's prefix cache from the wrong layers' "
            "keys and values (fixed in peft 0.20). Upgrade peft, or revert_prefix_kernels() to run stock PEFT."
        )
