"""What a learned update is (the LoRA paper, section 7): how alike two updates' subspaces are, the
singular-value spectrum of dW and its effective rank, and how dW amplifies directions of W.

Every measure works on an `Update`: dW as the (d_out, fan_in) matrix that B @ A adds to; the
matrix whose right-singular vectors span its input subspace (A for LoRA, as in the paper; dW
itself for a full fine-tuning update); and the frozen W0, when it is known. Updates come from an
adapter folder (`adapter_updates`), a model holding an adapter (`model_updates`), or a model
before and after full fine-tuning (`weight_updates`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraError
from ..core.inject import base_of, candidate_modules
from ..io.adapter_files import read_factors
from ..core.layers import DoraAdapter, layer_class_for, lora_layers
from ..core.lowrank import delta_weight

DIRECTIONS = 64  # subspaces are compared over at most this many top directions
FULL_UPDATE_RANK = 8  # amplification of a full update, compared with no LoRA adapter: its top 8 directions
BASES = ("A", "delta")  # what spans a LoRA update's input directions: its A, or dW itself
ENERGY_SHARE = 0.9


@dataclass(frozen=True)
class Update:
    """One module's learned change."""

    path: str
    delta: torch.Tensor  # (d_out, fan_in) float64: dW
    basis: torch.Tensor  # (k, fan_in): its rows span the update's input subspace (A, or dW itself)
    weight: torch.Tensor | None  # (d_out, fan_in) float64: the frozen W0, if known
    rank: int  # r for LoRA; min(d_out, fan_in) for a full update
    kind: str  # "lora", "dora" (m * (W0 + dW) / ||W0 + dW|| - W0: not low-rank, its basis is itself) or "full"


# --- where updates come from -----------------------------------------------------------------------------
def adapter_updates(directory: str | os.PathLike) -> dict[str, Update]:
    """The updates of an adapter folder (lorakit's or PEFT's), without base weights."""
    updates = {}
    for path, (A, B, scale) in read_factors(directory).items():
        a, b = A.reshape(A.shape[0], -1).double(), B.reshape(B.shape[0], -1).double()
        updates[path] = Update(path, delta_weight(a, b, scale), a, None, a.shape[0], "lora")
    return updates


@torch.no_grad()
def model_updates(model: nn.Module, adapter: str = "default") -> dict[str, Update]:
    """The updates of adapter `adapter` in `model`, with each module's frozen weight."""
    updates = {}
    for path, layer in lora_layers(model):
        if not layer.holds(adapter):
            continue
        part = layer.adapters[adapter]
        A, B = (f.double().cpu() for f in part.plain_factors())  # analysed on the CPU; on the user's W0
        weight = layer.as_update_matrix(layer.user_weight).double().cpu()
        if isinstance(part, DoraAdapter):  # what merging adds: W0's rows rescaled too, so dW spans it
            delta = layer.effective_delta(adapter).cpu()
            updates[path] = Update(path, delta, delta, weight, A.shape[0], "dora")
            continue
        delta = delta_weight(A, B, part.scale, layer.groups)
        updates[path] = Update(path, delta, A.reshape(A.shape[0], -1), weight, A.shape[0], "lora")
    if not updates:
        raise LoraError(f"adapter={adapter!r}: the model holds no such adapter; load it first (lk.load_adapter)")
    return updates


@torch.no_grad()
def weight_updates(before: nn.Module, after: nn.Module, targets: tuple[str, ...]) -> dict[str, Update]:
    """W_after - W_before of the modules of `after` whose name or path suffix is in `targets`
    (e.g. ("query", "value")), each found in `before` by the same path or a suffix of it (a
    fine-tuned classifier's `bert.encoder...` is the base's `encoder...`)."""
    earlier = {path: base_of(m) for path, m in candidate_modules(before)}
    updates = {}
    for path, module in candidate_modules(after):
        module = base_of(module)
        cls = layer_class_for(module)
        if cls is None or not any(path == t or path.endswith("." + t) for t in targets):
            continue
        match = next((p for p in _suffixes(path) if p in earlier), None)
        if match is None or earlier[match].weight.shape != module.weight.shape:
            raise LoraError(f"module {path!r} of the fine-tuned model has no counterpart of the same shape in the base "
                            "model; is --base the model that was fine-tuned?")
        w0 = cls.as_update_matrix(earlier[match].weight).double().cpu()
        delta = cls.as_update_matrix(module.weight).double().cpu() - w0
        updates[path] = Update(path, delta, delta, w0, min(delta.shape), "full")
    if not updates:
        raise LoraError(f"targets={list(targets)!r}: match no adaptable module of the fine-tuned model; name modules "
                        "such as query,value or q_proj,v_proj")
    return updates


def _suffixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def pair_paths(first: dict, second: dict) -> list[tuple[str, str]]:
    """Modules present in both (same path, or one path a suffix of the other), in `first`'s order."""
    pairs = []
    for path in first:
        match = path if path in second else next(
            (p for p in second if p.endswith("." + path) or path.endswith("." + p)), None)
        if match is not None:
            pairs.append((path, match))
    return pairs


# --- the measures --------------------------------------------------------------------------------------------
def right_singular_vectors(matrix: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """(k, n): the top-k right-singular vectors of `matrix` as rows, largest singular value first."""
    _, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return vh[:count]


def subspace_similarity(first: torch.Tensor, second: torch.Tensor, directions: int | tuple[int, int] = DIRECTIONS
                        ) -> torch.Tensor:
    """phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j) for i, j = 1.. (at most `directions` each, or
    (for i, for j)), where U_i holds the top-i right-singular vectors of a basis matrix (the paper's
    Figures 3 and 4).

    1: one subspace contains the other; 0: orthogonal. Entry [i - 1, j - 1] is phi(i, j).
    """
    if first.shape[-1] != second.shape[-1]:
        raise LoraError(f"subspaces of different spaces: fan_in {first.shape[-1]} vs {second.shape[-1]}; compare "
                        "updates of the same module")
    most_i, most_j = directions if isinstance(directions, tuple) else (directions, directions)
    v1, v2 = right_singular_vectors(first, most_i), right_singular_vectors(second, most_j)
    overlap = (v1 @ v2.T).square()  # (i, j): squared cosine between singular direction i of one, j of the other
    total = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, v1.shape[0] + 1, dtype=total.dtype)[:, None]
    j = torch.arange(1, v2.shape[0] + 1, dtype=total.dtype)[None, :]
    return total / torch.minimum(i, j)


def random_similarity(i: int, j: int, dimension: int) -> float:
    """The expected phi(i, j) of two independent random subspaces of R^dimension: max(i, j) / dimension."""
    return max(i, j) / dimension


def spectrum(update: Update) -> torch.Tensor:
    """dW's singular values, largest first (a LoRA update's first r; the rest are zero)."""
    values = torch.linalg.svdvals(update.delta)
    return values[: update.rank]


def effective_rank(values: torch.Tensor) -> float:
    """exp(entropy of sigma_k / sum sigma) (Roy and Vetterli, 2007): k for k equal singular values,
    near 1 when one direction dominates."""
    p = values[values > 0].double()
    if p.numel() == 0:
        return 0.0
    p = p / p.sum()
    return math.exp(-(p * p.log()).sum().item())


def energy_rank(values: torch.Tensor, share: float = ENERGY_SHARE) -> int:
    """The fewest directions holding `share` of dW's energy sum(sigma^2) (its squared Frobenius norm)."""
    energy = values.double().square()
    if energy.sum() == 0:
        return 0
    cumulative = energy.cumsum(0) / energy.sum()
    return int((cumulative < share - 1e-12).sum().item()) + 1


def amplification(update: Update, rank: int | None = None, trials: int = 8, seed: int = 0) -> dict:
    """The paper's Table 7: W projected onto dW's top-r directions, ||U^T W V^T||_F, against W's own
    top-r directions and random ones; and the factor ||dW||_F / ||U^T W V^T||_F."""
    if update.weight is None:
        raise LoraError(f"{update.path}: amplification needs the base weights; give the base model (--base)")
    weight, delta = update.weight, update.delta
    r = min(rank or update.rank, *delta.shape)
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    projected = torch.linalg.matrix_norm(u[:, :r].T @ weight @ vh[:r].T).item()
    own = torch.linalg.svdvals(weight)[:r].square().sum().sqrt().item()  # W's top-r directions: sqrt(sum s_k^2)
    generator = torch.Generator().manual_seed(seed)
    randoms = []
    for _ in range(trials):
        q_out = torch.linalg.qr(torch.randn(weight.shape[0], r, generator=generator, dtype=weight.dtype))[0]
        q_in = torch.linalg.qr(torch.randn(weight.shape[1], r, generator=generator, dtype=weight.dtype))[0]
        randoms.append(torch.linalg.matrix_norm(q_out.T @ weight @ q_in).item())
    delta_norm = torch.linalg.matrix_norm(delta).item()
    return {"rank": r, "projected": projected, "own": own, "random": sum(randoms) / trials,
            "weight_norm": torch.linalg.matrix_norm(weight).item(), "delta_norm": delta_norm,
            "factor": delta_norm / projected if projected > 0 else math.inf}


# --- everything at once ----------------------------------------------------------------------------------------
def analyze(updates: dict[str, Update], compare: dict[str, Update] | None = None, rank: int | None = None,
            directions: int = DIRECTIONS, progress=None, basis: str = "A") -> dict:
    """Every measure per module, as plain numbers (JSON-ready): spectrum, effective and 90%-energy
    rank, amplification where W is known, and subspace similarity with `compare` where given.

    basis: the input directions compared, "A" (a LoRA adapter's A, as in the paper) or "delta" (the
    right-singular vectors of dW itself; a full update always uses dW). Amplification uses `rank`
    directions: by default a LoRA update's own rank, and for a full update the rank of the LoRA
    adapter it is compared with (else FULL_UPDATE_RANK).
    """
    if basis not in BASES:
        raise LoraError(f"basis={basis!r}: must be one of {', '.join(BASES)}")
    modules = []
    pairs = dict(pair_paths(updates, compare)) if compare else {}
    for path, update in (progress or (lambda x: x))(list(updates.items())):
        other = compare[pairs[path]] if path in pairs else None
        modules.append(_measure(path, update, other, rank or _default_rank(update, other), directions, basis))
    if compare is not None and not pairs:
        raise LoraError("the two updates share no module; compare adapters of the same model and targets")
    return {"modules": modules, "directions": directions, "energy_share": ENERGY_SHARE, "basis": basis}


def _default_rank(update: Update, other: Update | None) -> int:
    if update.kind in ("lora", "dora"):
        return update.rank
    return other.rank if other is not None and other.kind == "lora" else FULL_UPDATE_RANK


def _measure(path: str, update: Update, other: Update | None, rank: int, directions: int, basis: str) -> dict:
    values = spectrum(update)
    energy = values.square()
    entry = {"path": path, "group": module_group(path), "layer": layer_index(path), "kind": update.kind,
             "rank": update.rank, "shape": list(update.delta.shape),
             "delta_norm": torch.linalg.matrix_norm(update.delta).item(),
             "spectrum": values[:directions].tolist(), "effective_rank": effective_rank(values),
             "energy_rank": energy_rank(values), "top_share": (energy[0] / energy.sum()).item() if energy.sum() > 0 else 0.0}
    if update.weight is not None:
        entry["amplification"] = amplification(update, rank)
    if other is not None:
        # dW of rank r has r meaningful right-singular vectors; the rest span its null space arbitrarily
        first, second = (u.basis if basis == "A" else u.delta for u in (update, other))
        phi = subspace_similarity(first, second, (min(directions, update.rank), min(directions, other.rank)))
        entry["similarity"] = {"with": other.path, "phi": phi.tolist(), "dimension": first.shape[-1]}
    return entry


def module_group(path: str) -> str:
    """The module's kind across layers: its path with block numbers starred (`encoder.layer.*.attention.self.query`)."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", path)


def by_group(modules: list[dict]) -> dict[str, list[dict]]:
    """analyze()'s module entries by kind of module, in order."""
    groups: dict[str, list[dict]] = {}
    for m in modules:
        groups.setdefault(m["group"], []).append(m)
    return groups


def layer_index(path: str) -> int | None:
    """The first number in the path (the transformer block), if any."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(found.group(1)) if found else None
