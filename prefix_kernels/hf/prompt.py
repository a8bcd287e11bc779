"""Prompt tuning and P-tuning (v1) with the soft prompt computed once per step at batch 1.

In a causal decoder the P soft-prompt positions come first and see only the prompt, so their
hidden states (and every layer's keys and values there) are the same for every request. Stock
PEFT runs them B times. Here they run once at batch 1; their per-layer K/V become the shared
prefix of the batch (a `PrefixCache`), and the requests' own tokens run after them at positions
P, P + 1, ... exactly as in the stock concatenation.

Loss parity: stock PEFT pads the labels with P x -100 and predicts each label from the position
before it, so the last virtual token predicts labels[:, 0]. That one extra term is kept: the
prompt's last logits row (the same for every request) is put in front of the own logits before
the model's own loss function runs. Logits returned are the own tokens' (B, L, V), not PEFT's
(B, P + L, V).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicCache

from . import compat, delivery
from .cache import PrefixCache


@contextmanager
def checkpointing_off(model):
    """Gradient checkpointing off for a pass (the prompt pass needs its cache, which checkpointed
    layers drop; it is P tokens at batch 1, so its activations are small)."""
    flipped = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in flipped:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flipped:
            m.gradient_checkpointing = True


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _vocab_size(model) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.vocab_size


def shared_prompt_forward(peft_model, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                          output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                          **kwargs):
    """PeftModelForCausalLM.forward for PROMPT_TUNING / P_TUNING on a model using prefix_kernels."""
    config = peft_model.active_peft_config
    base = peft_model.base_model
    P = config.num_virtual_tokens
    if inputs_embeds is None:
        inputs_embeds = peft_model.word_embeddings(input_ids)
    batch = inputs_embeds.shape[0]
    prompts = peft_model.get_prompt(batch_size=1, task_ids=task_ids).to(inputs_embeds.dtype)  # (1, P, H)

    delivery.install(base)
    cache_kwarg = compat.cache_kwarg(base)
    with checkpointing_off(base):
        # A cache of our own: some models (Gemma2/Gemma3 on transformers 4.57) create none in training.
        prompt_out = base(inputs_embeds=prompts, use_cache=True, return_dict=True, **{cache_kwarg: DynamicCache()})
    prefix = PrefixCache.from_cache(_returned_cache(prompt_out))

    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], dim=1)
    compat.adjust_prompt_learning_kwargs(peft_model, config, kwargs)  # position ids: as stock PEFT
    loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
    out = base(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, **{cache_kwarg: prefix},
        output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        **kwargs,
    )
    if labels is not None:
        first = prompt_out.logits[:, -1:, :].expand(batch, 1, -1)  # predicts labels[:, 0], as in stock PEFT
        logits = torch.cat([first, out.logits], dim=1)
        padded = torch.cat([labels.new_full((batch, 1), -100), labels.to(logits.device)], dim=1)
        loss = base.loss_function(logits=logits, labels=padded, vocab_size=_vocab_size(base), **loss_kwargs)
        # Built anew, not `out.loss = ...`: a ModelOutput keeps its keys in the order they were set,
        # and the loss must come first, as in stock (`model(...)[0]`, `return_dict=False`).
        out = type(out)(**{"loss": loss, **dict(out)})
    return out if return_dict is not False else out.to_tuple()


def dropout_in_training(model) -> str | None:
    """What dropout would act while `model` trains (None if none). With any, prompt tuning runs
    stock PEFT's forward: at batch 1 the prompt positions would share one dropout mask across the
    batch, where stock draws one per request."""
    if not model.training:
        return None
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return f"{type(module).__name__}(p={module.p})"
        # functional dropout reads a float the module keeps (OPT's layers: self.dropout = 0.1); a
        # config field alone may be unused (GPT-2's summary_first_dropout, for another head)
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                return f"{type(module).__name__}.{name}={value}"
    return None
