"""Merging: fold an adapter into the base weights and take it out again, losslessly; or export a
dense merged copy (the only merge a quantized base has).

On a quantized base (int8, nf4) W0 + dW cannot be stored back without re-quantizing it, which
would lose most of what the adapter learned: merge_ and unload_(merge=True) refuse with a
LoraError, unmerged inference stays exact LoRA arithmetic, and merge_dense_ writes
round(dequantize(W0) + dW) into a plain dense model instead.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LoraError
from .identity import active_adapter, adapters, merged_adapter, set_active, unknown_adapter
from .layers import LoraLayer, lora_layers
from .modules_to_save import saved_modules
from .precision import dense_weight, is_quantized, quantized_kind, to_dense_dtype_


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
    _refuse_quantized(model, adapter, "merge_")
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
    if merge and adapter is not None:
        _refuse_quantized(model, adapter, "unload_(merge=True)")
    if not merge:
        unmerge_(model)
    for path, layer in list(lora_layers(model)):
        base = layer.fold(adapter if merge else None)
        model.set_submodule(path, base)
    for path, wrapper in list(saved_modules(model)):
        model.set_submodule(path, wrapper.unwrap(adapter if merge else None))
    return model


def _refuse_quantized(model: nn.Module, adapter: str, verb: str) -> None:
    quantized = [(p, quantized_kind(layer.base_layer)) for p, layer in lora_layers(model)
                 if layer.holds(adapter) and is_quantized(layer.base_layer)]
    if quantized:
        path, kind = quantized[0]
        raise LoraError(
            f"{verb}: {path!r}{f' and {len(quantized) - 1} more' if len(quantized) > 1 else ''} hold a base "
            f"quantized to {kind}; W0 + dW would have to be re-quantized, losing most of the adapter. Run the model unmerged "
            f"(exact LoRA arithmetic on the quantized base), or export a dense merged copy: "
            f"lk.merge_dense_(model, torch.bfloat16) or `lorakit merge --dtype bfloat16`")


@torch.no_grad()
def merge_dense_(model: nn.Module, dtype: torch.dtype = torch.bfloat16, adapter: str | None = None) -> nn.Module:
    """A plain dense model in `dtype` with adapter `adapter` (default: the active one, or none) folded in:
    each adapted layer gets round(W0 + dW), W0 dequantized if quantized, summed in float32 and rounded
    once; other quantized layers are dequantized; modules to save become the adapter's copy. Works on
    any base precision; returns the model, which holds no LoRA layer afterwards."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise LoraError(f"dtype={dtype!r}: a merged export is float32, bfloat16 or float16")
    adapter = merged_adapter(model) or (active_adapter(model) if adapter is None else adapter)
    if adapter is not None and adapter not in adapters(model):
        raise unknown_adapter(model, adapter)
    unmerge_(model)
    for path, layer in list(lora_layers(model)):
        weight = layer.merged_weight(adapter, dtype) if layer.holds(adapter) else layer.user_weight.to(dtype)
        model.set_submodule(path, _dense(layer.base_layer, weight.reshape(_weight_shape(layer))))
    for path, module in list(model.named_modules()):
        if is_quantized(module):
            model.set_submodule(path, _dense(module, dense_weight(module).to(dtype)))
    for path, wrapper in list(saved_modules(model)):
        model.set_submodule(path, wrapper.unwrap(adapter))
    return to_dense_dtype_(model, dtype)


def _weight_shape(layer: LoraLayer) -> tuple[int, ...]:
    base = layer.base_layer
    return (base.out_features, base.in_features) if is_quantized(base) else tuple(base.weight.shape)


def _dense(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """`module` with a dense `weight`: a quantized linear becomes an nn.Linear."""
    if is_quantized(module):
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device="meta")
        dense.bias = None if module.bias is None else nn.Parameter(module.bias.detach().to(weight.dtype))
        dense.weight = nn.Parameter(weight, requires_grad=False)
        return dense.train(module.training)
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    return module
