"""Named adapters on one model: listing, switching, temporary switches, disabling, deleting.

Switching and disabling reach every module that follows the active adapter: LoRA layers and
modules to save (each adapter's full copy).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .config import LoraConfig
from ..errors import LoraError
from .inject import active_adapter
from .layers import lora_layers
from .modules_to_save import saved_modules


def adapters(model: nn.Module) -> list[str]:
    """Names of the adapters in the model, in the order they were added."""
    created: dict[str, int] = {}  # not module order: a layer may lack earlier adapters
    for _, layer in lora_layers(model):
        for name in layer.lora_A:
            created.setdefault(name, layer.created[name])  # one inject_ adds it to every layer at once
    return sorted(created, key=created.__getitem__)


def adapter_config(model: nn.Module, adapter: str) -> LoraConfig:
    """The LoraConfig adapter `adapter` was created with."""
    for _, layer in lora_layers(model):
        if adapter in layer.configs:
            return layer.configs[adapter]
    raise _unknown(model, adapter)


def adapter_paths(model: nn.Module, adapter: str) -> list[str]:
    """Module paths that carry adapter `adapter`."""
    return [path for path, layer in lora_layers(model) if adapter in layer.lora_A]


def merged_adapter(model: nn.Module) -> str | None:
    """The adapter merged into the base weights, or None."""
    for _, layer in lora_layers(model):
        if layer.merged_adapter is not None:
            return layer.merged_adapter
    return None


def followers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module that follows the active adapter: LoRA layers, then modules to
    save. Each has active_adapter, disabled, routing, holds(name), drop(name), empty and wrapped."""
    return list(lora_layers(model)) + list(saved_modules(model))


@contextmanager
def temporarily(modules: list[nn.Module], attribute: str, value) -> Iterator[None]:
    """Set `attribute` to `value` on every module; each one's own value is put back on exit."""
    previous = [getattr(m, attribute) for m in modules]
    for m in modules:
        setattr(m, attribute, value)
    try:
        yield
    finally:
        for m, before in zip(modules, previous):
            setattr(m, attribute, before)


def set_active(model: nn.Module, adapter: str | None) -> None:
    """Make `adapter` the one LoRA layers and modules to save apply (None: none). Swaps a name,
    copies no weights."""
    if adapter is not None and adapter not in adapters(model):
        raise _unknown(model, adapter)
    merged = merged_adapter(model)
    if merged is not None and merged != adapter:
        raise LoraError(f"adapter={adapter!r}: the model has {merged!r} merged into its weights; "
                        "call lk.unmerge_(model) before switching adapters")
    for _, module in followers(model):
        module.active_adapter = adapter


@contextmanager
def use(model: nn.Module, adapter: str | None) -> Iterator[nn.Module]:
    """Temporarily make `adapter` active; the previous one is restored on exit."""
    previous = active_adapter(model)
    set_active(model, adapter)
    try:
        yield model
    finally:
        set_active(model, previous)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters are skipped (modules to save run their original), and a
    merged adapter is taken out meanwhile."""
    from .merge import merge_, unmerge_  # merge builds on this module

    merged = merged_adapter(model)
    if merged is not None:
        unmerge_(model)
    try:
        with temporarily([m for _, m in followers(model)], "disabled", True):
            yield model
    finally:
        if merged is not None:
            merge_(model, merged)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove adapter `adapter`; layers (and modules to save) left with no adapter become their
    plain base layer (original module) again.

    If it was active, no adapter is active afterwards (the model behaves as the base).
    """
    if adapter not in adapters(model):
        raise _unknown(model, adapter)
    if merged_adapter(model) == adapter:
        raise LoraError(f"adapter={adapter!r} is merged into the weights; call lk.unmerge_(model) first")
    for path, module in followers(model):
        if module.holds(adapter):
            module.drop(adapter)
        if module.active_adapter == adapter:
            module.active_adapter = None
        if module.empty:
            model.set_submodule(path, module.wrapped)  # a plain layer (original module) again


def _unknown(model: nn.Module, adapter) -> LoraError:
    known = adapters(model)
    return LoraError(f"adapter={adapter!r} is not in this model; its adapters are {known!r}"
                     + ("" if known else " (add one with lk.inject_ or lk.load_adapter)"))
