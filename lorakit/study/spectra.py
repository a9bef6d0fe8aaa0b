"""The pretrained weights' own rank: singular-value spectra of W0 per layer type (q, k, v, o, MLP up/down/gate),
their effective and 90%-energy rank (analysis.measures), averaged over the transformer blocks."""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from ..analysis.measures import effective_rank, energy_rank
from ..core.inject import base_of, candidate_modules
from ..core.targets import default_targets, path_matches
from ..zoo import load_model

SPECTRUM_POINTS = 64  # singular values kept per type for the figure (normalised by the largest)


def layer_type(path: str) -> str:
    """A module's type across blocks: its path after the block number (`attention.output.dense`,
    `output.dense`, `self_attn.q_proj`), or the whole path outside the blocks."""
    return re.split(r"\.\d+\.", path, maxsplit=1)[-1]


@torch.no_grad()
def weight_spectra(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, dict]:
    """layer type -> shape, mean effective rank, mean 90%-energy rank (over blocks) and the mean normalised
    spectrum, for every linear module whose path matches one of `patterns`."""
    values: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for path, module in candidate_modules(model):
        module = base_of(module)
        if not isinstance(module, nn.Linear) or not any(path_matches(path, p) for p in patterns):
            continue
        kind = layer_type(path)
        values.setdefault(kind, []).append(torch.linalg.svdvals(module.weight.detach().double()))
        shapes[kind] = tuple(module.weight.shape)
    return {kind: _summary(spectra, shapes[kind]) for kind, spectra in values.items()}


def _summary(spectra: list[torch.Tensor], shape: tuple[int, int]) -> dict:
    effective = [effective_rank(s) for s in spectra]
    energy = [energy_rank(s) for s in spectra]
    normalised = np.mean([(s / s[0]).numpy() for s in spectra], axis=0)
    points = np.linspace(0, len(normalised) - 1, min(SPECTRUM_POINTS, len(normalised))).round().astype(int)
    full = min(shape)
    return {"shape": list(shape), "blocks": len(spectra), "full_rank": full,
            "effective_rank": float(np.mean(effective)), "effective_rank_share": float(np.mean(effective)) / full,
            "energy_rank_90": float(np.mean(energy)), "energy_rank_share": float(np.mean(energy)) / full,
            "spectrum_index": points.tolist(), "spectrum": normalised[points].tolist()}


def arm_types(model: nn.Module, arms: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """arm name -> the layer types its target patterns adapt."""
    paths = [path for path, module in candidate_modules(model) if isinstance(base_of(module), nn.Linear)]
    return {name: sorted({layer_type(p) for p in paths if any(path_matches(p, t) for t in targets)})
            for name, targets in arms.items()}


def model_spectra(model_name: str, arms: dict[str, tuple[str, ...]]) -> dict:
    """{"types": weight_spectra over every arm's targets, "arms": arm_types} of a bundled model or folder."""
    model, _ = load_model(model_name)
    arms = {name: targets or default_targets(model) or () for name, targets in arms.items()}
    patterns = tuple(t for targets in arms.values() for t in targets)
    return {"types": weight_spectra(model, patterns), "arms": arm_types(model, arms)}
