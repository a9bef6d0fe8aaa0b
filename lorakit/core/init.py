"""Initialisations that take the adapter's start out of the base weight (PiSSA, OLoRA), and the plain LoRA
that such an adapter equals on the user's original base.

    W0 = W_res + s * B0 @ A0        at injection: the layer's base weight becomes W_res
    W_res + s * B @ A = W0 + dW     after training, with dW = s * (B @ A - B0 @ A0) = s * B' @ A'
    A' = [A; A0] (2r, d_in),  B' = [B, -B0] (d_out, 2r)

PiSSA (Meng et al., 2024): W0 = U S V^T; A0 = sqrt(S_r / s) V_r^T, B0 = U_r sqrt(S_r / s).
OLoRA (Büyükakyüz, 2024): W0 = Q R; B0 = Q[:, :r], A0 = R[:r].
Matrices here are (d_out, d_in), the layout B @ A adds to (LoraLayer.as_update_matrix); the products
come from core.lowrank.delta_weight, like every other dW.
"""
from __future__ import annotations

import math

import torch

from .config import RESIDUAL_INITS, LoraConfig
from .lowrank import delta_weight

RANDOMIZED_SVD_SEED = 0  # init_niter > 0: the randomized SVD's test matrix is drawn from this seed, every time


@torch.no_grad()
def principal_factors(weight: torch.Tensor, rank: int, scale: float, init: str,
                      niter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, d_in), B0 (d_out, r)) in float32 with scale * B0 @ A0 the part of `weight` (d_out, d_in) that
    `init` ('pissa' or 'olora') starts the adapter from; the same numbers for the same weight, every call."""
    matrix = weight.detach().float()
    if init == "olora":
        Q, R = torch.linalg.qr(matrix)
        return R[:rank].contiguous(), Q[:, :rank].contiguous()
    if init != "pissa":
        raise ValueError(f"init={init!r}: principal_factors computes {' or '.join(map(repr, RESIDUAL_INITS))}")
    if niter:
        devices = [matrix.device] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # deterministic (resume recomputes it); global RNG untouched
            torch.manual_seed(RANDOMIZED_SVD_SEED)
            U, S, V = torch.svd_lowrank(matrix, q=rank, niter=niter)
        Vh = V.t()
    else:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(S[:rank] / scale)  # (r,): the singular values shared between A and B
    return (root[:, None] * Vh[:rank]).contiguous(), (U[:, :rank] * root).contiguous()


@torch.no_grad()
def residual_weight(weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scale: float) -> torch.Tensor:
    """W_res = W0 - scale * B0 @ A0, computed in float32 (at least) and rounded once to W0's dtype."""
    delta = delta_weight(A0, B0, scale)
    return (weight.to(delta.dtype) - delta).to(weight.dtype)


@torch.no_grad()
def restored_weight(residual: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 back from W_res: W_res + scale * B0 @ A0 summed in float64, rounded once to W_res's dtype.

    W0 to the rounding W_res took when it was formed (half a unit in the last place of W_res): exact where
    W_res is no larger than W0, about 80% of a float32 weight's entries (core.init's tests).
    """
    delta = delta_weight(A0, B0, scale)  # the very dW residual_weight subtracted
    return (residual.double() + delta.double()).to(residual.dtype)


def plain_factors(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor,
                  B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = ([A; A0], [B, -B0]): the rank-2r plain LoRA whose dW on the original W0 is what A, B do on W_res
    (PEFT's conversion, LoraModel.subtract_mutated_init)."""
    return torch.cat([A, A0.to(A.dtype)], dim=0), torch.cat([B, -B0.to(B.dtype)], dim=1)


def plain_config(config: LoraConfig) -> LoraConfig:
    """The config of plain_factors' adapter: every rank doubled, every alpha raised so the scale stays
    (x2, or x sqrt(2) with rslora), init 'default'. `config` itself where its init leaves W0 alone.

    PEFT (save_pretrained with path_initial_model_for_weight_conversion) does the same, but refuses rslora with
    rank or alpha patterns; here each pattern keeps its module's scale.
    """
    if config.init not in RESIDUAL_INITS:
        return config
    factor = math.sqrt(2) if config.rslora else 2.0
    return config.replace(rank=2 * config.rank, alpha=config.alpha * factor, init="default", init_niter=0,
                          rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                          alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})
