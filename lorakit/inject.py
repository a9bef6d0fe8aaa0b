"""Targeting and injection: which modules a config adapts, and wrapping them in LoRA layers."""
from __future__ import annotations

import difflib
import re

from torch import nn

from .config import ALL_LINEAR, LoraConfig, path_matches
from .errors import LoraError, problems_error
from .layers import LoraConv, LoraConv1D, LoraLayer, LoraLinear, layer_class_for, lora_layers, supported_type_names

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(adapter) -> None:
    if not isinstance(adapter, str) or not ADAPTER_NAME.fullmatch(adapter):
        raise LoraError(
            f"adapter={adapter!r}: an adapter name must be a non-empty string of letters, digits, '_' or '-', "
            "e.g. adapter='default'"
        )


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module a target may name, with LoRA layers standing in for their base layers."""
    found, inside_lora = [], []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, LoraLayer):
            inside_lora.append(path)
        if path:
            found.append((path, module))
    return found


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection (excluded from 'all-linear'), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        head = dict(model.named_modules()).get("lm_head")
    return base_of(head) if head is not None else None


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config` adapts; every problem found is reported in one LoraError."""
    modules = candidate_modules(model)
    head = output_head(model)
    unwrappable = _read_by_weight(modules)
    problems: list[str] = []
    chosen: dict[str, nn.Module] = {}
    for target in config.targets:
        if target == ALL_LINEAR:
            hits = [(p, m) for p, m in modules
                    if is_linear(base_of(m)) and base_of(m) is not head and p not in unwrappable]
        else:
            hits = [(p, m) for p, m in modules if path_matches(p, target)]
        if not hits:
            problems.append(_no_match(target, modules))
        chosen.update(hits)
    chosen = {p: m for p, m in chosen.items() if not any(path_matches(p, ex) for ex in config.exclude)}
    for path, module in chosen.items():
        problems += _module_problems(path, base_of(module), config)
        if path in unwrappable:
            problems.append(f"targets: {path!r} belongs to an nn.MultiheadAttention, which reads its weight "
                            "directly instead of calling it, so an adapter there would do nothing; exclude it")
    if problems:
        raise problems_error("targets", problems)
    if not chosen:
        raise LoraError(f"targets={list(config.targets)!r} with exclude={list(config.exclude)!r} leaves no module to adapt; "
                        "narrow `exclude`")
    order = {path: i for i, (path, _) in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)  # module order, whatever the target order


def _read_by_weight(modules: list[tuple[str, nn.Module]]) -> set[str]:
    """Paths of layers whose parent uses their .weight without calling them (MultiheadAttention)."""
    parents = {p for p, m in modules if isinstance(base_of(m), nn.MultiheadAttention)}
    return {p for p, _ in modules if p.rpartition(".")[0] in parents}


def is_linear(module: nn.Module) -> bool:
    """A linear layer in the 'all-linear' sense: nn.Linear or transformers' Conv1D."""
    return layer_class_for(module) in (LoraLinear, LoraConv1D)


def _no_match(target: str, modules: list[tuple[str, nn.Module]]) -> str:
    names = sorted({p.rsplit(".", 1)[-1] for p, _ in modules} | {p for p, _ in modules})
    close = difflib.get_close_matches(target, names, n=5, cutoff=0.5)
    hint = f"closest module names: {', '.join(close)}" if close else f"module names include: {', '.join(names[:8])}"
    return f"targets: {target!r} matches no module; {hint}"


def _module_problems(path: str, module: nn.Module, config: LoraConfig) -> list[str]:
    cls = layer_class_for(module)
    if cls is None:
        return [
            f"targets: {path!r} is a {type(module).__name__}, which lorakit cannot adapt; "
            f"supported types: {supported_type_names()}. Target its linear sub-layers instead"
        ]
    rank = config.rank_for(path)
    if cls is LoraConv and rank % module.groups:
        return [f"rank for {path!r} is {rank}, but the conv has groups={module.groups}: "
                "the rank must be a multiple of groups (set rank_pattern for this module)"]
    return []


def active_adapter(model: nn.Module) -> str | None:
    """The adapter LoRA layers currently apply (None: none, or no adapters)."""
    for _, layer in lora_layers(model):
        return layer.active_adapter
    return None


def inject_(model: nn.Module, config: LoraConfig, adapter: str = "default") -> list[str]:
    """Add adapter `adapter` to every module `config` targets and freeze the base.

    Wraps each target in a LoRA layer (or extends the one already there), makes only the new
    A/B (plus biases per `config.bias`) trainable, and returns the adapted module paths.
    The first adapter injected becomes active; later ones leave the active adapter as it is.
    """
    if not isinstance(model, nn.Module):
        raise LoraError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise LoraError(f"config: expected lorakit.LoraConfig, got {type(config).__name__}; "
                        "build one with lk.LoraConfig(rank=8, alpha=16, targets=(...))")
    check_adapter_name(adapter)
    existing = {name for _, layer in lora_layers(model) for name in layer.lora_A}
    if adapter in existing:
        raise LoraError(f"adapter={adapter!r} already exists in this model; pick another name "
                        f"or remove it first with lk.delete_adapter(model, {adapter!r})")
    if any(layer.merged_adapter for _, layer in lora_layers(model)):
        raise LoraError("model is merged; call lk.unmerge_(model) before injecting another adapter")
    paths = resolve_targets(model, config)
    active = active_adapter(model) if existing else adapter
    modules = dict(candidate_modules(model))

    _freeze_base(model)
    for path in paths:
        layer = modules[path]
        if not isinstance(layer, LoraLayer):
            layer = layer_class_for(layer)(layer)
            layer.active_adapter = active
            model.set_submodule(path, layer)
        layer.add_adapter(adapter, path, config)
    _unfreeze_biases(model, config, [model.get_submodule(p) for p in paths])
    return paths


def _freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not a LoRA A or B."""
    adapter_params = {id(p) for _, layer in lora_layers(model) for d in (layer.lora_A, layer.lora_B) for p in d.values()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def _unfreeze_biases(model: nn.Module, config: LoraConfig, layers: list[LoraLayer]) -> None:
    if config.bias == "none":
        return
    owners = model.modules() if config.bias == "all" else (layer.base_layer for layer in layers)
    for module in owners:
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                p.requires_grad_(True)
