"""The attention function and mask builder registered under the name "prefix_kernels".

transformers calls `attention_forward(module, q, k, v, attention_mask, dropout=, scaling=, **kw)`
with (B, H, L, D) views (q is a transposed view of the projection: it is read in place, not
copied) and expects (B, L, H, D) back. The shared prefix, if any, arrives as the kwarg
`prefix_kernels_prefix` (a `SharedPrefix`, put there by the decoder-stack hook).

`mask_forward` hands the attention a (B, kv_length) bool padding mask, or None, whenever the
model's mask is plain causal plus padding, which the kernel computes itself (bottom-right causal
over the own keys, the prefix always visible). For anything else (a sliding window shorter than
the keys, packed sequences, chunked or bidirectional overlays) it returns transformers' own 4-D
mask, and the attention falls back to the model's eager attention with the prefix materialised:
a slower path, never a different answer.
"""

from __future__ import annotations

import math
import sys

import torch

from .. import api
from .._core.log import log_once
from .._core.masks import visible_keys
from .._core.problem import check_prefix_index
from . import compat

NAME = "prefix_kernels"  # no "flash" in it: transformers treats any such name as flash attention

# Keyword arguments that change what attention computes and that the kernel does not implement.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "head_mask": "a head mask",
    "alibi": "ALiBi biases",
    "position_bias": "a position bias",
}

def _warn_fallback_once(reason: str) -> None:
    log_once(f"prefix_kernels: falling back to the model's eager attention: {reason}")


def _mask_interface_fns():
    # From the submodule, not `from transformers import masking_utils`: this runs inside torch.compile's
    # trace, and torch 2.11's dynamo rejects an import whose result is not exactly a ModuleType ("Bad
    # import result"), as the top-level `transformers` (a _LazyModule) is not; torch 2.13's accepts it.
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    return sdpa_mask, causal_mask_function


def mask_forward(*, batch_size, kv_length, mask_function=None, attention_mask=None, **kwargs):
    """Mask builder: (B, kv_length) bool padding mask (None without padding) when the mask is causal + padding;
    otherwise transformers' own 4-D bool mask (B, 1, q, kv), which sends attention to the fallback."""
    sdpa_mask, causal = _mask_interface_fns()
    if mask_function is None or mask_function is causal or _same_as_causal(
        sdpa_mask, causal, mask_function, batch_size, kv_length, kwargs
    ):
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] < kv_length:
            # As transformers' prepare_padding_mask: a mask shorter than the keys is padded with
            # False at the end (stock PEFT prompt tuning's generate() makes such masks).
            attention_mask = torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]))
        mask = attention_mask[:, attention_mask.shape[-1] - kv_length:]
        # No padding at all: no mask, so that kernels take their unmasked path (the composed
        # backend's flash kernels take no mask). One device sync per forward, not per layer, as
        # transformers' own sdpa mask does; under torch.compile the mask is kept.
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return None
        return mask
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(batch_size=batch_size, kv_length=kv_length, mask_function=mask_function,
                     attention_mask=attention_mask, **kwargs)


def _same_as_causal(sdpa_mask, causal, mask_function, batch_size, kv_length, kwargs) -> bool:
    """Whether `mask_function` (a sliding window, say) allows exactly the causal pattern on this
    call's (q, kv) grid: a window longer than every key is plain causal attention."""
    kw = dict(kwargs, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    theirs = sdpa_mask(batch_size=batch_size, kv_length=kv_length, mask_function=mask_function,
                       attention_mask=None, **kw)
    ours = sdpa_mask(batch_size=batch_size, kv_length=kv_length, mask_function=causal, attention_mask=None, **kw)
    if theirs is None or ours is None:
        return theirs is None and ours is None
    return bool(torch.equal(theirs.expand_as(ours), ours)) if theirs.shape[1:] == ours.shape[1:] else False


def _scale(module, query, scaling):
    if scaling is not None:
        return float(scaling)
    # GPT-2 on transformers < 5.1 passes scaling=None and scales by its own flags.
    scale = 1.0 / math.sqrt(query.shape[-1]) if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


def _fallback_reason(module, attention_mask, dropout, kwargs):
    if attention_mask is not None and attention_mask.dim() != 2:
        return "the model's mask is not causal + padding (sliding window shorter than the keys, packed or chunked sequences)"
    if dropout and dropout > 0.0:
        return f"attention dropout ({dropout}) while training"
    if kwargs.get("output_attentions"):
        return "output_attentions=True (the kernels compute no attention weights)"
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            return f"{what} ({name}) in {type(module).__name__}"
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return f"a {attention_mask.dtype} 2-D mask"
    return None


def _check_prefix_shape(module, prefix_k, key) -> None:
    """The prefix must have the keys' heads and head size: a mismatch is a wrongly sized prefix."""
    if prefix_k.shape[1] != key.shape[1] or prefix_k.shape[3] != key.shape[3]:
        raise ValueError(
            f"{type(module).__name__} layer {getattr(module, 'layer_idx', '?')}: the shared prefix has "
            f"{prefix_k.shape[1]} kv heads of size {prefix_k.shape[3]}, but this attention's keys have "
            f"{key.shape[1]} of size {key.shape[3]}. With PEFT prefix tuning on peft < 0.18 this is PEFT sizing the "
            "prefix as hidden_size / num_attention_heads, ignoring config.head_dim: pass "
            "token_dim=num_key_value_heads * head_dim and num_attention_heads=num_key_value_heads to "
            "PrefixTuningConfig, or upgrade peft."
        )


def _check_cache_index(prefix_index, B: int, prefix_k, values: bool) -> None:
    """The PrefixCache's prefix_index against this call, on every path (the eager fallback indexes
    with it too: a uint8 index would select as a mask there, a -1 wrap around)."""
    if isinstance(prefix_index, torch.Tensor) and prefix_index.dim() == 1 and prefix_index.shape[0] not in (B, 0) \
            and B % prefix_index.shape[0] == 0:
        raise ValueError(
            f"prefix_index of the PrefixCache has {prefix_index.shape[0]} entries for a batch of {B}: with "
            f"num_beams or num_return_sequences, pass prefix_index.repeat_interleave({B // prefix_index.shape[0]}) "
            "(generate does not expand a cache that is passed in)")
    check_prefix_index(prefix_index, B, prefix_k.shape[0], prefix_k.device, values=values)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface function: q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> ((B, Lq, Hq, D), None)."""
    shared = kwargs.pop("prefix_kernels_prefix", None)
    layer_prefix = shared.for_layer(getattr(module, "layer_idx", None)) if shared is not None else None
    # a layer without prefix (None in the PrefixCache) has no prefixes to choose from
    prefix_index = shared.prefix_index if layer_prefix is not None else None
    if prefix_index is not None:
        _check_cache_index(prefix_index, query.shape[0], layer_prefix[0], values=not shared.index_checked)
    scale = _scale(module, query, scaling)
    causal = bool(getattr(module, "is_causal", True))
    if layer_prefix is not None:
        _check_prefix_shape(module, layer_prefix[0], key)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.is_floating_point():
        # OPT on transformers 4.57 builds its own 4-D additive mask: take the padding row if the
        # mask is exactly causal + padding (checked), else fall back below.
        P = 0 if layer_prefix is None else layer_prefix[0].shape[2]
        padding = compat.padding_from_additive_mask(attention_mask, P, query.shape[2], key.shape[2], causal)
        if padding is not None:
            attention_mask = padding

    reason = _fallback_reason(module, attention_mask, dropout, kwargs)
    if reason is not None:
        _warn_fallback_once(reason)
        return _eager_fallback(module, query, key, value, attention_mask, dropout, scale, causal,
                               layer_prefix, prefix_index, kwargs,
                               shared.prefix_mask if layer_prefix is not None else None)

    if not query.dtype == key.dtype == value.dtype and torch.is_autocast_enabled(query.device.type):
        # Under autocast RoPE leaves q and k in fp32 while v comes from a linear in the autocast
        # dtype; eager's matmuls would run in that dtype, and so does the kernel.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    B, Hkv, Lk, D = key.shape
    if layer_prefix is None:
        prefix_k = prefix_v = key.new_empty((1, Hkv, 0, D))
    else:
        prefix_k, prefix_v = layer_prefix
        prefix_k, prefix_v = prefix_k.to(key.dtype), prefix_v.to(value.dtype)
    kv_mask = None
    if attention_mask is not None:
        kv_mask = attention_mask[:, attention_mask.shape[-1] - Lk:]  # not [-Lk:]: Lk may be 0
    out = api.attention(
        query, key, value, prefix_k, prefix_v, prefix_index=prefix_index, kv_mask=kv_mask,
        causal=causal, scale=scale, index_checked=prefix_index is not None and shared.index_checked,
        prefix_mask=shared.prefix_mask if layer_prefix is not None else None,
    )
    return out.transpose(1, 2), None


def _eager_fallback(module, query, key, value, attention_mask, dropout, scale, causal, layer_prefix,
                    prefix_index, kwargs, prefix_mask=None):
    """The model's own eager attention on the prefix materialised per request (what stock PEFT
    runs), with a mask covering prefix + own keys."""
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    P = 0
    if layer_prefix is not None:
        pk, pv = layer_prefix
        P = pk.shape[2]
        # long: a uint8 index would select as a boolean mask (checked in attention_forward)
        idx = prefix_index.long() if prefix_index is not None else torch.zeros(B, dtype=torch.long, device=key.device)
        key = torch.cat([pk.to(key.dtype)[idx], key], dim=2)
        value = torch.cat([pv.to(value.dtype)[idx], value], dim=2)

    if attention_mask is None or attention_mask.dim() == 2:
        own = None if attention_mask is None else attention_mask[:, attention_mask.shape[-1] - Lk:].bool()
        allowed = visible_keys(B, Lq, Lk, own, causal, query.device)
        seen = allowed.new_ones(B, 1, Lq, P) if prefix_mask is None else prefix_mask[idx][:, None, None, :].expand(
            B, 1, Lq, P)
        allowed = torch.cat([seen, allowed], dim=-1)
    else:
        allowed = attention_mask[..., -(P + Lk):] if attention_mask.shape[-1] >= P + Lk else attention_mask
        if prefix_mask is not None and P > 0:
            hidden = ~prefix_mask[idx][:, None, None, :]  # (B, 1, 1, P): padding of each request's prompt
            head, tail = allowed[..., :P], allowed[..., P:]
            head = head & ~hidden if allowed.dtype == torch.bool else head.masked_fill(hidden, torch.finfo(head.dtype).min)
            allowed = torch.cat([head.expand(*tail.shape[:-1], P), tail], dim=-1)
    if allowed.dtype == torch.bool:
        additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        additive = additive.masked_fill(~allowed, torch.finfo(query.dtype).min)
    else:
        additive = allowed.to(query.dtype)

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, allowed if allowed.dtype == torch.bool else additive,
                                      dropout=dropout, scaling=scale, is_causal=False, **kwargs)
    kwargs.pop("is_causal", None)
    return eager(module, query, key, value, additive, dropout=dropout, scaling=scale, **kwargs)


def register() -> None:
    """Register the attention function and mask builder with transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_forward)
