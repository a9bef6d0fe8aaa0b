"""Is this the right file for this model? A checksum of an adapter file's tensor bytes, and a
fingerprint of the base weights it was trained on."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import threading
import weakref
from typing import Callable

import torch
from torch import nn

from ..core.identity import modules_of
from ..core.layers import LoraLayer
from ..core.precision import dense_weight, precision_among

FINGERPRINT_ENTRIES = 4096
# Weights are probed together in blocks of at most this many entries: torch runs an operation that small on one
# thread, so it never waits for a second thread on a core that other work holds (milliseconds on a shared CPU).
SERIAL_ENTRIES = 16384
SPOT_CHECKS = 8  # entries of a weight read again to confirm its remembered fingerprint (_Remembered)
# How far a base in this precision may drift from its float32 original, in units of the weights' RMS:
# the projection moves by about the quantization error (nf4 ~0.1 RMS on Gaussian weights, int8 ~0.01,
# bfloat16 ~0.003); another model moves it by about 1.4 RMS.
TOLERANCE = {"float32": 1e-2, "float16": 1e-2, "bfloat16": 1e-2, "int8": 3e-2, "nf4": 0.3}


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (hex).

    Flipped bytes in a file's data change it; it costs about a millisecond per MB (an adapter is a few MB).
    """
    return hashlib.sha256(_checksummed(tensors)).hexdigest()


def checksum_started(tensors: dict[str, torch.Tensor]) -> Callable[[], str]:
    """tensor_checksum(tensors), hashed on a thread of its own while the caller goes on; call the result for
    the digest (it waits for the thread). The bytes are copied first, so the tensors may change meanwhile.

    hashlib lets go of the GIL while it hashes one long buffer: on a machine with a core to spare the hash
    (the largest single cost of loading an adapter) runs beside the caller's Python.
    """
    data, outcome = _checksummed(tensors), []

    def work() -> None:
        try:
            outcome.append(hashlib.sha256(data).hexdigest())
        except BaseException as err:  # handed to the caller
            outcome.append(err)

    worker = threading.Thread(target=work, name="lorakit-checksum", daemon=True)
    worker.start()

    def digest() -> str:
        worker.join()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]
    return digest


def _checksummed(tensors: dict[str, torch.Tensor]) -> bytes:
    """What tensor_checksum hashes: each tensor's name, dtype, shape and bytes, in name order, in one buffer."""
    parts = []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        parts += [f"{name}|{t.dtype}|{list(t.shape)}|".encode(), _raw(t)]
    return b"".join(parts)


def _raw(t: torch.Tensor):
    """A contiguous CPU tensor's bytes, not copied."""
    try:
        return t.numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16): the same bytes as uint8
        return t.reshape(-1).view(torch.uint8).numpy()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf.

    A float sum is finite only if every term is, so one sum per tensor clears it; the few whose sum is not
    (an overflow, or a real NaN / Inf) are checked entry by entry.
    """
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return []
    sums = torch.stack([t.sum() for t in floats.values()])
    suspects = [k for k, finite in zip(floats, torch.isfinite(sums).tolist()) if not finite]
    return [k for k in suspects if not torch.isfinite(floats[k]).all()]


def base_fingerprint(modules: dict[str, nn.Module], paths: list[str]) -> dict[str, list[float]]:
    """Per adapted module: mean, RMS and a fixed random projection of the user's base weight (LoraLayer.user_weight:
    no adapter merged, a PiSSA/OLoRA start put back),
    all over FINGERPRINT_ENTRIES entries at fixed random positions (a probe, not a checksum: it
    costs microseconds per module, so loading an adapter stays in milliseconds).

    Robust to dtype casts (float32 / bfloat16 / float16 copies of one model agree to ~1e-3 of the
    RMS); a different model (another pretraining, another seed) differs by about the RMS itself.
    `modules` maps a path to the module there (a LoRA layer or the plain layer). A weight's numbers
    are remembered while the weight stays unchanged (_Remembered), so a server loading adapter after
    adapter onto one base probes each weight once.
    """
    weights = {path: (m.user_weight if isinstance(m, LoraLayer) else dense_weight(m))
               for path, m in ((p, modules[p]) for p in paths)}
    known = {path: _recall(weight) for path, weight in weights.items()}
    probed = _probe_weights({path: w.detach() for path, w in weights.items() if known[path] is None})
    for path, values in probed.items():
        _remember(weights[path], values)
    return {path: known[path] or probed[path] for path in paths}


def _probe_weights(weights: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """The fingerprint numbers of each weight; weights of one size on one device are probed together, a few
    tensor operations per block of SERIAL_ENTRIES entries."""
    groups: dict[tuple[int, torch.device], dict[str, torch.Tensor]] = {}
    for path, weight in weights.items():
        groups.setdefault((weight.numel(), weight.device), {})[path] = weight
    result = {}
    for (numel, device), group in groups.items():
        positions, probe, _ = _probe(numel, device)
        samples = [(w.reshape(-1) if positions is None else w.reshape(-1).index_select(0, positions)).float()
                   for w in group.values()]
        step = max(1, SERIAL_ENTRIES // probe.numel())  # rows per block
        for i in range(0, len(samples), step):
            rows = torch.stack(samples[i:i + step])  # (modules, entries)
            projection = rows @ probe / math.sqrt(probe.numel())
            stats = torch.stack([rows.mean(1), rows.square().mean(1).sqrt(), projection], 1)
            result.update(zip(list(group)[i:i + step], stats.tolist()))
    return result


@functools.lru_cache(maxsize=64)
def _probe(numel: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(the positions sampled from a weight of `numel` entries, None: all of them; the projection vector; the
    first SPOT_CHECKS of those positions), drawn from a generator seeded 0: the same for every weight of that
    size, in every process."""
    generator = torch.Generator().manual_seed(0)
    sampled = numel > FINGERPRINT_ENTRIES
    positions = torch.randint(numel, (FINGERPRINT_ENTRIES,), generator=generator) if sampled else None
    probe = torch.randn(FINGERPRINT_ENTRIES if sampled else numel, generator=generator)
    spots = positions[:SPOT_CHECKS] if sampled else torch.arange(min(SPOT_CHECKS, numel))
    return (positions.to(device) if sampled else None), probe.to(device), spots.to(device)


# --- remembering a weight's fingerprint -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Remembered:
    """A weight's fingerprint numbers, and what shows the weight unchanged since: the same tensor object, storage,
    layout and version (autograd counts every in-place write to it), and the same values at SPOT_CHECKS of the
    probed positions (for writes through `.data`, which the version does not count)."""

    weight: weakref.ref
    state: tuple
    positions: torch.Tensor  # of the spot checks
    spots: torch.Tensor  # the values there
    values: list[float]


_REMEMBERED: dict[int, _Remembered] = {}  # id(weight) -> its numbers; an entry goes when its weight does


def _state(weight: torch.Tensor) -> tuple:
    return (weight._version, weight.data_ptr(), weight.dtype, weight.shape, weight.stride(), weight.storage_offset(),
            weight.device)


def _spots(weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(-1).index_select(0, positions)  # detached: no graph holds the weight


def _recall(weight: torch.Tensor) -> list[float] | None:
    """The remembered numbers of `weight`, if it is unchanged since; else None."""
    entry = _REMEMBERED.get(id(weight))
    if entry is None or entry.weight() is not weight or entry.state != _state(weight):
        return None
    return entry.values if torch.equal(_spots(weight, entry.positions), entry.spots) else None


def _remember(weight: torch.Tensor, values: list[float]) -> None:
    key = id(weight)
    ref = weakref.ref(weight, lambda _: _REMEMBERED.pop(key, None))  # the entry goes when the weight does
    positions = _probe(weight.numel(), weight.device)[2]
    _REMEMBERED[key] = _Remembered(ref, _state(weight), positions, _spots(weight, positions), values)


def fingerprint_problems(saved: dict, current: dict, precisions: tuple[str, ...] = ("float32",)) -> list[str]:
    """Paths whose saved fingerprint differs from the current base's beyond the rounding of the coarsest
    of `precisions` (the saved base's and the current one's)."""
    bad = []
    relative = max(TOLERANCE.get(p, max(TOLERANCE.values())) for p in precisions)
    for path, (mean, rms, proj) in saved.items():
        if path not in current:
            continue
        c_mean, c_rms, c_proj = current[path]
        tol = relative * max(rms, c_rms, 1e-12)
        if abs(mean - c_mean) > tol or abs(rms - c_rms) > tol or abs(proj - c_proj) > tol:
            bad.append(path)
    return bad


def is_fingerprint(value) -> bool:
    """A fingerprint as stored: {path: [mean, rms, projection]} of finite numbers."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, list) and len(v) == 3
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        for k, v in value.items())


def modules_precision(modules: dict[str, nn.Module], paths: list[str]) -> str:
    """The precision of the base under the adapted modules at `paths` (as core.precision.precision_of)."""
    bases = (m.base_layer if isinstance(m, LoraLayer) else m for m in (modules[p] for p in paths))
    return precision_among(m for base in bases for m in modules_of(base))
