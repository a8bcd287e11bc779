"""A transformers cache that holds a shared prefix once, beside each request's own keys and values.

`PrefixCache` is a `DynamicCache` whose layers (`PrefixLayer`) keep the prefix keys and values
(G, Hkv, P, D) apart from the per-request ones (B, Hkv, T, D). `update()` stores and returns the
per-request part only; the prefix reaches the attention function through the decoder stack (see
`delivery.py`), so it is never expanded, repeated or concatenated to batch size.

`get_seq_length()` counts the prefix (P + T): transformers derives mask sizes and position ids
from it, exactly as it does for PEFT's expanded prefix cache. Beam reordering, batch selection,
repeat-interleave and crop act on the per-request part and on `prefix_index`, never on the prefix
tensors; reset empties the per-request part and leaves `prefix_index` as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .._core.problem import check_index_range


@dataclass(frozen=True)
class SharedPrefix:
    """What the attention function needs from a PrefixCache: per-layer (prefix_k, prefix_v), each
    (G, Hkv, P, D) or None for a layer without prefix, and prefix_index (B,) or None.

    An immutable snapshot: a decoder layer under gradient checkpointing keeps it in the kwargs it
    replays in the backward pass, so the recomputation sees the same prefix tensors."""

    layers: tuple
    prefix_index: Optional[torch.Tensor]
    index_checked: bool = False  # prefix_index's values checked once for this forward (every layer)
    prefix_mask: Optional[torch.Tensor] = None  # (G, P) bool: which prefix keys may be attended

    def for_layer(self, layer_idx):
        if layer_idx is None or layer_idx >= len(self.layers):
            return None
        return self.layers[layer_idx]


class PrefixLayer(DynamicLayer):
    """One layer: the shared prefix (G, Hkv, P, D) and the requests' own keys/values (B, Hkv, T, D)."""

    def __init__(self, prefix_keys: Optional[torch.Tensor], prefix_values: Optional[torch.Tensor]):
        super().__init__()
        if (prefix_keys is None) != (prefix_values is None):
            raise ValueError("prefix_keys and prefix_values must both be given or both be None")
        if prefix_keys is not None and (prefix_keys.dim() != 4 or prefix_keys.shape != prefix_values.shape):
            raise ValueError(
                f"prefix_keys and prefix_values must both be (G, Hkv, P, D), got {tuple(prefix_keys.shape)} "
                f"and {tuple(prefix_values.shape)}"
            )
        self.prefix_keys = prefix_keys
        self.prefix_values = prefix_values
        self.position_offset = 0  # a layer without prefix: the cache's prefix length (set by PrefixCache)

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[-2]

    def own_length(self) -> int:
        return super().get_seq_length()

    def update(self, key_states, value_states, *args, **kwargs):
        """Store and return the per-request keys/values. The first update keeps the tensors as
        given (DynamicLayer would concatenate them onto an empty tensor: a copy of every request's
        keys and values in every layer of a training step); later ones concatenate."""
        if self.own_length() == 0:
            if not self.is_initialized:
                # initialise through the base class (lazy_initialization's signature differs
                # across transformers versions), with empty slices: nothing is copied
                super().update(key_states[..., :0, :], value_states[..., :0, :], *args, **kwargs)
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        """Positions before the next token: the prefix's and the own tokens'. A layer without
        prefix counts the cache's prefix too (transformers takes positions from layer 0, which
        must not depend on which layer lacks a prefix); its mask is cut to its own keys."""
        return (self.prefix_length if self.prefix_keys is not None else self.position_offset) + self.own_length()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.own_length() > 0:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.own_length() > 0:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.own_length() > 0:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]

    def crop(self, max_length: int) -> None:
        """Remove own tokens: a negative value removes that many (clamped at the own length); a
        positive one (transformers < 5.15 passes absolute lengths counted in input ids, which do not
        include the prefix) keeps that many own tokens. The prefix is never cropped."""
        own = self.own_length()
        keep = max(own + max_length, 0) if max_length < 0 else min(max_length, own)
        if own > 0 and keep < own:
            self.keys = self.keys[..., :keep, :]
            self.values = self.values[..., :keep, :]

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class PrefixCache(DynamicCache):
    """A DynamicCache whose every layer holds a shared prefix once for the whole batch.

    Build it from per-layer (prefix_k, prefix_v) pairs of shape (G, Hkv, P, D) (or None for a layer
    without prefix) and an optional prefix_index (B,) choosing each request's prefix (None only with
    G = 1: one prefix for everyone; with several, the attention raises, naming prefix_index), and
    an optional prefix_mask (G, P) bool, True where a prefix key may be attended (prompts of
    different lengths, left-padded to P; None: every prefix key visible). Pass it as the model's cache (``past_key_values=`` / ``cache=``) on a model
    prepared by `prefix_kernels.apply_prefix_kernels`.
    """

    def __init__(self, prefixes: Sequence, prefix_index: Optional[torch.Tensor] = None,
                 prefix_mask: Optional[torch.Tensor] = None):
        layers = []
        for i, pair in enumerate(prefixes):
            if pair is None:
                layers.append(PrefixLayer(None, None))
                continue
            if len(pair) != 2:
                raise ValueError(f"prefixes[{i}] must be a (prefix_k, prefix_v) pair or None")
            layers.append(PrefixLayer(*pair))
        # Cache.__init__ directly: DynamicCache.__init__'s signature differs across transformers
        # versions, and this cache never needs its config-driven layer types.
        Cache.__init__(self, layers=layers)
        # a plain loop: dynamo traces this constructor under torch.compile, and rejects max(genexpr, default=)
        offset = 0
        for layer in layers:
            offset = max(offset, layer.prefix_length)
        for layer in layers:
            layer.position_offset = offset
        self.prefix_index = prefix_index
        self.prefix_mask = prefix_mask
        self._delivered = False  # set by the decoder-stack hook; checked in update()

    @classmethod
    def from_cache(cls, cache: Cache, prefix_index: Optional[torch.Tensor] = None,
                   length: Optional[int] = None, prefix_mask: Optional[torch.Tensor] = None) -> "PrefixCache":
        """Take each layer's keys/values of a filled cache (e.g. a prompt run at batch 1) as the prefix.

        `length`: keep the first `length` positions. Needed for static layers (a StaticCache or
        transformers 4.57's HybridCache), whose tensors hold max_cache_len slots, filled or not."""
        prefixes = []
        for i, layer in enumerate(cache.layers):
            keys = getattr(layer, "keys", None)
            initialized = getattr(layer, "is_initialized", keys is not None)
            if not (initialized and keys is not None and keys.numel()):
                prefixes.append(None)
                continue
            if getattr(layer, "is_sliding", False) and layer.get_seq_length() > keys.shape[-2]:
                raise ValueError(
                    f"PrefixCache.from_cache: layer {i} is a sliding-window layer that kept {keys.shape[-2]} of "
                    f"{layer.get_seq_length()} tokens; build the prompt's cache with DynamicCache() (full layers)")
            if length is not None:
                prefixes.append((layer.keys[..., :length, :], layer.values[..., :length, :]))
            elif isinstance(layer, DynamicLayer):
                prefixes.append((layer.keys, layer.values))
            else:
                raise ValueError(f"PrefixCache.from_cache: layer {i} is a {type(layer).__name__}, whose tensors "
                                 "hold max_cache_len slots filled or not; pass length=")
        return cls(prefixes, prefix_index, prefix_mask)

    def shared_prefix(self) -> SharedPrefix:
        """The prefix for one forward. prefix_index's values are checked here, once for every
        layer (one device sync per forward, not per layer); its type and shape are checked by
        each layer's call, which knows the batch."""
        layers = tuple(None if l.prefix_keys is None else (l.prefix_keys, l.prefix_values) for l in self.layers)
        index = self.prefix_index
        checked = False
        counts = [pair[0].shape[0] for pair in layers if pair is not None]
        if (counts and isinstance(index, torch.Tensor) and index.dim() == 1 and index.numel()
                and not index.is_floating_point() and not index.is_complex() and index.dtype != torch.bool):
            check_index_range(index, min(counts))
            checked = True
        return SharedPrefix(layers, index, checked, self.prefix_mask)

    @property
    def prefix_length(self) -> int:
        return max((l.prefix_length for l in self.layers), default=0)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(f"PrefixCache holds {len(self.layers)} layers (one prefix or None each), but the model's "
                             f"layer {layer_idx} asks for one: build it with an entry for every layer")
        if not self._delivered:
            raise RuntimeError(
                "a PrefixCache reached a model whose decoder stack does not hand its prefix to the "
                "attention: call prefix_kernels.apply_prefix_kernels(model) first (without it the "
                "prefix would be silently ignored)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.prefix_index is not None:
            self.prefix_index = self.prefix_index.index_select(0, beam_idx.to(self.prefix_index.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.prefix_index is not None:
            self.prefix_index = self.prefix_index.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.prefix_index is not None:
            self.prefix_index = self.prefix_index[indices]
