"""Adapter identity on a model: valid names, which adapters exist, which one is active or merged.

Every module that follows the active adapter (LoRA layers, modules to save) speaks the `Follower`
protocol; everything here reaches them through it, never through their internals.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable, Iterator, Protocol

from torch import nn

from ..errors import LoraError
from .config import LoraConfig
from .layers import LoraLayer
from .modules_to_save import ModuleToSave

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


class Follower(Protocol):
    """A module that follows the model's active adapter and holds one part per adapter (a LoRA layer's
    LoraAdapter, a module to save's copy)."""

    active_adapter: str | None
    disabled: bool
    routing: object  # a mixed.Routing inside lk.mixed_batch, else None

    def holds(self, name: str) -> bool: ...
    def put(self, name: str, part: nn.Module) -> None: ...
    def drop(self, name: str) -> nn.Module: ...
    @property
    def parts(self) -> nn.ModuleDict: ...
    @property
    def empty(self) -> bool: ...
    @property
    def wrapped(self) -> nn.Module: ...


FOLLOWER_TYPES = (LoraLayer, ModuleToSave)
_A_MODULE_DICT = nn.ModuleDict()  # never changed: what a ModuleDict's own attributes are


def check_adapter_name(adapter) -> None:
    if not isinstance(adapter, str) or not ADAPTER_NAME.fullmatch(adapter):
        raise LoraError(
            f"adapter={adapter!r}: an adapter name must be a non-empty string of letters, digits, '_' or '-', "
            "e.g. adapter='default'"
        )
    if hasattr(_A_MODULE_DICT, adapter):
        # Adapters are keys of ModuleDicts, which refuse their own attribute names.
        raise LoraError(f"adapter={adapter!r} is the name of a torch module attribute; pick another name, "
                        f"e.g. adapter='{adapter}_1'")


def surface(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """model.named_modules() without the insides of followers: (path, module) of `model` and of every module
    in it, followers included, depth first in module order.

    A follower's insides are the module it wraps and its adapters' parts, so a walk that skips them costs the
    same however many adapters are loaded. As in named_modules, a module reached twice is listed once, the
    wrapped module of a follower counting as reached.
    """
    seen: set[nn.Module] = set()
    stack = [("", model)]
    while stack:
        path, module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        yield path, module
        if isinstance(module, FOLLOWER_TYPES):
            seen.update(modules_of(module.wrapped))
            continue
        children = module._modules
        if children:  # most modules are leaves
            prefix = path + "." if path else ""
            stack.extend([(prefix + name, child) for name, child in reversed(children.items()) if child is not None])


def modules_of(module: nn.Module) -> Iterable[nn.Module]:
    """module.modules(), quicker for a leaf (what a follower wraps is usually one)."""
    return module.modules() if module._modules else (module,)


def followers(model: nn.Module) -> list[tuple[str, Follower]]:
    """(path, module) of every module that follows the active adapter, in module order."""
    return [(path, m) for path, m in surface(model) if isinstance(m, FOLLOWER_TYPES)]


def adapters(model: nn.Module) -> list[str]:
    """Names of the adapters in the model, in the order they were added."""
    return adapters_in(followers(model))


def adapters_in(present: list[tuple[str, Follower]]) -> list[str]:
    """adapters(model), read from `present`, the model's followers (for a caller that has listed them)."""
    created: dict[str, int] = {}  # not module order: a layer may lack earlier adapters
    for _, module in present:
        if isinstance(module, LoraLayer):
            for name, adapter in module.adapters.items():
                created.setdefault(name, adapter.created)  # one inject_ adds it to every layer at once
    return sorted(created, key=created.__getitem__)


def adapter_config(model: nn.Module, adapter: str) -> LoraConfig:
    """The LoraConfig adapter `adapter` was created (or loaded) with."""
    for _, module in followers(model):
        if isinstance(module, LoraLayer) and module.holds(adapter):
            return module.adapters[adapter].config
    raise unknown_adapter(model, adapter)


def adapter_paths(model: nn.Module, adapter: str) -> list[str]:
    """Module paths that carry a LoRA update of adapter `adapter`."""
    return [path for path, m in followers(model) if isinstance(m, LoraLayer) and m.holds(adapter)]


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model currently applies (None: none, or no adapters)."""
    first = next((m for _, m in surface(model) if isinstance(m, FOLLOWER_TYPES)), None)  # all follow the same one
    return None if first is None else first.active_adapter


def merged_adapter(model: nn.Module) -> str | None:
    """The adapter merged into the base weights, or None."""
    return merged_in(followers(model))


def merged_in(present: list[tuple[str, Follower]]) -> str | None:
    """merged_adapter(model), read from `present`, the model's followers."""
    for _, module in present:
        if isinstance(module, LoraLayer) and module.merged_adapter is not None:
            return module.merged_adapter
    return None


def set_active(model: nn.Module, adapter: str | None) -> None:
    """Make `adapter` the one LoRA layers and modules to save apply (None: none). Swaps a name,
    copies no weights."""
    if adapter is not None and adapter not in adapters(model):
        raise unknown_adapter(model, adapter)
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


def unknown_adapter(model: nn.Module, adapter) -> LoraError:
    known = adapters(model)
    return LoraError(f"adapter={adapter!r} is not in this model; its adapters are {known!r}"
                     + ("" if known else " (add one with lk.inject_ or lk.load_adapter)"))
