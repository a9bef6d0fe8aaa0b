"""The running batch's KV cache: full-attention layers that grow in place, rows joined and dropped.

Rows are right-aligned (left-padded): every row's newest token sits in the last column, so a decode
step writes one column for all rows and a row that joins or leaves touches no other row's entries.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import LoraError


def tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class GrowingLayer(DynamicLayer):
    """A full-attention layer's KV cache that appends into spare room (doubling when full) instead of
    concatenating: a decode step writes one column rather than copying the whole cache."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._room_k = self._room_v = None
            self._length = 0
        end = self._length + key_states.shape[-2]
        if self._room_k is None or end > self._room_k.shape[-2]:
            self._room_k, self._room_v = (_grown(room, fresh, self._length, max(2 * end, 64))
                                          for room, fresh in ((self._room_k, key_states), (self._room_v, value_states)))
        self._room_k[:, :, self._length:end] = key_states
        self._room_v[:, :, self._length:end] = value_states
        self._length = end
        self.keys, self.values = self._room_k[:, :, :end], self._room_v[:, :, :end]  # (B, heads, T, head_dim) views
        return self.keys, self.values


def _grown(room: torch.Tensor | None, fresh: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    shape = list(fresh.shape)
    shape[-2] = capacity
    bigger = fresh.new_empty(shape)
    if room is not None:
        bigger[:, :, :length] = room[:, :, :length]
    return bigger


def new_cache(model: nn.Module, layers: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> DynamicCache:
    """A KV cache of growing full-attention layers, filled with `layers`' (keys, values) if given."""
    kinds = set(getattr(model.config.get_text_config(decoder=True), "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise LoraError(f"the model's attention layers are {sorted(kinds)}; the engine batches full-attention "
                        "KV caches only (no sliding windows or linear attention)")
    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in range(model.config.get_text_config(decoder=True).num_hidden_layers)]
    for layer, (keys, values) in zip(cache.layers, layers):
        layer.update(keys, values)
    return cache


def pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence dimension (dim 1 of a (B, T) mask, dim 2 of a (B, H, T, D) cache) on the left."""
    dim = 1 if t.dim() == 2 else 2
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def joined(model: nn.Module, old: DynamicCache, new: DynamicCache, width: int) -> DynamicCache:
    """`old`'s rows then `new`'s, each left-padded to `width` columns."""
    return new_cache(model, [(torch.cat([pad_left(k0, width), pad_left(k1, width)]),
                              torch.cat([pad_left(v0, width), pad_left(v1, width)]))
                             for (k0, v0), (k1, v1) in zip(tensors(old), tensors(new))])


def selected(model: nn.Module, cache: DynamicCache, rows: torch.Tensor, start: int) -> DynamicCache:
    """The rows `rows` of `cache`, from column `start` on."""
    return new_cache(model, [(k.index_select(0, rows)[:, :, start:], v.index_select(0, rows)[:, :, start:])
                             for k, v in tensors(cache)])
