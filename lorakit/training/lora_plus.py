"""LoRA+ (Hayou et al., 2024): B learns `ratio` times faster than A, through optimizer parameter groups.

    group       holds                                             learning rate
    lora_A      A of every adapter (embedding adapters aside)     lr
    lora_B      B of every adapter (embedding adapters aside)     lr * ratio
    embedding   A and B of adapters on embeddings                 embedding_lr (PEFT's default, 1e-6)
    other       every other trainable tensor: copies of modules   lr
                to save, biases, a variant's extra parameters

A and B are found through the LoRA layers that hold them (core.layers), never by parameter names.
PEFT's create_loraplus_optimizer differs in two places: it puts every 1-D trainable tensor (biases, a
DoRA magnitude) with B at lr * ratio, and exempts biases and layer norms from weight decay; here they
train at lr with the same weight decay as the rest, as they do without LoRA+.
"""
from __future__ import annotations

import math

from torch import nn

from ..core.identity import adapters, unknown_adapter
from ..core.layers import LoraEmbedding, lora_layers
from ..errors import LoraError, problems_error

EMBEDDING_LR = 1e-6  # PEFT's loraplus_lr_embedding default (from the LoRA+ authors' code)
GROUPS = ("lora_A", "embedding", "lora_B", "other")  # PEFT's order; empty groups are left out


def lora_plus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                     adapter: str | None = None, embedding_lr: float = EMBEDDING_LR) -> list[dict]:
    """Optimizer parameter groups for LoRA+: every trainable tensor of `model` once, B at lr * ratio.

        torch.optim.AdamW(lk.lora_plus_groups(model, lr=2e-4, ratio=16))

    `adapter`: the adapter whose A and B are split (default: every adapter); other trainable tensors,
    another adapter's factors included, go to 'other'. Each group names itself in its "name" key.
    """
    _check(lr, ratio, weight_decay, embedding_lr)
    roles = _factor_roles(model, adapter)
    members: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    for param in model.parameters():  # each shared (tied) tensor once
        if param.requires_grad:
            members[roles.get(id(param), "other")].append(param)
    if not (members["lora_A"] or members["lora_B"] or members["embedding"]):
        raise LoraError(f"lora_plus: no trainable LoRA factors in the model{f' for adapter={adapter!r}' if adapter else ''}; "
                        "LoRA+ sets B's learning rate: inject an adapter first (lk.inject_), or train without LoRA+")
    rates = {"lora_A": lr, "lora_B": lr * ratio, "embedding": embedding_lr, "other": lr}
    return [{"name": name, "params": members[name], "lr": rates[name], "weight_decay": weight_decay}
            for name in GROUPS if members[name]]


def _factor_roles(model: nn.Module, adapter: str | None) -> dict[int, str]:
    """id(parameter) -> 'lora_A', 'lora_B' or 'embedding' for the factors of `adapter` (None: of every adapter)."""
    if adapter is not None and adapter not in adapters(model):
        raise unknown_adapter(model, adapter)
    roles: dict[int, str] = {}
    for _, layer in lora_layers(model):
        embedding = isinstance(layer, LoraEmbedding)
        for name, part in layer.adapters.items():
            if adapter is None or name == adapter:
                roles[id(part.A)] = "embedding" if embedding else "lora_A"
                roles[id(part.B)] = "embedding" if embedding else "lora_B"
    return roles


def _check(lr, ratio, weight_decay, embedding_lr) -> None:
    def positive(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    problems = [f"{name}={value!r}: must be a positive number{hint}" for name, value, hint in (
        ("lr", lr, ", e.g. 2e-4"), ("ratio", ratio, ", e.g. 16 (B learns 16 times faster than A)"),
        ("embedding_lr", embedding_lr, ", e.g. 1e-6")) if not positive(value)]
    if not (positive(weight_decay) or weight_decay == 0):
        problems.append(f"weight_decay={weight_decay!r}: must be a number >= 0")
    if problems:
        raise problems_error("invalid LoRA+ options", problems)
