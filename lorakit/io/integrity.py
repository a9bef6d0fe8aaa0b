"""Is this the right file for this model? A checksum of an adapter file's tensor bytes, and a
fingerprint of the base weights it was trained on."""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..core.layers import LoraLayer
from ..core.precision import dense_weight, precision_of

FINGERPRINT_ENTRIES = 4096
# How far a base in this precision may drift from its float32 original, in units of the weights' RMS:
# the projection moves by about the quantization error (nf4 ~0.1 RMS on Gaussian weights, int8 ~0.01,
# bfloat16 ~0.003); another model moves it by about 1.4 RMS.
TOLERANCE = {"float32": 1e-2, "float16": 1e-2, "bfloat16": 1e-2, "int8": 3e-2, "nf4": 0.3}


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (hex).

    Flipped bytes in a file's data change it; it costs about a millisecond per MB (an adapter is a few MB).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def base_fingerprint(modules: dict[str, nn.Module], paths: list[str]) -> dict[str, list[float]]:
    """Per adapted module: mean, RMS and a fixed random projection of the original base weight,
    all over FINGERPRINT_ENTRIES entries at fixed random positions (a probe, not a checksum: it
    costs microseconds per module, so loading an adapter stays in milliseconds).

    Robust to dtype casts (float32 / bfloat16 / float16 copies of one model agree to ~1e-3 of the
    RMS); a different model (another pretraining, another seed) differs by about the RMS itself.
    `modules` maps a path to the module there (a LoRA layer or the plain layer).
    """
    result = {}
    for path in paths:
        module = modules[path]
        weight = module.original_weight if isinstance(module, LoraLayer) else dense_weight(module)
        w = weight.detach().reshape(-1)
        generator = torch.Generator().manual_seed(0)
        if w.numel() > FINGERPRINT_ENTRIES:
            w = w[torch.randint(w.numel(), (FINGERPRINT_ENTRIES,), generator=generator).to(w.device)]
        w = w.float().cpu()
        probe = torch.randn(w.numel(), generator=generator)
        result[path] = [w.mean().item(), w.square().mean().sqrt().item(), (w @ probe).item() / math.sqrt(w.numel())]
    return result


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
    holder = nn.ModuleList(m.base_layer if isinstance(m, LoraLayer) else m for m in (modules[p] for p in paths))
    return precision_of(holder)
