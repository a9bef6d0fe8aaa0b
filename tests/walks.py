"""Counting walks of a model: every listing of the root module's children is one walk (named_modules,
modules, parameters, children, lorakit's own walks alike), whatever code does it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


class _CountingChildren(dict):
    """A module's `_modules` that counts how often they are listed."""

    listed = 0

    def items(self):
        self.listed += 1
        return super().items()

    def values(self):
        self.listed += 1
        return super().values()


@contextmanager
def counting_walks(model: nn.Module) -> Iterator[_CountingChildren]:
    """Inside, `.listed` of what is yielded counts the walks of `model`; its children are put back after."""
    children = _CountingChildren(model._modules)
    model._modules = children
    try:
        yield children
    finally:
        model._modules = dict(children)
