"""`apply_prefix_kernels` / `revert_prefix_kernels`: one table of patches, applied and undone together.

What applying does:
1. registers the attention function and mask builder under "prefix_kernels" with transformers;
2. wraps PEFT methods (table `_PEFT_PATCHES`), each of which acts only on models whose
   attention implementation is "prefix_kernels" and otherwise calls the original unchanged:
   - `PeftModel.get_prompt`: prefix tuning runs its encoder once at batch 1 and returns a
     `PrefixCache` holding each layer's prefix (1, Hkv, P, D) once, instead of B copies;
   - `PeftModel._setup_prompt_encoder`: hooks the decoder stacks (delivery.py) and lifts PEFT's
     refusal of gradient checkpointing with prefix tuning (the prefix reaches checkpointed layers
     through their kwargs);
   - `PeftModelForCausalLM.forward`: prompt tuning and P-tuning run the soft prompt once at
     batch 1 (see prompt.py);
   - `PeftModelForCausalLM.prepare_inputs_for_generation`: prefix tuning's generate() injects the
     PrefixCache once and lets beam search reorder only the per-request part;
3. with a model: switches it to "prefix_kernels" attention and hooks its decoder stacks.
Applying twice is harmless; reverting restores every wrapped method and every model changed.
"""

from __future__ import annotations

import functools

import torch

from .._core.log import log_once
from . import attention, compat, delivery, trl
from .cache import PrefixCache
from .models import PROMPT_LEARNING, peft_type, transformers_model, uses_prefix_kernels
from .prompt import checkpointing_off, dropout_in_training, shared_prompt_forward

_originals: dict = {}  # (class, name) -> original function
_changed_models: dict = {}  # id(model) -> (weakref-able model, previous attention implementation)


def warn_if_not_served(peft_model, config) -> None:
    """Once per process: PEFT prompt learning is running on a model whose attention is not
    "prefix_kernels", so the patch, although applied, does nothing for it (the prefix or prompt
    is copied per request, as in stock PEFT). The usual cause: the model was built without
    attn_implementation="prefix_kernels", or wrapped by PEFT before the patch was applied."""
    if peft_type(config) not in PROMPT_LEARNING or uses_prefix_kernels(peft_model):
        return
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    log_once(f"prefix_kernels: PEFT {peft_type(config).lower()} runs on {impl!r} attention, not 'prefix_kernels': "
             "apply_prefix_kernels() has no effect on this model and its prompt is copied per request as in stock "
             "PEFT. Build the model with attn_implementation='prefix_kernels' after apply_prefix_kernels(), or "
             "switch this one over with prefix_kernels.apply_prefix_kernels(model)")


def _wrap_get_prompt(original):
    @functools.wraps(original)
    def get_prompt(self, batch_size, task_ids=None, max_cache_len=None, **kwargs):
        config = self.active_peft_config
        warn_if_not_served(self, config)
        if (peft_type(config) == "PREFIX_TUNING" and uses_prefix_kernels(self)
                and getattr(config, "num_transformer_submodules", 1) == 1):
            from transformers.cache_utils import Cache

            compat.check_peft_prefix_layout(self)
            cache = original(self, 1, task_ids=task_ids, max_cache_len=max_cache_len, **kwargs)
            if isinstance(cache, Cache):
                delivery.install(self.get_base_model())
                return PrefixCache.from_cache(cache, length=config.num_virtual_tokens)
        return original(self, batch_size, task_ids=task_ids, max_cache_len=max_cache_len, **kwargs)

    return get_prompt


def _wrap_setup_prompt_encoder(original):
    @functools.wraps(original)
    def _setup_prompt_encoder(self, adapter_name):
        config = self.peft_config[adapter_name]
        if not uses_prefix_kernels(self):
            return original(self, adapter_name)
        # Hook the decoder stacks now, outside any compiled forward (see delivery.py).
        delivery.install(self.get_base_model())
        if peft_type(config) == "PREFIX_TUNING":
            compat.check_peft_prefix_layout(self)  # fail at get_peft_model, not at the first step
            with checkpointing_off(self.get_base_model()):
                return original(self, adapter_name)
        return original(self, adapter_name)

    return _setup_prompt_encoder


def _wrap_causal_lm_forward(original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        config = self.active_peft_config
        if peft_type(config) in ("PROMPT_TUNING", "P_TUNING") and uses_prefix_kernels(self) and not args:
            dropout = dropout_in_training(self.base_model)
            if dropout is None:
                return shared_prompt_forward(self, **kwargs)
            log_once(f"prefix_kernels: prompt tuning runs stock PEFT's forward (the soft prompt per "
                              f"request) while dropout acts in training ({dropout}): at batch 1 every request "
                              "would share one dropout mask on the prompt")
        return original(self, *args, **kwargs)

    return forward


def cache_key(base, inputs) -> str:
    """Where this transformers version puts the cache among a model's inputs ("cache" from 5.24)."""
    for key in ("cache", "past_key_values"):
        if key in inputs:
            return key
    return compat.cache_kwarg(base)


def _wrap_prepare_inputs_for_generation(original):
    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
        config = self.active_peft_config
        if peft_type(config) != "PREFIX_TUNING" or not uses_prefix_kernels(self):
            return original(self, *args, task_ids=task_ids, **kwargs)
        # PEFT <= 0.21 reads and injects `past_key_values`; transformers 5.24 calls it `cache`, so
        # stock PEFT re-injects a fresh prompt every step there. Here the PrefixCache is injected
        # once, under the key this transformers version uses, and then carried by generate
        # (with use_cache=False: injected again every step, and cache_position shifted only once).
        inputs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
        key = cache_key(self.get_base_model(), inputs)
        cache = inputs.get(key)
        first = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        batch_size = first.shape[0]
        if inputs.get("use_cache") is False:
            cache = None  # generate carries the returned cache even then: start from the prefix every step
        if not isinstance(cache, PrefixCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("prefix tuning with prefix_kernels: generate() was given a non-empty cache")
            inputs[key] = self.get_prompt(batch_size=batch_size, task_ids=task_ids)
            compat.shift_cache_position_at_prefill(inputs, config.num_virtual_tokens)  # 4.57, as stock PEFT
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch_size, config.num_virtual_tokens), mask], 1)
        compat.adjust_prompt_learning_kwargs(self, config, inputs)  # position ids as stock PEFT treats them
        return inputs

    return prepare_inputs_for_generation


_PEFT_PATCHES = (
    ("PeftModel", "get_prompt", _wrap_get_prompt),
    ("PeftModel", "_setup_prompt_encoder", _wrap_setup_prompt_encoder),
    ("PeftModelForCausalLM", "forward", _wrap_causal_lm_forward),
    ("PeftModelForCausalLM", "prepare_inputs_for_generation", _wrap_prepare_inputs_for_generation),
)


def _patch_peft() -> None:
    try:
        import peft.peft_model as peft_model
    except ImportError:
        return  # PEFT is optional: plain models and PrefixCache work without it
    for class_name, name, wrap in _PEFT_PATCHES:
        cls = getattr(peft_model, class_name)
        if (cls, name) not in _originals:
            _originals[(cls, name)] = cls.__dict__[name]
            setattr(cls, name, wrap(_originals[(cls, name)]))


def _unpatch_peft() -> None:
    for (cls, name), original in _originals.items():
        setattr(cls, name, original)
    _originals.clear()


def apply_prefix_kernels(model=None):
    """Route transformers attention for prefix-tuning, P-tuning v2, prompt-tuning and P-tuning
    through the shared-prefix kernels.

    Call once before building the model (then build it with ``attn_implementation="prefix_kernels"``),
    or pass an existing transformers model or PeftModel to switch it over. Idempotent. Returns `model`.
    """
    attention.register()
    _patch_peft()
    trl.patch_trl()
    if model is None:
        return None
    base = transformers_model(model)
    previous = getattr(base.config, "_attn_implementation", None)
    if previous != attention.NAME:
        base.set_attn_implementation(attention.NAME)
        _changed_models[id(base)] = (base, previous)
    delivery.install(base)
    return model


def revert_prefix_kernels() -> None:
    """Undo `apply_prefix_kernels`: PEFT's methods are restored, decoder-stack hooks removed, and
    models switched by `apply_prefix_kernels(model)` get their previous attention back. (A model
    built with ``attn_implementation="prefix_kernels"`` keeps it; with the PEFT patches gone it
    then sees PEFT's own per-request prefix as ordinary keys, which gives the stock results.)"""
    _unpatch_peft()
    trl.unpatch_trl()
    for model in delivery.prepared_models():
        delivery.uninstall(model)
    for base, previous in list(_changed_models.values()):
        if previous is not None:
            base.set_attn_implementation(previous)
    _changed_models.clear()
