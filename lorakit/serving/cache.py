"""An in-memory LRU cache of adapters for one frozen base that serves many tasks.

    cache = lk.AdapterCache(model, capacity=8)
    cache.register_many({"sql": "adapters/sql", "chat": "adapters/chat"})  # hundreds: loads nothing
    with cache.batch(["sql", "chat", None, "sql"]):  # loads what is missing, then one mixed batch
        out = model(input_ids)                      # example i through adapter names[i]; None = base

At most `capacity` adapters are resident on the model; loading one more deletes the least
recently used. Adapters in use (named by the current call or its `keep`, or held by an enclosing
`batch` or `hold`) are never evicted.

    with cache.hold(["sql", "chat"]):               # loaded and pinned, no mixed batch: the caller routes
        ...
    cache.ensure(["chat"], keep=["sql"])            # load "chat"; evict anything but "chat" and "sql"
"""
from __future__ import annotations

import os
import time
from collections import Counter, OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from torch import nn

from ..core.adapters import delete_adapter
from ..core.identity import active_adapter, adapter_paths, adapters, check_adapter_name, set_active
from ..core.layers import LoraLayer
from ..errors import LoraError, problems_error
from ..io.adapter_files import check_adapter_directory, load_adapter
from ..core.mixed import mixed_batch

SHOWN_NAMES = 20  # an error lists at most this many registered names


class AdapterCache:
    """Registered adapter folders by name; the most recently used `capacity` of them loaded on `model`.

    register / register_many: name -> folder, loading nothing. ensure(names, keep=()): load the named adapters
    that are missing, evicting the least recently used ones but never those named, in `keep`, or held.
    hold(names): ensure, then pin the names until the block ends. batch(names): hold, and a mixed batch inside.
    A miss evicts one adapter and builds the next in its modules (lk.load_adapter's `reuse`): its cost stays
    flat however many adapters cycle through.
    """

    def __init__(self, model: nn.Module, capacity: int = 8) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise LoraError(f"capacity={capacity!r}: must be a positive integer, the most adapters kept loaded, e.g. 8")
        self.model = model
        self.capacity = capacity
        self._directories: dict[str, Path] = {}
        # least recently used first; each with a LoRA layer it was loaded into, (path, layer), or None
        self._resident: OrderedDict[str, tuple[str, nn.Module] | None] = OrderedDict()
        self._in_use: Counter[str] = Counter()  # names held by open batch() and hold() blocks
        self._load_times: dict[str, float] = {}
        self.hits = self.misses = self.evictions = 0

    # --- registering: checks folders, loads nothing --------------------------------------------------
    def register(self, name: str, directory: str | os.PathLike) -> None:
        """Make adapter folder `directory` available as `name`; it is loaded when first used."""
        self.register_many({name: directory})

    def register_many(self, mapping: Mapping[str, str | os.PathLike]) -> None:
        """register() each name -> folder; all or none: every problem is reported together."""
        if not isinstance(mapping, Mapping):
            raise LoraError(f"mapping={type(mapping).__name__}: give a dict of adapter name -> adapter folder")
        problems, checked, on_model = [], {}, set(adapters(self.model))
        for name, directory in mapping.items():
            try:
                check_adapter_name(name)
                checked[name] = check_adapter_directory(directory)
            except LoraError as err:
                problems.append(f"{name!r}: {err}")
                continue
            if name not in self._directories and name in on_model:
                problems.append(f"{name!r}: the model already has an adapter {name!r} that this cache did not load; "
                                f"register another name, or lk.delete_adapter(model, {name!r}) first")
            elif name in self._in_use and self._directories[name] != checked[name]:
                problems.append(f"{name!r}: in use by an open cache.batch() or cache.hold(); register its new folder "
                                "after the block")
        if problems:
            raise problems_error("register", problems)
        for name, directory in checked.items():
            if self._directories.get(name, directory) != directory:
                self._forget(name)  # a new folder for an old name: the next use loads the new one
            self._directories[name] = directory

    def unregister(self, name: str) -> None:
        """Forget `name`: deleted from the model if loaded; refused while an open batch() uses it."""
        if name not in self._directories:
            raise LoraError(f"adapter {name!r} is not registered; registered: {self._shown_names()}")
        if name in self._in_use:
            raise LoraError(f"adapter {name!r} is in use by an open cache.batch(); unregister it after the block")
        self._forget(name)
        del self._directories[name]

    def registered(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self._directories)

    # --- loading and evicting ------------------------------------------------------------------------
    def ensure(self, names: Sequence[str | None], keep: Iterable[str | None] = ()) -> None:
        """Load every named adapter not yet resident (None: the base, nothing to load), evicting the least
        recently used ones; the named adapters become the most recently used, in order.

        Never evicted: the named adapters, those in `keep` (e.g. the adapters of requests still running), and
        those held by an open batch() or hold() block.
        """
        needed, kept = self._check_names(names, keep)
        self._forget_deleted()
        self._check_fits(needed, kept)
        pinned = set(needed) | kept | set(self._in_use)
        for name in needed:
            if name in self._resident:
                self.hits += 1
            else:
                self.misses += 1
                self._load(name, reuse=self._make_room(pinned))
            self._resident.move_to_end(name)

    @contextmanager
    def hold(self, names: Sequence[str | None]) -> Iterator[nn.Module]:
        """ensure(names), then keep the named adapters loaded (not evicted) until the block ends; yields the
        model. For a caller that routes examples to adapters itself; blocks nest, each holding its own names."""
        self.ensure(names)
        held = Counter(n for n in dict.fromkeys(names) if n is not None)
        self._in_use.update(held)
        try:
            yield self.model
        finally:
            self._in_use.subtract(held)
            self._in_use = +self._in_use  # drop zero counts

    @contextmanager
    def batch(self, names: Sequence[str | None]) -> Iterator[nn.Module]:
        """hold(names), and inside it lk.mixed_batch(model, names): example i of the batch through adapter names[i].

        The named adapters stay loaded (are not evicted) until the block ends.
        """
        with self.hold(names), mixed_batch(self.model, names) as model:
            yield model

    def loaded(self) -> list[str]:
        """The resident adapters, least recently used first."""
        return list(self._resident)

    @property
    def load_times(self) -> dict[str, float]:
        """Seconds the latest load of each adapter took (adapters never loaded are absent)."""
        return dict(self._load_times)

    def stats(self) -> dict:
        """Counters for monitoring: hits, misses, evictions, what is resident and the load times."""
        return {"capacity": self.capacity, "registered": len(self._directories), "resident": self.loaded(),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "load_seconds": self.load_times}

    def _check_names(self, names: Sequence[str | None], keep: Iterable[str | None]) -> tuple[list[str], set[str]]:
        """(the distinct adapter names of a call, in first-use order; the names it keeps), once all are known."""
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise LoraError(f"names={names!r}: give a list with one adapter name (or None for the base) per example")
        if isinstance(keep, str) or not isinstance(keep, Iterable):
            raise LoraError(f"keep={keep!r}: give a list of adapter names that must stay loaded")
        kept = {n for n in keep if n is not None}
        unknown = sorted({n for n in names if n is not None and n not in self._directories}, key=str)
        unknown_kept = sorted(kept - set(self._directories), key=str)
        if unknown or unknown_kept:
            field = "names" if unknown else "keep"
            raise LoraError(f"{field}: unknown adapter(s) {unknown or unknown_kept!r}; registered: "
                            f"{self._shown_names()}. Register a name first with cache.register(name, directory)")
        return [n for n in dict.fromkeys(names) if n is not None], kept

    def _check_fits(self, needed: list[str], kept: set[str]) -> None:
        """The call's adapters fit beside those that must stay: held by open blocks, or kept and resident."""
        held = set(self._in_use) - set(needed)
        kept = {n for n in kept if n in self._resident} - set(needed) - held
        total = len(needed) + len(held) + len(kept)
        if total > self.capacity:
            more = (f", {len(held)} more held by an open batch() or hold()" if held else "") + \
                   (f", {len(kept)} more in keep" if kept else "")
            raise LoraError(f"capacity={self.capacity}: this call needs {len(needed)} different adapters at once"
                            f"{more}; use AdapterCache(model, capacity={total}) or more, or split the batch")

    def _shown_names(self) -> str:
        names = list(self._directories)
        if not names:
            return "none"
        more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
        return ", ".join(names[:SHOWN_NAMES]) + more

    def _make_room(self, pinned: set[str]) -> dict[str, nn.Module]:
        """Evict least recently used adapters outside `pinned` until one more fits; returns the parts of the
        last one evicted (none: {}), for the next load to be built in."""
        parts = {}
        while len(self._resident) >= self.capacity:
            victim = next(n for n in self._resident if n not in pinned)  # exists: _check_fits bounded pinned
            del self._resident[victim]
            parts = delete_adapter(self.model, victim)  # on the model: ensure() dropped any deleted behind our back
            self.evictions += 1
        return parts

    def _load(self, name: str, reuse: dict[str, nn.Module]) -> None:
        """lk.load_adapter as `name`, built in `reuse` (an evicted adapter's parts), timed; the model's active
        adapter is left as it was."""
        active = active_adapter(self.model)
        start = time.perf_counter()
        load_adapter(self.model, self._directories[name], adapter=name, reuse=reuse)
        self._load_times[name] = time.perf_counter() - start
        self._resident[name] = self._holder(name, list(reuse)[:1] or adapter_paths(self.model, name)[:1])
        if active != active_adapter(self.model):  # the first adapter injected becomes active
            set_active(self.model, active)

    def _forget_deleted(self) -> None:
        """Drop resident adapters deleted behind our back. The model is walked only if one of them is no longer
        in the LoRA layer it was loaded into."""
        if all(holder is not None and self._holder(name, [holder[0]]) == holder
               for name, holder in self._resident.items()):
            return
        on_model = set(adapters(self.model))
        for name in [n for n in self._resident if n not in on_model]:
            del self._resident[name]

    def _holder(self, name: str, paths: list[str]) -> tuple[str, nn.Module] | None:
        """(path, layer) of the first of `paths` where the model has a LoRA layer holding adapter `name`."""
        for path in paths:
            try:
                layer = self.model.get_submodule(path)
            except AttributeError:  # the model changed behind our back
                continue
            if isinstance(layer, LoraLayer) and layer.holds(name):
                return path, layer
        return None

    def _forget(self, name: str) -> None:
        """Delete `name` from the model if resident."""
        if name in self._resident:
            del self._resident[name]
            if name in adapters(self.model):
                delete_adapter(self.model, name)
