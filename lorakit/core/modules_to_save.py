"""Modules to save: layers trained in full with an adapter (e.g. a new classification head).

A ModuleToSave holds the frozen original module and one trainable deep copy per adapter, as
PEFT's ModulesToSaveWrapper does:

    y = copies[active](x)     if an adapter is active, it has a copy here, and adapters are enabled
    y = original_module(x)    otherwise (no adapter active, this adapter has no copy, or disabled)

Copies are full weights, not low-rank updates: merging leaves them as they are.
"""
from __future__ import annotations

import copy
from typing import Iterator

from torch import nn

# Modules without a forward of their own: there is nothing to call in their place.
CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_OWN_ATTRIBUTES = frozenset({"original_module", "copies", "active_adapter", "disabled", "in_use", "routing", "empty",
                             "wrapped", "parts"})


class ModuleToSave(nn.Module):
    """The original module (frozen) and one trainable copy of it per adapter, in `copies[name]`."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.routing = None  # a mixed.Routing while inside lk.mixed_batch: one adapter per example
        self.train(original_module.training)

    # --- the follower protocol (identity.Follower; shared with LoraLayer) ------------------------
    def holds(self, name: str) -> bool:
        return name in self.copies

    def put(self, name: str, copy_: nn.Module) -> None:
        """Attach `copy_` as adapter `name`'s copy; the original stays frozen."""
        self.original_module.requires_grad_(False)
        self.copies[name] = copy_

    def drop(self, name: str) -> nn.Module:
        """Remove adapter `name`'s copy and return it."""
        return self.copies.pop(name)

    @property
    def empty(self) -> bool:
        return not self.copies

    @property
    def wrapped(self) -> nn.Module:
        return self.original_module

    @property
    def parts(self) -> nn.ModuleDict:
        """Each adapter's own part here: its copy."""
        return self.copies

    @property
    def in_use(self) -> nn.Module:
        """The module forward calls now: the active adapter's copy, else the original."""
        if self.disabled or not self.holds(self.active_adapter):
            return self.original_module
        return self.copies[self.active_adapter]

    def forward(self, *args, **kwargs):
        if self.routing is not None and not self.disabled:
            return self.routing.apply_saved(self, args, kwargs)
        return self.in_use(*args, **kwargs)

    def unwrap(self, adapter: str | None) -> nn.Module:
        """The module that replaces this wrapper for good: `adapter`'s copy, else the original."""
        return self.copies[adapter] if self.holds(adapter) else self.original_module

    def __getattr__(self, name: str):
        # Code that reads e.g. `head.weight` or `head.out_features` sees the module in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _OWN_ATTRIBUTES or name.startswith("__"):
                raise
            return getattr(self.in_use, name)

    def extra_repr(self) -> str:
        return f"copies={list(self.copies)}, active={self.active_adapter!r}, disabled={self.disabled}"


def trainable_copy(original: nn.Module) -> nn.Module:
    """A new adapter's own copy of a module to save: a deep copy, trainable (not yet attached)."""
    return copy.deepcopy(original).requires_grad_(True)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModuleToSave]]:
    """(path, wrapper) for every module to save in the model, in module order."""
    for path, module in model.named_modules():
        if isinstance(module, ModuleToSave):
            yield path, module


def saved_paths(model: nn.Module, adapter: str) -> list[str]:
    """Paths of the modules that hold a copy for `adapter`."""
    return [path for path, wrapper in saved_modules(model) if wrapper.holds(adapter)]
