"""How the shared prefix reaches the attention function: a forward pre-hook on the decoder stack.

The attention function never sees the cache; it sees `module` and the keyword arguments that
the decoder stack passes down through every decoder layer. So a pre-hook on each decoder stack
(the module that owns the list of decoder layers: LlamaModel, GPT2Model, OPTDecoder, ...) looks
for a `PrefixCache` among its arguments and adds `prefix_kernels_prefix=cache.shared_prefix()`
to its kwargs.

Why a kwarg and not a global or a context variable: under gradient checkpointing transformers
drops the cache from each decoder layer (`cache=None`) and replays the layer in the backward pass
from the kwargs it bound at the forward; the kwarg is bound with them, a context variable would
be gone by then. The same replay is why the hook also makes checkpointing non-reentrant
(`compat.force_non_reentrant_checkpointing`): reentrant replays would each backpropagate through
the one shared prefix graph.

Under torch.compile: the hooks are installed when the PEFT model is set up (or by
`apply_prefix_kernels(model)`), not in its first forward (registering a hook inside a traced forward
is a graph break, an error with fullgraph=True); the forward then only reads an attribute of the
model. It does not look the model up in the registry of prepared models: dynamo guards on the keys
of that WeakKeyDictionary, and another model freed while a step compiles crashed guard building.
"""

from __future__ import annotations

import inspect
import weakref

from torch import nn

from . import compat
from .cache import PrefixCache

KWARG = "prefix_kernels_prefix"
_CACHE_NAMES = ("cache", "past_key_values", "layer_past")

# model -> list of hook handles, for models this package prepared (weak: models die normally)
_prepared: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def decoder_stacks(model: nn.Module) -> list:
    """Modules that own a ModuleList of gradient-checkpointing decoder layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    stacks = []
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) and isinstance(child[0], GradientCheckpointingLayer):
                stacks.append(module)
                break
    return stacks


def _positional_names(module) -> tuple:
    names = getattr(module, "_prefix_kernels_arg_names", None)
    if names is None:
        params = inspect.signature(module.forward).parameters.values()
        names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        module._prefix_kernels_arg_names = names
    return names


def _find_cache(module, args, kwargs):
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    for name, value in zip(_positional_names(module), args):
        if name in _CACHE_NAMES and value is not None:
            return value
    return None


def _layer_count(module) -> int:
    count = getattr(module, "_prefix_kernels_layer_count", None)
    if count is None:
        count = max(len(c) for c in module.children() if isinstance(c, nn.ModuleList))
        module._prefix_kernels_layer_count = count
    return count


def _deliver(module, args, kwargs):
    cache = _find_cache(module, args, kwargs)
    if isinstance(cache, PrefixCache):
        if len(cache.layers) > _layer_count(module):
            # more entries than layers: built for another model (a deeper one, or one layer per
            # head); the extra prefixes would be ignored without a word
            raise ValueError(
                f"PrefixCache holds {len(cache.layers)} layers, but {type(module).__name__} has "
                f"{_layer_count(module)} decoder layers: build it with one entry (a prefix or None) per layer")
        cache._delivered = True
        if module.training:  # checkpointing only acts in training
            compat.force_non_reentrant_checkpointing(module)  # transformers 4.57 defaults to reentrant
        kwargs[KWARG] = cache.shared_prefix()
        return args, kwargs
    return None


def _undeliver(module, args, kwargs, output):
    """After the stack's forward (or its exception): the cache forgets it was delivered, so that
    handing it next to a model that was not prepared raises instead of dropping the prefix."""
    cache = _find_cache(module, args, kwargs)
    if isinstance(cache, PrefixCache):
        cache._delivered = False
    return None


_HANDLES = "_prefix_kernels_hooks"  # attribute of a prepared model: its hook handles


def install(model: nn.Module) -> int:
    """Hook every decoder stack of `model` (once): a pre-hook and a hook each. Returns the number
    of stacks hooked.

    Whether it is done is read from the model itself, not from `_prepared` (see the module docstring:
    forwards call this, and dynamo would guard on the registry's keys)."""
    handles = getattr(model, _HANDLES, None)
    if handles is not None:
        return len(handles) // 2
    stacks = decoder_stacks(model)
    handles = [s.register_forward_pre_hook(_deliver, with_kwargs=True) for s in stacks] + [
        s.register_forward_hook(_undeliver, with_kwargs=True, always_call=True) for s in stacks]
    setattr(model, _HANDLES, handles)
    _prepared[model] = handles
    return len(stacks)


def uninstall(model: nn.Module) -> None:
    for handle in _prepared.pop(model, []):
        handle.remove()
    if _HANDLES in vars(model):
        delattr(model, _HANDLES)
    compat.restore_checkpointing(model)  # the user's use_reentrant=True again


def prepared_models() -> list:
    return list(_prepared.keys())
