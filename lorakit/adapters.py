"""Named adapters on one model: listing, switching, temporary switches, disabling, deleting.

Switching and disabling reach every module that follows the active adapter: LoRA layers and
modules to save (each adapter's full copy).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .config import LoraConfig
from .errors import LoraError
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


def _switchable(model: nn.Module) -> list[nn.Module]:
    """Every module that follows the active adapter: LoRA layers, then modules to save."""
    return [layer for _, layer in lora_layers(model)] + [wrapper for _, wrapper in saved_modules(model)]


def set_active(model: nn.Module, adapter: str | None) -> None:
    """Make `adapter` the one LoRA layers and modules to save apply (None: none). Swaps a name,
    copies no weights."""
    if adapter is not None and adapter not in adapters(model):
        raise _unknown(model, adapter)
    merged = merged_adapter(model)
    if merged is not None and merged != adapter:
        raise LoraError(f"adapter={adapter!r}: the model has {merged!r} merged into its weights; "
                        "call lk.unmerge_(model) before switching adapters")
    for module in _switchable(model):
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
    layers = _switchable(model)
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.disabled = flag
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
    for path, layer in list(lora_layers(model)):
        if adapter in layer.lora_A:
            layer.remove_adapter(adapter)
        if layer.active_adapter == adapter:
            layer.active_adapter = None
        if not layer.lora_A:
            model.set_submodule(path, layer.base_layer)
    for path, wrapper in list(saved_modules(model)):
        if adapter in wrapper.copies:
            wrapper.remove_copy(adapter)
        if wrapper.active_adapter == adapter:
            wrapper.active_adapter = None
        if not wrapper.copies:
            model.set_submodule(path, wrapper.original_module)


def _unknown(model: nn.Module, adapter) -> LoraError:
    known = adapters(model)
    return LoraError(f"adapter={adapter!r} is not in this model; its adapters are {known!r}"
                     + ("" if known else " (add one with lk.inject_ or lk.load_adapter)"))
