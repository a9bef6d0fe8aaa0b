"""Mixed-adapter batches: every example of a batch through its own adapter, in one pass.

    with lk.mixed_batch(model, ["sql", "chat", None, "sql"]):  # one name per example; None = base
        out = model(input_ids)                                  # forward and backward

Each LoRA layer stacks the A and B of the adapters in the batch (zero-padding smaller ranks),
gathers each example's pair and applies it with two batched matmuls: no Python loop over
adapters, so K adapters cost about what one costs. Where DoRA adapters are in the pool, each example's
output is also scaled per feature by its adapter's g = m / ||W0 + dW|| (ones for plain adapters and None). Gradients reach each adapter only from its own
examples. Modules to save (full copies, e.g. classifier heads) run once per adapter present.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import LoraError
from .identity import adapters, followers, merged_adapter, temporarily
from .layers import DoraAdapter, LoraLayer, lora_layers
from .lowrank import dora_output, padded_to_rank
from .modules_to_save import ModuleToSave


class Stacks:
    """Each layer's stacked A and B for a pool of adapters, kept from batch to batch while no weight changes.

    Reused only without grad (training must see the live parameters) and only while the pool's
    parameters are the same objects at the same versions: an adapter reloaded under the same name
    brings new tensors, so it is stacked again.
    """

    def __init__(self) -> None:
        self._by_layer: dict[int, tuple] = {}  # id(layer) -> (params, (names, versions), entry)

    def get(self, layer: LoraLayer, pool: Sequence[str]):
        """(A (K, r, ...), B (K, d_out, r), slot {name: k}, adapters, factors) for the pool's adapters on `layer`,
        or None. factors: None without DoRA adapters, else (K + 1, d_out): each adapter's DoRA factor g (ones for
        a plain adapter), then ones (for examples without an adapter)."""
        parts = [(n, layer.adapters[n]) for n in pool if layer.holds(n)]
        if not parts:
            return None
        dora = any(isinstance(a, DoraAdapter) for _, a in parts)
        params = tuple(p for _, a in parts for p in a.trained()) + ((layer.base_layer.weight,) if dora else ())
        cacheable = not torch.is_grad_enabled() and not any(p.is_inference() for p in params)
        key = (tuple(n for n, _ in parts), tuple(p._version for p in params)) if cacheable else None
        cached = self._by_layer.get(id(layer))
        if cacheable and cached is not None and cached[1] == key and all(a is b for a, b in zip(cached[0], params)):
            return cached[2]
        adapters_ = [a for _, a in parts]
        dtype = functools.reduce(torch.promote_types, (a.A.dtype for a in adapters_))  # adapters may differ in dtype
        r_max = max(a.rank for a in adapters_)
        padded = [padded_to_rank(a.A, a.B, r_max) for a in adapters_]  # copies only where padded
        entry = (torch.stack([A for A, _ in padded]).to(dtype), torch.stack([B for _, B in padded]).to(dtype),
                 {n: i for i, (n, _) in enumerate(parts)}, adapters_, _factors(layer, adapters_, dtype) if dora else None)
        if cacheable:
            self._by_layer[id(layer)] = (params, key, entry)
        return entry


def _factors(layer: LoraLayer, parts: list, dtype: torch.dtype) -> torch.Tensor:
    """(K + 1, d_out): each adapter's DoRA factor g (ones for a plain one), then ones; at least float32."""
    dtype = torch.promote_types(dtype, torch.float32)
    ones = torch.ones(parts[0].B.shape[0], device=parts[0].B.device, dtype=dtype)
    rows = [a.factor(layer).to(dtype) if isinstance(a, DoraAdapter) else ones for a in parts]
    return torch.stack(rows + [ones])


class Routing:
    """Which adapter each example of the batch uses, and the per-layer stacked weights of the `pool`
    (the adapters present, or a superset such as every adapter loaded)."""

    def __init__(self, names: list[str | None], pool: Sequence[str] | None = None,
                 stacks: Stacks | None = None) -> None:
        self.names = names
        self.present = [n for n in dict.fromkeys(names) if n is not None]
        self.pool = list(pool) if pool is not None else self.present
        self.stacks = stacks if stacks is not None else Stacks()
        self._rows: dict[int, tuple] = {}  # layer -> (stacked A, index, scale, p, factor rows) for these names

    def check_batch(self, x: torch.Tensor) -> None:
        if x.shape[0] != len(self.names):
            raise LoraError(f"mixed_batch: {len(self.names)} adapter names for a batch of {x.shape[0]} examples; "
                            "give exactly one name (or None) per example")

    def tables(self, layer: LoraLayer, device: torch.device):
        """(A (K, r, ...), B (K, d_out, r), index (N,), scale (N,), dropout p (N,), factors (K + 1, d_out) or None,
        factor row (N,)) or None."""
        entry = self.stacks.get(layer, self.pool)
        if entry is None:
            return None
        A, B, slot, parts, factors = entry
        rows = self._rows.get(id(layer))
        if rows is not None and rows[0] is A:
            return (A, B) + rows[1:4] + (factors, rows[4])
        index = torch.tensor([slot.get(n, 0) for n in self.names], device=device)
        scale = torch.tensor([parts[slot[n]].scale if n in slot else 0.0 for n in self.names], dtype=A.dtype,
                             device=device)  # the adapter's dtype: float64 adapters keep a float64 scale
        p = torch.tensor([parts[slot[n]].dropout_p if n in slot else 0.0 for n in self.names], device=device)
        factor_row = torch.tensor([slot.get(n, len(parts)) for n in self.names], device=device)  # None: ones
        self._rows[id(layer)] = (A, index, scale, p, factor_row)
        return A, B, index, scale, p, factors, factor_row

    def apply(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + each example's own low-rank update."""
        self.check_batch(x)
        tables = self.tables(layer, x.device)
        if tables is None:
            return result
        A, B, index, scale, p, factors, factor_row = tables
        dropping = layer.training and bool(p.any())
        if dropping:  # each example's own adapter dropout
            shape = (-1,) + (1,) * (x.dim() - 1)
            keep = 1.0 - p.view(shape)
            x = x * (torch.rand_like(x) < keep) / keep
        if factors is not None:
            return self._apply_dora(layer, x, result, tables, dropping)
        if not torch.is_grad_enabled() and result.dtype == A.dtype and result.is_contiguous():
            # Inference: add into the base output in place. A new activation-sized tensor plus a
            # separate add cost 2-25% of a GPT-2 Conv1D's own forward on CPU (bench/RESULTS.md).
            return layer.lowrank_routed(x, A, B, index, scale, out=result)
        return result + layer.lowrank_routed(x, A, B, index, scale).to(result.dtype)

    @staticmethod
    def _apply_dora(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, tables: tuple,
                    dropping: bool) -> torch.Tensor:
        """Each example's g * (result - bias + its update) + bias (core.lowrank.dora_output); g = 1 for examples
        of plain adapters or none. With dropout (x dropped), as DoraAdapter.output: the base again on x."""
        A, B, index, scale, _, factors, factor_row = tables
        update = layer.lowrank_routed(x, A, B, index, scale).to(result.dtype)
        g = factors.index_select(0, factor_row).view(x.shape[0], *(1,) * (result.dim() - 2), -1)  # (N, 1.., d_out)
        base = layer.base_layer
        if not dropping:
            return dora_output(result, update, g, base.bias)
        dropped = base(x)
        return dora_output(result, update, g, None, dropped if base.bias is None else dropped - base.bias)

    def apply_saved(self, wrapper: ModuleToSave, args: tuple, kwargs: dict):
        """Run each adapter's copy (or the original) on its own examples and reassemble the batch."""
        x = args[0]
        self.check_batch(x)
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(self.names):
            groups.setdefault(name if wrapper.holds(name) else None, []).append(i)
        order, outputs = [], []
        for name, rows in groups.items():
            module = wrapper.original_module if name is None else wrapper.copies[name]
            rows_t = torch.tensor(rows, device=x.device)
            picked = [a.index_select(0, rows_t) if torch.is_tensor(a) and a.shape[:1] == x.shape[:1] else a
                      for a in args]
            outputs.append(module(*picked, **kwargs))
            order += rows
        inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
        inverse[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
        return torch.cat(outputs).index_select(0, inverse)


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str | None], pool: Sequence[str] | None = None,
                stacks: Stacks | None = None) -> Iterator[nn.Module]:
    """Inside, example i of every batch goes through adapter names[i] (None: the base model).

    A server running batch after batch may pass `pool` (adapters to stack per layer: every one loaded,
    a superset of `names`) and one `Stacks` it keeps: the stacked weights are then built once, not at
    every batch, while the adapters loaded stay the same.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise LoraError(f"names={names!r}: give a list with one adapter name (or None) per example")
    names = list(names)
    known = adapters(model)
    unknown = sorted({n for n in names + list(pool or []) if n is not None and n not in known}, key=str)
    if unknown:
        raise LoraError(f"mixed_batch: unknown adapter(s) {unknown!r}; this model's adapters are {known!r}")
    if merged_adapter(model) is not None:
        raise LoraError(f"mixed_batch: adapter {merged_adapter(model)!r} is merged into the weights; "
                        "call lk.unmerge_(model) first")
    unsupported = [(p, layer) for p, layer in lora_layers(model)
                   if layer.lowrank_routed is None and any(layer.holds(n) for n in names if n is not None)]
    if unsupported:
        path, layer = unsupported[0]
        raise LoraError(f"mixed_batch: {path!r} is a {type(layer.base_layer).__name__}; mixed batches support "
                        "Linear, Conv1D and Embedding adapters (not convolutions): use lk.use(model, name) per group")
    residual = [(p, layer) for p, layer in lora_layers(model) if layer.residual is not None]
    if residual:
        path, layer = residual[0]
        raise LoraError(f"mixed_batch: {path!r} holds an adapter initialised with init={layer.residual.config.init!r}, "
                        "whose start was taken out of the base weights; run it alone (lk.use), or save it (a plain "
                        "LoRA for the original base) and load that for mixed batches")
    if pool is not None and not set(names) - {None} <= set(pool):
        raise LoraError(f"mixed_batch: pool={list(pool)!r} leaves out {sorted(set(names) - {None} - set(pool))!r}; "
                        "the pool must hold every adapter the batch names")
    with temporarily([m for _, m in followers(model)], "routing", Routing(names, pool, stacks)):
        yield model
