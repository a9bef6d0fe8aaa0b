"""Merging: fold an adapter into the base weights and take it out again, losslessly."""
from __future__ import annotations

from torch import nn

from ..errors import LoraError
from .identity import active_adapter, adapters, merged_adapter, set_active, unknown_adapter
from .layers import lora_layers
from .modules_to_save import saved_modules


def merge_(model: nn.Module, adapter: str | None = None) -> None:
    """W0 <- W0 + dW for `adapter` (default: the active one) in every layer that has it.

    dW is summed in float32 and rounded once into the base dtype; the exact W0 is kept so that
    unmerge_ restores it bit for bit. Idempotent; while merged the forward runs the base path only.
    Modules to save are full copies, not low-rank: they are left as they are (the adapter's copy runs).
    """
    adapter = active_adapter(model) if adapter is None else adapter
    if adapter is None:
        raise LoraError("adapter=None: no adapter is active; name one: lk.merge_(model, 'default')")
    if adapter not in adapters(model):
        raise unknown_adapter(model, adapter)
    current = merged_adapter(model)
    if current == adapter:
        return
    if current is not None:
        raise LoraError(f"adapter={adapter!r}: {current!r} is already merged; call lk.unmerge_(model) first")
    set_active(model, adapter)
    for _, layer in lora_layers(model):
        if layer.holds(adapter):
            layer.merge(adapter)


def unmerge_(model: nn.Module) -> None:
    """Restore the exact pre-merge base weights. A no-op if nothing is merged."""
    for _, layer in lora_layers(model):
        if layer.merged_adapter is not None:
            layer.unmerge()


def unload_(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRA layer by its plain base layer; with merge=True the active adapter is
    folded into the weights first (a merged adapter stays merged). A module to save becomes the
    active adapter's copy with merge=True, its original without. Returns the model."""
    adapter = merged_adapter(model) or active_adapter(model)
    if not merge:
        unmerge_(model)
    for path, layer in list(lora_layers(model)):
        base = layer.fold(adapter if merge else None)
        model.set_submodule(path, base)
    for path, wrapper in list(saved_modules(model)):
        model.set_submodule(path, wrapper.unwrap(adapter if merge else None))
    return model
