"""Targeting and injection: which modules a config adapts or saves, and wrapping them."""
from __future__ import annotations

import difflib
from typing import Mapping

import torch
from torch import nn

from ..errors import LoraError, problems_error
from .config import RESIDUAL_INITS, LoraConfig
from .identity import FOLLOWER_TYPES, adapters, check_adapter_name, modules_of, surface
from .layers import (LoraAdapter, LoraConv, LoraConv1D, LoraLayer, LoraLinear, ResidualAdapter, layer_class_for,
                     supported_type_names)
from .modules_to_save import CONTAINERS, ModuleToSave, trainable_copy
from .precision import is_quantized
from .targets import ALL_LINEAR, default_targets, model_type, path_matches, paths_matching

def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module a target may name, with LoRA layers and modules to save standing in for the
    module they wrap."""
    return [(path, module) for path, module in surface(model) if path]


def base_of(module: nn.Module) -> nn.Module:
    if isinstance(module, ModuleToSave):
        return module.original_module
    return module.base_layer if isinstance(module, LoraLayer) else module


def output_head(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> nn.Module | None:
    """The model's output projection (excluded from 'all-linear'), if it has one; `modules` is
    candidate_modules(model)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        head = dict(modules).get("lm_head")
    return base_of(head) if head is not None else None


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config` adapts; every problem found (in modules_to_save too) is
    reported in one LoraError."""
    return resolve(model, config, candidate_modules(model))[0]


def resolve_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules `config` trains in full, one copy per adapter (problems as resolve_targets)."""
    return resolve(model, config, candidate_modules(model))[1]


def resolve(model: nn.Module, config: LoraConfig, modules: list[tuple[str, nn.Module]]) -> tuple[list[str], list[str]]:
    """(LoRA target paths, module-to-save paths), both in module order; `modules` is candidate_modules(model)."""
    head = output_head(model, modules)
    unwrappable = _read_by_weight(modules)
    saved, saved_problems = _resolve_saved(modules, config)
    whole = set(saved) | {p for p, m in modules if isinstance(m, ModuleToSave)}  # trained in full, never LoRA
    problems: list[str] = []
    chosen: dict[str, nn.Module] = {}
    targets, by_path = _targets(model, config, modules), dict(modules)
    matched = paths_matching(list(by_path), [t for t in targets if t != ALL_LINEAR])
    for target in targets:
        if target == ALL_LINEAR:
            hits = [(p, m) for p, m in modules if is_linear(base_of(m)) and base_of(m) is not head
                    and p not in unwrappable and p not in whole]
        else:
            hits = [(p, by_path[p]) for p in matched[target]]
        if not hits:
            problems.append(_no_match(target, modules))
        chosen.update(hits)
    chosen = {p: m for p, m in chosen.items() if not any(path_matches(p, ex) for ex in config.exclude)}
    for path, module in chosen.items():
        problems += _module_problems(path, base_of(module), config)
        if path in unwrappable:
            problems.append(f"targets: {path!r} belongs to an nn.MultiheadAttention, which reads its weight "
                            "directly instead of calling it, so an adapter there would do nothing; exclude it")
    problems += _unused_patterns(config, list(chosen))
    saved_problems += _overlap_problems(modules, list(chosen), saved)
    if problems or saved_problems:
        raise problems_error("targets and modules_to_save" if saved_problems else "targets", problems + saved_problems)
    if not chosen:
        raise LoraError(f"targets={list(_targets(model, config, modules))!r} with exclude={list(config.exclude)!r} leaves no module to adapt; "
                        "narrow `exclude`")
    order = {path: i for i, (path, _) in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__), saved  # module order, whatever the target order


def _targets(model: nn.Module, config: LoraConfig, modules: list[tuple[str, nn.Module]]) -> tuple[str, ...]:
    """config.targets, or the architecture's default where the config names none."""
    if config.targets is not None:
        return config.targets
    found = default_targets(model)
    if found is None:
        kind = f"model type {model_type(model)!r}" if model_type(model) else f"a plain {type(model).__name__}"
        raise LoraError(f"targets=None: lorakit knows no default targets for {kind}; name the modules to adapt, "
                        f"e.g. targets=('{ALL_LINEAR}',); adaptable module names: {', '.join(adaptable_names(modules)[:12])}")
    return found


def adaptable_names(modules: list[tuple[str, nn.Module]]) -> list[str]:
    """The leaf names of the modules lorakit can adapt (`query`, `dense`, ...), most frequent first; the
    whole path where the leaf is a mere index (`layers.0`)."""
    counts: dict[str, int] = {}
    for path, module in modules:
        leaf = path.rsplit(".", 1)[-1]
        if layer_class_for(base_of(module)) is not None:
            name = path if leaf.isdigit() else leaf
            counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda leaf: (-counts[leaf], leaf))


def _unused_patterns(config: LoraConfig, adapted: list[str]) -> list[str]:
    """A rank or alpha pattern that names no adapted module would be ignored without a word: say so."""
    example = adapted[0] if adapted else "?"
    return [f"{field}: {pattern!r} matches none of the adapted modules (e.g. {example!r}); a glob matches the "
            f"whole path, as in '*.{pattern}'" for field in ("rank_pattern", "alpha_pattern")
            for pattern in getattr(config, field) if not any(path_matches(p, pattern) for p in adapted)]


def _resolve_saved(modules: list[tuple[str, nn.Module]], config: LoraConfig) -> tuple[list[str], list[str]]:
    """(paths config.modules_to_save names, in module order; the problems found)."""
    problems: list[str] = []
    hits: set[str] = set()
    for pattern in config.modules_to_save:
        matched = {p for p, _ in modules if path_matches(p, pattern)}
        if not matched:
            problems.append(_no_match(pattern, modules, "modules_to_save"))
        hits |= matched
    chosen = [(p, m) for p, m in modules if p in hits]
    for path, module in chosen:
        if isinstance(module, CONTAINERS):
            problems.append(f"modules_to_save: {path!r} is a {type(module).__name__}, which has no forward "
                            "of its own to call; name the modules inside it")
        if any(is_quantized(m) for m in module.modules()):
            problems.append(f"modules_to_save: {path!r} holds a quantized layer, which cannot be trained in full; "
                            "adapt it with LoRA instead, or keep it unquantized (output and classifier heads are)")
        outer = [p for p in hits if path.startswith(p + ".")]
        if outer:
            problems.append(f"modules_to_save: {path!r} lies inside {outer[0]!r}, also a module to save; "
                            "name only one of them")
    return [p for p, _ in chosen], problems


def _overlap_problems(modules: list[tuple[str, nn.Module]], adapted: list[str], saved: list[str]) -> list[str]:
    """A module is either adapted with LoRA or trained in full, and never lies inside one of the other kind."""
    def nested(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    problems = [
        f"modules_to_save: {s!r} {'is' if a == s else 'overlaps'} the LoRA target {a!r}; a module is either "
        f"adapted with LoRA or trained in full: add {a!r} to exclude or drop it from modules_to_save"
        for s in saved for a in adapted if nested(a, s)
    ]
    for path, module in modules:
        if isinstance(module, LoraLayer) and saved:
            problems += [f"modules_to_save: {s!r} overlaps {path!r}, which has LoRA adapter(s) "
                         f"{list(module.adapters)}; drop it from modules_to_save" for s in saved if nested(path, s)]
        if isinstance(module, ModuleToSave):
            problems += [f"targets: {a!r} overlaps {path!r}, a module to save of adapter(s) {list(module.copies)}; "
                         "add it to exclude" for a in adapted if nested(a, path)]
            problems += [f"modules_to_save: {s!r} contains {path!r}, a module to save of adapter(s) "
                         f"{list(module.copies)}; name {path!r} itself" for s in saved if path.startswith(s + ".")]
    return problems


def _read_by_weight(modules: list[tuple[str, nn.Module]]) -> set[str]:
    """Paths of layers whose parent uses their .weight without calling them (MultiheadAttention)."""
    # base_of only where it can be one: a module to save may wrap one, a LoRA layer never does
    parents = {p for p, m in modules if isinstance(m, (nn.MultiheadAttention, ModuleToSave))
               and isinstance(base_of(m), nn.MultiheadAttention)}
    return {p for p, _ in modules if p.rpartition(".")[0] in parents} if parents else set()


def is_linear(module: nn.Module) -> bool:
    """A linear layer in the 'all-linear' sense: nn.Linear or transformers' Conv1D."""
    return layer_class_for(module) in (LoraLinear, LoraConv1D)


def _no_match(target: str, modules: list[tuple[str, nn.Module]], field: str = "targets") -> str:
    """Suggest what `field` could name: adaptable leaf names for targets, any leaf name for modules to save."""
    if field == "targets":
        names = adaptable_names(modules)
    else:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in modules if not p.rsplit(".", 1)[-1].isdigit()})
    close = difflib.get_close_matches(target, names, n=5, cutoff=0.5)
    hint = f"closest module names: {', '.join(close)}" if close else f"module names include: {', '.join(names[:8])}"
    return f"{field}: {target!r} matches no module; {hint}"


def _module_problems(path: str, module: nn.Module, config: LoraConfig) -> list[str]:
    cls = layer_class_for(module)
    if cls is None:
        return [
            f"targets: {path!r} is a {type(module).__name__}, which lorakit cannot adapt; "
            f"supported types: {supported_type_names()}. Target its linear sub-layers instead"
        ]
    if config.dora and not cls.dora:
        return [f"targets: {path!r} is a {type(module).__name__}; DoRA (dora=True) adapts Linear and Conv1D layers "
                "only: exclude it (exclude=...) or train it without DoRA (dora=False)"]
    rank = config.rank_for(path)
    if cls is LoraConv and rank % module.groups:
        return [f"rank for {path!r} is {rank}, but the conv has groups={module.groups}: "
                "the rank must be a multiple of groups (set rank_pattern for this module)"]
    return _residual_init_problems(path, module, cls, rank, config.init) if config.init in RESIDUAL_INITS else []


def _residual_init_problems(path: str, module: nn.Module, cls: type[LoraLayer], rank: int, init: str) -> list[str]:
    """init pissa/olora rewrites the base weight from its SVD/QR: a dense Linear or Conv1D weight, rank <= its sides."""
    if cls not in (LoraLinear, LoraConv1D):
        return [f"init={init!r}: {path!r} is a {type(module).__name__}; PiSSA/OLoRA start adapters on Linear and "
                "Conv1D layers only: exclude it, or use init='default'"]
    if is_quantized(module):
        return [f"init={init!r}: {path!r} is quantized; PiSSA/OLoRA replace the base weight by a residual, which "
                "would have to be re-quantized: load the base in float32 or bfloat16 (base_dtype), or use "
                "init='default'"]
    sides = cls.as_update_matrix(module.weight).shape
    if rank > min(sides):
        return [f"init={init!r}: rank for {path!r} is {rank}, above the weight's smaller side {min(sides)} "
                f"({sides[0]} x {sides[1]}); lower rank (or set rank_pattern for this module)"]
    return []


def inject_(model: nn.Module, config: LoraConfig, adapter: str = "default") -> list[str]:
    """Add adapter `adapter` to every module `config` targets and freeze the base.

    Wraps each target in a LoRA layer (or extends the one already there) and each module to
    save in a ModuleToSave holding a copy for this adapter; makes only the new A/B, the copies
    (plus biases per `config.bias`) trainable, and returns the adapted (LoRA) module paths.
    The first adapter injected becomes active; later ones leave the active adapter as it is.
    """
    if not isinstance(model, nn.Module):
        raise LoraError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise LoraError(f"config: expected lorakit.LoraConfig, got {type(config).__name__}; "
                        "build one with lk.LoraConfig(rank=8, alpha=16, targets=(...))")
    check_adapter_name(adapter)
    if adapter in adapters(model):
        raise LoraError(f"adapter={adapter!r} already exists in this model; pick another name "
                        f"or remove it first with lk.delete_adapter(model, {adapter!r})")
    modules = candidate_modules(model)
    check_not_merged(modules)
    check_residual_alone(modules, config.init, adapter)
    paths, saved = resolve(model, config, modules)
    attach_(model, adapter, new_parts(dict(modules), config, paths, saved), config.bias, modules)
    return paths


def check_not_merged(modules: list[tuple[str, nn.Module]]) -> None:
    """`modules` (candidate_modules(model)) hold no merged adapter."""
    if any(isinstance(m, LoraLayer) and m.merged_adapter is not None for _, m in modules):
        raise LoraError("model is merged; call lk.unmerge_(model) before adding or replacing an adapter")


def check_residual_alone(modules: list[tuple[str, nn.Module]], init: str, adapter: str) -> None:
    """An adapter whose init took its start out of the base weights (pissa, olora) is the model's only adapter:
    any other would be trained on, or applied to, the residual instead of the user's weights."""
    held = {name: part for _, m in modules if isinstance(m, LoraLayer) for name, part in m.adapters.items()}
    residual = next((name for name, part in held.items() if isinstance(part, ResidualAdapter)), None)
    if residual is not None:
        raise LoraError(f"adapter={adapter!r}: the model holds adapter {residual!r} (init="
                        f"{held[residual].config.init!r}), whose layers' base weights hold the residual W0 - "
                        "scale * B0 @ A0, not the model's own; another adapter would see the wrong weights. Save it "
                        f"(lk.save_adapter writes a plain LoRA for the original base) and lk.delete_adapter(model, "
                        f"{residual!r}) (which puts W0 back) before adding another")
    others = sorted({n for _, m in modules if isinstance(m, FOLLOWER_TYPES) for n in m.parts})
    if init in RESIDUAL_INITS and others:
        raise LoraError(f"init={init!r}: the model already holds adapter(s) {others!r}; PiSSA/OLoRA replace base "
                        "weights by a residual, which those would then see. Inject it into a model without "
                        "adapters, or use init='default'")


def new_parts(modules: dict[str, nn.Module], config: LoraConfig, paths: list[str], saved: list[str],
              factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
              reuse: Mapping[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """path -> a new adapter's part there, not yet attached: a LoraAdapter on each LoRA target (fresh, or
    holding a copy of factors[path], its A and B; built in reuse[path], a deleted adapter's part, where it
    fits), a trainable copy of each module to save."""
    factors, reuse = factors or {}, reuse or {}
    parts: dict[str, nn.Module] = {}
    for path in paths:
        base = base_of(modules[path])
        parts[path] = layer_class_for(base).new_adapter(base, path, config, factors.get(path), reuse.get(path))
    parts.update({path: trainable_copy(base_of(modules[path])) for path in saved})
    return parts


def attach_(model: nn.Module, adapter: str, parts: dict[str, nn.Module], bias: str,
            modules: list[tuple[str, nn.Module]], base: list[nn.Parameter] | None = None
            ) -> list[tuple[str, nn.Module]]:
    """Put adapter `adapter`'s parts into the model: wrap each path in a LoRA layer (LoraAdapter parts)
    or a ModuleToSave (copies) unless it is one already, freeze all but adapter parts, and make the
    biases `bias` names trainable. The model's active adapter stays (the first adapter becomes it).

    `modules` is candidate_modules(model) before this call, `base` base_parameters(model, modules) if the
    caller has them; returns the model's followers (identity.followers) with the new wrappers.
    """
    present = [(p, m) for p, m in modules if isinstance(m, FOLLOWER_TYPES)]
    active = present[0][1].active_adapter if present else adapter
    by_path, adapted = dict(present), []
    for path, part in parts.items():
        module = by_path.get(path) or model.get_submodule(path)
        if not isinstance(module, FOLLOWER_TYPES):
            module = layer_class_for(module)(module) if isinstance(part, LoraAdapter) else ModuleToSave(module)
            module.active_adapter = active
            model.set_submodule(path, module)
            by_path[path] = module
        module.put(adapter, part)
        if isinstance(part, LoraAdapter):
            adapted.append(module)
    present = list(by_path.items())
    for p in base if base is not None else base_parameters(model, modules):  # all but adapters' parts
        if p.requires_grad:
            p.requires_grad_(False)
    _unfreeze_biases(model, bias, adapted, present)
    return present


def base_parameters(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> list[nn.Parameter]:
    """Every parameter of `model` outside adapters' parts, each once: the base's own, wrapped layers' included.

    `modules` is candidate_modules(model) (wrapping a module since leaves its parameters the same); they hold
    no parts, so this costs the same however many adapters are loaded.
    """
    found: dict[int, nn.Parameter] = {}
    for module in [model, *(m for _, m in modules)]:
        owners = modules_of(module.wrapped) if isinstance(module, FOLLOWER_TYPES) else (module,)
        for owner in owners:
            if owner._parameters:  # most modules are containers without parameters of their own
                found.update((id(p), p) for p in owner._parameters.values() if p is not None)
    return list(found.values())


def attach_settable(model: nn.Module, bias: str, base: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters whose requires_grad attach_ may set: the base's (`base`: base_parameters; frozen, some
    biases unfrozen) and, with bias='all', every bias (a copy of a module to save's too)."""
    return list(model.parameters()) if bias == "all" else base


def _unfreeze_biases(model: nn.Module, bias: str, layers: list[LoraLayer], present: list[tuple[str, nn.Module]]) -> None:
    if bias == "none":
        return
    originals = {id(m) for _, wrapper in present if isinstance(wrapper, ModuleToSave)
                 for m in wrapper.original_module.modules()}
    owners = model.modules() if bias == "all" else (layer.base_layer for layer in layers)
    for module in owners:
        if id(module) in originals:
            continue  # a module to save trains through its copies; the original stays frozen
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                p.requires_grad_(True)
