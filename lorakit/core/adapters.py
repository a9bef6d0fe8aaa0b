"""Adapters on a model beyond naming them: running the base without them, and deleting one.

(Names, the active adapter and switching live in core.identity; merging in core.merge.)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ..errors import LoraError
from .identity import adapters_in, followers, merged_adapter, merged_in, temporarily, unknown_adapter
from .merge import merge_, unmerge_


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: adapters are skipped (modules to save run their original), and a
    merged adapter is taken out meanwhile."""
    merged = merged_adapter(model)
    if merged is not None:
        unmerge_(model)
    try:
        with temporarily([m for _, m in followers(model)], "disabled", True):
            yield model
    finally:
        if merged is not None:
            merge_(model, merged)


def delete_adapter(model: nn.Module, adapter: str) -> dict[str, nn.Module]:
    """Remove adapter `adapter`; layers (and modules to save) left with no adapter become their
    plain base layer (original module) again. Returns its parts by path (LoraAdapters, copies of
    modules to save), off the model: lk.load_adapter(..., reuse=parts) can build the next adapter in them.

    If it was active, no adapter is active afterwards (the model behaves as the base).
    """
    present = followers(model)
    if adapter not in adapters_in(present):
        raise unknown_adapter(model, adapter)
    if merged_in(present) == adapter:
        raise LoraError(f"adapter={adapter!r} is merged into the weights; call lk.unmerge_(model) first")
    parts = {}
    for path, module in present:
        if module.holds(adapter):
            parts[path] = module.drop(adapter)
        if module.active_adapter == adapter:
            module.active_adapter = None
    unwrap_empty_(model, present)
    return parts


def unwrap_empty_(model: nn.Module, present: list[tuple[str, nn.Module]]) -> None:
    """Replace every follower (of `present`, the model's) left without adapters by the plain module it wraps."""
    for path, module in present:
        if module.empty:
            model.set_submodule(path, module.wrapped)
