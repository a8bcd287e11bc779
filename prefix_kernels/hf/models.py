"""What the integration asks of a model: which transformers model is under a PEFT wrapper, whether
it runs on "prefix_kernels" attention, which PEFT method wraps it."""

from __future__ import annotations

from torch import nn

from . import attention, delivery

PROMPT_LEARNING = ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")


def uses_prefix_kernels(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == attention.NAME


def peft_type(config):
    return getattr(config.peft_type, "value", config.peft_type)


def transformers_model(model) -> nn.Module:
    from transformers import PreTrainedModel

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel or a PEFT model wrapping one, got {type(model).__name__}")
    if getattr(base.config, "is_encoder_decoder", False):
        raise ValueError(f"model: encoder-decoder models ({base.config.model_type}) are not supported, only decoders")
    if not delivery.decoder_stacks(base):
        raise ValueError(f"model: no decoder layers found in {type(base).__name__}; this model type is not supported")
    return base
