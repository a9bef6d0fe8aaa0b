"""A new adapter combined from existing ones: combine_adapters checks the adapters, plans the new one off the
model and attaches it in one step (the arithmetic is core.combine's).

    lk.combine_adapters(model, {"sql": 0.7, "chat": 0.3}, method="svd", adapter="mix", rank=16)
    lk.set_active(model, "mix")

Like PEFT's add_weighted_adapter: the new adapter covers every module any of the adapters adapts (an
adapter absent from a module adds nothing there), has one rank and alpha = rank (scale 1), and takes a
module to save from the one adapter that has a copy of it (two adapters with copies of one module are
refused). It is a plain adapter: saved, loaded, merged and batched like any other.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..errors import LoraError, problems_error
from .combine import FACTOR_METHODS, SVD_METHODS, CombineConfig, combined_factors
from .config import LoraConfig
from .identity import adapter_config, adapters, check_adapter_name, unknown_adapter
from .inject import attach_, candidate_modules, check_not_merged, new_parts, resolve
from .layers import LoraAdapter, LoraLayer
from .modules_to_save import ModuleToSave, trainable_copy


def combine_adapters(model: nn.Module, weights: Mapping[str, float], method: str = "svd", adapter: str = "combined",
                     **options) -> list[str]:
    """Add adapter `adapter`, built from the adapters `weights` names with their weights by `method`
    (CombineConfig: svd, cat, linear, ties, dare_linear, dare_ties, *_svd; `options` are its other
    fields: rank, density, majority_sign_method, seed, clamp, full_matrices, driver). The active adapter
    stays as it is. Returns the adapted module paths. On any error the model is left as it was."""
    config = _config(method, options)
    check_adapter_name(adapter)
    if adapter in adapters(model):
        raise LoraError(f"adapter={adapter!r} already exists in this model; pick another name for the combined "
                        f"adapter, or remove it first with lk.delete_adapter(model, {adapter!r})")
    names, values = _checked_weights(model, weights)
    modules = candidate_modules(model)
    check_not_merged(modules)
    layers = {p: m for p, m in modules if isinstance(m, LoraLayer) and any(m.holds(n) for n in names)}
    saved = _saved_copies(modules, names)
    _check_plain(layers, names, [adapter_config(model, n) for n in names])
    rank = _new_rank(layers, names, config)
    first = adapter_config(model, names[0])
    dtypes = {adapter_config(model, n).adapter_dtype for n in names}
    new = LoraConfig(rank=rank, alpha=rank, dropout=first.dropout, init=first.init, targets=tuple(layers),
                     modules_to_save=tuple(saved), adapter_dtype=dtypes.pop() if len(dtypes) == 1 else "float32")
    resolve(model, new, modules)  # lorakit's own checks, e.g. a grouped conv needs a rank it divides
    generator = _Generators(config.seed)
    with torch.no_grad():
        factors = {path: _module_factors(layer, names, values, config, rank, generator) for path, layer in layers.items()}
        parts = new_parts(dict(modules), new, list(layers), [], factors)
        parts.update({path: trainable_copy(copy) for path, copy in saved.items()})
    attach_(model, adapter, parts, new.bias, modules)
    return list(layers)


def _config(method: str, options: dict) -> CombineConfig:
    try:
        return CombineConfig(method=method, **options)
    except TypeError:
        known = [f for f in CombineConfig.__dataclass_fields__ if f != "method"]
        unknown = sorted(set(options) - set(known))
        raise LoraError(f"combine_adapters: unknown option(s) {unknown}; the options are {', '.join(known)}") from None


def _checked_weights(model: nn.Module, weights) -> tuple[list[str], list[float]]:
    """(adapter names, weights) from the mapping the user gave; every problem reported together."""
    if not isinstance(weights, Mapping) or not weights:
        raise LoraError(f"weights={weights!r}: give a non-empty mapping from adapter name to weight, "
                        "e.g. {'sql': 0.7, 'chat': 0.3}")
    known = adapters(model)
    problems = [str(unknown_adapter(model, n)) for n in weights if n not in known]
    problems += [f"weights[{n!r}]={w!r}: must be a finite number, e.g. 0.5 (negative subtracts)"
                 for n, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))
                 or not math.isfinite(w)]
    if problems:
        raise problems_error("combine_adapters", problems)
    return list(weights), [float(w) for w in weights.values()]


def _saved_copies(modules: list[tuple[str, nn.Module]], names: list[str]) -> dict[str, nn.Module]:
    """path -> the copy the combined adapter takes of each module to save; PEFT's rule: at most one of the
    adapters may hold a copy of a module (two trained copies of a full module cannot be weighted)."""
    copies, problems = {}, []
    for path, module in modules:
        if isinstance(module, ModuleToSave):
            holders = [n for n in names if module.holds(n)]
            if len(holders) > 1:
                problems.append(f"{path!r}: adapters {holders} each train their own copy of this module (a module "
                                "to save), and full copies cannot be weighted; combine at most one of them")
            elif holders:
                copies[path] = module.copies[holders[0]]
    if problems:
        raise problems_error("combine_adapters: modules to save", problems)
    return copies


def _check_plain(layers: dict[str, LoraLayer], names: list[str], configs: list[LoraConfig]) -> None:
    """Only plain LoRA adapters (dW = scale * B @ A, no trained biases) combine."""
    problems = [f"adapter {n!r} at {path!r} is a {type(layer.adapters[n]).__name__}, not a plain LoraAdapter: its "
                "update is not scale * B @ A alone; combine_adapters combines plain LoRA adapters only"
                for path, layer in layers.items() for n in names
                if layer.holds(n) and type(layer.adapters[n]) is not LoraAdapter]
    problems += [f"adapter {n!r} trains biases (bias={c.bias!r}): biases are base weights every adapter shares, "
                 "not a per-adapter update that can be weighted; combine adapters trained with bias='none'"
                 for n, c in zip(names, configs) if c.bias != "none"]
    if problems:
        raise problems_error("combine_adapters", problems[:10])


def _new_rank(layers: dict[str, LoraLayer], names: list[str], config: CombineConfig) -> int:
    """The new adapter's one rank: the largest its modules need (cat: ranks add; svd: `rank` or the largest)."""
    ranks = {path: {n: layer.rank(n) for n in names if layer.holds(n)} for path, layer in layers.items()}
    if config.method == "cat":
        return max(sum(r.values()) for r in ranks.values())
    if config.method in SVD_METHODS:
        return config.rank or max(max(r.values()) for r in ranks.values())
    assert config.method in FACTOR_METHODS, config.method
    for path, r in ranks.items():
        if len(set(r.values())) > 1:
            listed = ", ".join(f"{n!r} has rank {k}" for n, k in r.items())
            raise LoraError(f"method={config.method!r} combines the A's and B's entry by entry, so the adapters need "
                            f"one rank, but at {path!r} {listed}; use method='cat' (exact, rank {sum(r.values())}) "
                            f"or method='svd' (rank of your choice)")
    return max(max(r.values()) for r in ranks.values())


def _module_factors(layer: LoraLayer, names: list[str], values: list[float], config: CombineConfig, rank: int,
                    generator: "_Generators") -> tuple[torch.Tensor, torch.Tensor]:
    held = [(layer.adapters[n], w) for n, w in zip(names, values) if layer.holds(n)]
    factors = [(part.A.detach(), part.B.detach(), part.scale) for part, _ in held]
    return combined_factors(factors, [w for _, w in held], config, rank, layer.groups,
                            generator.on(factors[0][0].device), (layer.to_weight_layout, layer.as_update_matrix))


class _Generators:
    """DARE's random source: with a seed, one generator per device, each seeded with it once; without, torch's
    global generator (None), as PEFT."""

    def __init__(self, seed: int | None) -> None:
        self.seed, self.made = seed, {}

    def on(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self.made:
            self.made[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.made[device]
