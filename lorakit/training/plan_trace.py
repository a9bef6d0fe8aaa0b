"""One training step traced on fake tensors: the bytes of every tensor its forward and backward create,
while each is alive, by where in the model the step is; and a deep model's trace from a shallow copy's.

Where the step is: before, in or after the decoder layers, forward and backward (`Trace.peaks`). Within
the layers, the bytes alive grow (forward) or shrink (backward) by the same amount per layer when the
layers are alike, so their peaks lie in the first or the last layer; and each peak, like the bytes
saved for backward, is then linear in the number of layers. A model of many alike layers is therefore
traced with two small counts of them (`SCALED_FROM`) and each term extended to the full count
(`scaled`): exactly what tracing every layer gives (tests/test_plan_trace.py), in a fraction of the time.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .loss import summed_causal_lm_loss

SCALED_FROM = (2, 3)  # layer counts a model with more alike layers is traced with


@dataclass(frozen=True)
class Trace:
    """One forward and backward's bytes, measured: alive at the end of the forward pass (activations
    saved for backward), and their peak in each part of the step, with and without the parameters'
    gradients. A part is (forward|backward, before|first|middle|last|after): where the step is
    relative to the decoder layers (before the first, in the first, ..., after the last)."""

    activations: int
    peaks: dict[tuple[str, str], int]
    peaks_without_gradients: dict[tuple[str, str], int]

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    @property
    def peak_without_gradients(self) -> int:
        return max(self.peaks_without_gradients.values())


def step_trace(model: nn.Module, fake, build: Callable[[object], tuple[nn.Module, object]], batch: int, seq: int,
               bf16: bool) -> Trace:
    """The step traced on `model`; or, where its decoder layers are more than SCALED_FROM's and all alike,
    on the models `build` makes from copies of its config with SCALED_FROM layers, scaled to its count."""
    layers = decoder_layers(model)
    if layers is None or len(layers) <= max(SCALED_FROM) or not _alike(layers, model.config):
        return traced(model, fake, batch, seq, bf16)
    fewer, more = (traced(*build(_with_layers(model.config, count)), batch, seq, bf16) for count in SCALED_FROM)
    return scaled(fewer, more, len(layers))


def traced(model: nn.Module, fake, batch: int, seq: int, bf16: bool) -> Trace:
    """The bytes the forward and backward of a batch of `batch` x `seq` tokens create on `model` (fake,
    built under the fake mode `fake`; its trainable parameters keep the gradient hooks), not the weights."""
    with fake:
        ids = torch.zeros((batch, seq), dtype=torch.long)
    # A full batch's mask is all ones, which transformers drops for the causal kernel: no mask (a fake one,
    # whose values cannot be read, would be expanded to (batch, 1, seq, seq) and key/values copied per head).
    inputs = {"input_ids": ids, "attention_mask": None, "labels": ids}
    counter = LiveBytes()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(counter.gradient_stored)
    layers = decoder_layers(model)
    with fake, counter, _followed(layers or [], counter) as phase:
        loss = summed_causal_lm_loss(model, inputs, bf16, verify=False)
        activations = counter.live
        phase["backward"] = True
        counter.enter(("backward", "after"))
        loss.backward()
    return Trace(activations, counter.peaks, counter.peaks_without_gradients)


def scaled(fewer: Trace, more: Trace, layers: int) -> Trace:
    """The trace of a model of `layers` alike decoder layers, from those of copies with SCALED_FROM layers:
    each term extended linearly. The middle layers' peaks are left out: they lie between the first's and
    the last's."""
    low, high = SCALED_FROM

    def extended(a: int, b: int) -> int:
        return b + (layers - high) * (b - a) // (high - low)

    def peaks(few: dict, many: dict) -> dict:
        return {part: extended(few[part], many[part]) for part in many if part[1] != "middle" and part in few}

    return Trace(extended(fewer.activations, more.activations), peaks(fewer.peaks, more.peaks),
                 peaks(fewer.peaks_without_gradients, more.peaks_without_gradients))


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder layers: the ModuleList of config.num_hidden_layers blocks holding the most
    parameters (None if it has none)."""
    count = getattr(model.config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    return max(lists, key=lambda layers: sum(p.numel() for p in layers.parameters()), default=None)


def _alike(layers: nn.ModuleList, config) -> bool:
    """Whether every decoder layer holds the same modules and tensors (shapes, dtypes, trainable) and
    attends alike (config.layer_types, where a model has them)."""
    def layout(layer: nn.Module) -> list:
        tensors = [*layer.named_parameters(), *layer.named_buffers()]
        return [(n, type(m)) for n, m in layer.named_modules()] + [
            (n, t.shape, t.dtype, t.requires_grad) for n, t in tensors]

    first = layout(layers[0])
    return len(set(getattr(config, "layer_types", None) or [None])) == 1 and all(
        layout(layer) == first for layer in layers)


def _with_layers(config, count: int):
    """A copy of `config` with `count` decoder layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = count
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:count]
    return config


@contextlib.contextmanager
def _followed(layers, counter: "LiveBytes"):
    """Tell `counter` where the step is: hooks on each layer's call (forward) and on the gradients of
    its output and of the first layer's input (backward, as they arrive). Yields the phase to flip to
    backward, after which a layer's call (gradient checkpointing's recomputation) moves nothing."""
    phase = {"backward": False}

    def part(i: int) -> str:
        return "first" if i == 0 else "last" if i == len(layers) - 1 else "middle"

    def entering(i: int):
        def hook(module, args, kwargs):
            if phase["backward"]:
                return
            counter.enter(("forward", part(i)))
            hidden = _first_tensor((args, kwargs))
            if i == 0 and hidden is not None and hidden.requires_grad:
                hidden.register_hook(lambda grad: counter.enter(("backward", "before")))
        return hook

    def leaving(i: int):
        def hook(module, args, kwargs, output):
            if phase["backward"]:
                return
            if i == len(layers) - 1:
                counter.enter(("forward", "after"))
            hidden = _first_tensor(output)
            if hidden is not None and hidden.requires_grad:
                hidden.register_hook(lambda grad: counter.enter(("backward", part(i))))
        return hook

    counter.enter(("forward", "before"))
    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(entering(i), with_kwargs=True),
        layer.register_forward_hook(leaving(i), with_kwargs=True))]
    try:
        yield phase
    finally:
        for handle in handles:
            handle.remove()


def _first_tensor(tree) -> torch.Tensor | None:
    return next((t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)), None)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created under it that are still alive, and their peak; the same by part of
    the step (`enter`), and without the parameters' gradients that `gradient_stored` (a post-accumulate-
    grad hook) is told of.

    A tensor counts once per storage, from the op that creates it until its storage is freed;
    views and in-place results share their input's storage and add nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.gradients = 0
        self.part = None
        self.peaks: dict = {}
        self.peaks_without_gradients: dict = {}
        self._alive: set[int] = set()
        self._gradients: dict[int, int] = {}  # storage -> bytes of a gradient in it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            key = t.untyped_storage()._cdata if isinstance(t, torch.Tensor) else None
            if key is not None and key not in inputs and key not in self._alive:
                self._add(t.untyped_storage())
        return out

    def enter(self, part) -> None:
        """The step moves to `part`: peaks from now on are its."""
        self.part = part
        self._record()

    def gradient_stored(self, param: torch.Tensor) -> None:
        key = param.grad.untyped_storage()._cdata
        if key in self._alive and key not in self._gradients:
            self._gradients[key] = param.grad.numel() * param.grad.element_size()
            self.gradients += self._gradients[key]

    def _record(self) -> None:
        self.peak = max(self.peak, self.live)
        self.peaks[self.part] = max(self.peaks.get(self.part, 0), self.live)
        self.peaks_without_gradients[self.part] = max(self.peaks_without_gradients.get(self.part, 0),
                                                      self.live - self.gradients)

    def _add(self, storage) -> None:
        key, size = storage._cdata, storage.nbytes()
        self._alive.add(key)
        self.live += size
        self._record()
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size
        self.gradients -= self._gradients.pop(key, 0)
