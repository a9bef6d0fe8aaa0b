"""The arithmetic of combining adapters: the methods, their options, and one module's new A and B.

The task vectors tau_t combined (Ilharco et al., 2023) are, as in PEFT's add_weighted_adapter, either the
factors (linear, ties, dare_linear, dare_ties: A's and B's each combined entrywise, weighted
sqrt(|w_t s_t|), A carrying the sign) or the updates dW_t = s_t B_t A_t (svd and the *_svd methods, whose
result is then truncated to the new rank by SVD); cat stacks the factors, which is exact.

    task arithmetic   sum_t w_t tau_t
    ties              trim each tau_t to its top `density` magnitudes; elect each entry's sign (of the sum,
                      or of the count of signs); mean of the weighted entries of that sign (Yadav et al., 2023)
    dare              drop each entry with p = 1 - density and rescale by 1 / density (Yu et al., 2023);
                      then task arithmetic (dare_linear) or ties' election and mean (dare_ties)

dW comes from core.lowrank.delta_weight. The new adapter's scale is 1 (alpha = rank), as PEFT's.
Factors are handled in their grouped view, a: (g, r/g, fan_in*k), b: (g, d_out/g, r/g), so a grouped
convolution's update stays block-diagonal; g = 1 for every other layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import LoraError, problems_error
from .config import option
from .lowrank import delta_weight

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties")  # entrywise on A and B: one rank needed
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd")  # on dW, then truncated
METHODS = ("svd", "cat", *FACTOR_METHODS, *SVD_METHODS[1:])
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")  # cuSOLVER's, CUDA only


@dataclass(frozen=True)
class CombineConfig:
    """How lk.combine_adapters builds the new adapter; each field is also a `lorakit combine` option."""

    method: str = option("svd", "svd: the weighted sum of the updates, truncated to --rank by SVD; cat: the exact "
                                "weighted sum (ranks add); linear: weighted sums of the A's and of the B's (PEFT's "
                                "definition, not the sum of updates; one rank needed); ties, dare_linear, dare_ties: "
                                "those merges on the A's and B's; *_svd: on the updates, then SVD", choices=METHODS)
    rank: int | None = option(None, "svd methods: the new adapter's rank (default: the largest rank combined)")
    density: float | None = option(None, "ties and dare methods: the fraction of entries kept, in (0, 1], e.g. 0.5")
    majority_sign_method: str = option("total", "ties methods: elect each entry's sign from the sum of the values "
                                                "(total) or the count of signs (frequency)", choices=SIGN_METHODS)
    seed: int | None = option(None, "dare methods: seed of the random drop masks (default: torch's global generator, "
                                    "as PEFT)")
    clamp: float | None = option(None, "svd methods: clamp the new A and B to this quantile of their values, in "
                                       "[0, 1] (PEFT's svd_clamp; default: no clamping)")
    full_matrices: bool = option(False, "svd methods: compute the full SVD, as PEFT does by default (the same "
                                        "truncated result up to rounding; for an embedding, a vocab x vocab matrix)")
    driver: str | None = option(None, "svd methods on CUDA: cuSOLVER's driver (PEFT's svd_driver)",
                                choices=SVD_DRIVERS)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise problems_error("invalid combine options", problems)

    def _problems(self) -> list[str]:
        if self.method not in METHODS:
            return [f"method={self.method!r}: must be one of {', '.join(METHODS)}"]
        p: list[str] = []
        svd, pruned, dare = self.method in SVD_METHODS, self.method.startswith(("ties", "dare")), "dare" in self.method
        for name, applies, kind in (("rank", svd, "the svd methods"), ("clamp", svd, "the svd methods"),
                                    ("driver", svd, "the svd methods"), ("full_matrices", svd, "the svd methods"),
                                    ("density", pruned, "the ties and dare methods"), ("seed", dare, "the dare methods")):
            if getattr(self, name) not in (None, False) and not applies:
                p.append(f"{name}={getattr(self, name)!r}: only {kind} take it, not method={self.method!r}; drop it")
        if self.rank is not None and not (_is_int(self.rank) and self.rank >= 1):
            p.append(f"rank={self.rank!r}: must be a positive integer, e.g. rank=16")
        if pruned and not (_is_number(self.density) and 0 < self.density <= 1):
            p.append(f"density={self.density!r}: method={self.method!r} keeps this fraction of each task vector's "
                     "entries: give a number in (0, 1], e.g. density=0.5")
        if self.majority_sign_method not in SIGN_METHODS:
            p.append(f"majority_sign_method={self.majority_sign_method!r}: must be one of {', '.join(SIGN_METHODS)}")
        if self.seed is not None and not _is_int(self.seed):
            p.append(f"seed={self.seed!r}: must be an integer")
        if self.clamp is not None and not (_is_number(self.clamp) and 0 <= self.clamp <= 1):
            p.append(f"clamp={self.clamp!r}: must be a quantile in [0, 1], e.g. 0.99")
        if self.driver is not None and self.driver not in SVD_DRIVERS:
            p.append(f"driver={self.driver!r}: must be one of {', '.join(SVD_DRIVERS)} (CUDA only)")
        return p


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- task vectors ------------------------------------------------------------------------------------
def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t tau_t."""
    stacked = torch.stack(tensors)  # (T, ...)
    return (stacked * _per_task(weights, stacked)).sum(dim=0)


def trimmed(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """`tensor` with all but its int(density * numel) largest magnitudes set to zero."""
    if density >= 1:
        return tensor
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.reshape(tensor.shape)


def dropped(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability `density` (drawn from `generator`), the kept ones / density."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def elected(stacked: torch.Tensor, sign_method: str) -> torch.Tensor:
    """(T, ...) bool: whether each entry has its position's elected sign (+ on a tie)."""
    signs = stacked.sign()
    mass = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    return signs == torch.where(mass >= 0, 1, -1)


def disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    """The mean, over the task vectors agreeing with the elected sign, of their weighted entries."""
    agree = elected(stacked, sign_method)  # elected on the unweighted vectors, as PEFT
    total = (stacked * _per_task(weights, stacked) * agree).sum(dim=0)
    return total / torch.clamp(agree.sum(dim=0), min=1.0)


def _per_task(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, *[1] * (stacked.dim() - 1))


Merge = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


def task_merge(config: CombineConfig, generator: torch.Generator | None) -> Merge:
    """The method's combination of a list of task vectors with their weights."""
    kind = config.method.removesuffix("_svd")
    density, signs = config.density, config.majority_sign_method
    if kind in ("linear", "svd"):
        return task_arithmetic
    if kind == "ties":
        return lambda ts, w: disjoint_mean(torch.stack([trimmed(t, density) for t in ts]), w, signs)
    if kind == "dare_linear":
        return lambda ts, w: task_arithmetic([dropped(t, density, generator) for t in ts], w)
    assert kind == "dare_ties", kind
    return lambda ts, w: disjoint_mean(torch.stack([dropped(t, density, generator) for t in ts]), w, signs)


# --- one module's new factors ---------------------------------------------------------------------------
Factors = tuple[torch.Tensor, torch.Tensor, float]  # A, B, scale of one adapter on the module
# (update matrix -> the base weight's layout, and back): the layout the *_svd methods merge dW in (PEFT's;
# DARE's masks are drawn entry by entry in it). LoraLayer.to_weight_layout and .as_update_matrix.
Layout = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
AS_IS: Layout = (lambda m: m, lambda m: m)


def combined_factors(factors: list[Factors], weights: list[float], config: CombineConfig, rank: int, groups: int,
                     generator: torch.Generator | None = None, layout: Layout = AS_IS) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's A and B on one module, for scale 1, zero-padded to `rank` (a multiple of groups):
    (rank, *A's tail) and (d_out, rank / groups, *B's tail). `factors`: the adapters the module holds, in the
    order of `weights`. A padded rank changes nothing: the added rows of A and columns of B are zero."""
    A0, B0, _ = factors[0]
    acc = torch.promote_types(A0.dtype, torch.float32)  # computed in float32 at least
    factors = [(A.to(acc), B.to(acc), s) for A, B, s in factors]
    if config.method == "cat":
        a, b = _concatenated(factors, weights, groups)
    elif config.method in SVD_METHODS:
        a, b = _truncated(factors, weights, config, rank // groups, groups, generator, layout)
    else:
        a, b = _entrywise(factors, weights, config, groups, generator)
    extra = rank // groups - a.shape[1]
    a, b = F.pad(a, (0, 0, 0, extra)), F.pad(b, (0, extra))
    return a.reshape(rank, *A0.shape[1:]), b.reshape(B0.shape[0], rank // groups, *B0.shape[2:])


def grouped(A: torch.Tensor, B: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, fan_in, *k), B (d_out, r/g, *ones) -> a (g, r/g, fan_in*k), b (g, d_out/g, r/g)."""
    rank, d_out = A.shape[0], B.shape[0]
    return A.reshape(groups, rank // groups, -1), B.reshape(groups, d_out // groups, rank // groups)


def _concatenated(factors: list[Factors], weights: list[float], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cat: [w_1 s_1 A_1; w_2 s_2 A_2; ...] and [B_1, B_2, ...], so B @ A = sum_t w_t s_t B_t A_t exactly."""
    views = [grouped(A * w * s, B, groups) for (A, B, s), w in zip(factors, weights)]  # PEFT's order of products
    return torch.cat([a for a, _ in views], dim=1), torch.cat([b for _, b in views], dim=2)


def _entrywise(factors: list[Factors], weights: list[float], config: CombineConfig, groups: int,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """linear, ties, dare: the A's merged with weights sign(w s) sqrt(|w s|), the B's with sqrt(|w s|)."""
    scaled = [w * s for (_, _, s), w in zip(factors, weights)]
    device = factors[0][0].device
    weights_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]).to(device)
    weights_b = torch.tensor([math.sqrt(abs(x)) for x in scaled]).to(device)
    merge = task_merge(config, generator)
    A = merge([A for A, _, _ in factors], weights_a)  # all the A's first, then the B's: PEFT's order of draws
    B = merge([B for _, B, _ in factors], weights_b)
    return grouped(A, B, groups)


def _truncated(factors: list[Factors], weights: list[float], config: CombineConfig, rank: int, groups: int,
               generator: torch.Generator | None, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """svd: the merged dW's best rank-`rank` approximation per group, B = U S and A = V^T (the error is the
    discarded spectrum: ||dW - B A||_F^2 = sum of the dropped sigma^2)."""
    to_weight, to_matrix = layout
    updates = [to_weight(delta_weight(A, B, s, groups)) for A, B, s in factors]
    merged = to_matrix(task_merge(config, generator)(updates, torch.tensor(weights).to(updates[0].device)))
    if config.driver is not None and merged.device.type != "cuda":
        raise LoraError(f"driver={config.driver!r}: cuSOLVER's drivers run on CUDA only; drop it on the CPU")
    blocks = merged.reshape(groups, merged.shape[0] // groups, -1)  # (g, d_out/g, fan_in*k)
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=config.full_matrices, driver=config.driver)
    keep = min(rank, S.shape[-1])
    b, a = U[..., :keep] * S[:, None, :keep], Vh[:, :keep]
    if config.clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), config.clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b
