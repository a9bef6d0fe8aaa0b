"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

lorakit's extras (format version, a fingerprint of the base weights) live in the safetensors
metadata, so PEFT reads our files and we read PEFT's. Loading is strict and transactional;
writes are atomic (temp file + rename). Only JSON and safetensors are read: no pickle.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.adapters import adapter_config, adapter_paths, adapters
from ..core.config import LoraConfig
from ..errors import LoraError, problems_error
from .files import write_atomically
from ..core.inject import active_adapter, base_of, candidate_modules, check_adapter_name, inject_, is_linear, output_head
from ..core.layers import LoraConv1D, LoraEmbedding, LoraLayer, layer_class_for, lora_layers
from ..core.modules_to_save import saved_modules, saved_paths

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = "2"  # 2: the base fingerprint samples FINGERPRINT_ENTRIES entries (1: every entry)
FINGERPRINT_ENTRIES = 4096
PREFIX = "base_model.model."
SEQ_CLS_HEADS = ("classifier", "score")  # PEFT adds these to modules_to_save for task_type SEQ_CLS

# PEFT config fields lorakit reads; others must hold a value that switches their feature off.
READ_FIELDS = {
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights", "base_model_name_or_path",
    "task_type", "inference_mode", "revision", "peft_version", "auto_mapping", "modules_to_save",
    "megatron_core", "qalora_group_size", "runtime_config",  # inert unless their feature is on
}
OFF_VALUES = {
    "layers_to_transform": (None, []), "layers_pattern": (None, []),
    "megatron_config": (None,), "trainable_token_indices": (None,), "loftq_config": ({}, None),
    "eva_config": (None,), "corda_config": (None,), "lora_ga_config": (None,), "use_dora": (False,),
    "velora_config": (None,), "alora_invocation_tokens": (None,), "use_qalora": (False,),
    "monteclora_config": (None,), "layer_replication": (None,), "lora_bias": (False,),
    "target_parameters": (None, []), "use_bdlora": (None, False), "arrow_config": (None,),
    "kasa_config": (None,), "ensure_weight_tying": (False,),
}


# --- saving ---------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write adapter `adapter` (default: the active one) to `directory` in PEFT's layout.

    `metadata` adds string entries to the safetensors header (keys must start with 'lorakit_').
    """
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not (isinstance(k, str) and k.startswith("lorakit_") and isinstance(v, str))]
    if bad:
        raise LoraError(f"metadata: keys {bad!r} must be strings starting with 'lorakit_', with string values")
    adapter = active_adapter(model) if adapter is None else adapter
    config = adapter_config(model, adapter)  # raises for an unknown adapter
    paths = adapter_paths(model, adapter)
    layers = dict(lora_layers(model))
    tensors = {}
    for path in paths:
        key_a, key_b = _peft_keys(layers[path], path)
        tensors[key_a] = layers[path].lora_A[adapter].detach().cpu().contiguous()
        tensors[key_b] = layers[path].lora_B[adapter].detach().cpu().contiguous()
    task, written = _peft_modules_to_save(model, adapter, paths)
    for path, module in written.items():  # PEFT's key for a copy's tensor: <path>.<name in the module>
        tensors.update({f"{PREFIX}{path}.{k}": t.detach().cpu().contiguous() for k, t in module.state_dict().items()})
    biases = _bias_params(model, config.bias, paths, list(written))
    tensors.update({k: p.detach().cpu().contiguous() for k, p in biases.items()})
    metadata = {
        "format": "pt",
        "lorakit_format_version": FORMAT_VERSION,
        "lorakit_adapter": adapter,
        "lorakit_config": json.dumps(config.to_dict()),
        "lorakit_base_fingerprint": json.dumps(base_fingerprint(model, paths)),
        **{k: v for k, v in extra.items() if k not in ("lorakit_format_version", "lorakit_base_fingerprint")},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    text = json.dumps(_peft_config(model, config, paths, layers, task, list(written)), indent=2, sort_keys=True)
    write_atomically(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
    return directory


def _peft_config(model, config: LoraConfig, paths: list[str], layers: dict, task: str | None, saved: list[str]) -> dict:
    modules = candidate_modules(model)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    by_leaf = [p for p, _ in modules if any(p == leaf or p.endswith("." + leaf) for leaf in leaves)]
    targets = leaves if sorted(by_leaf) == sorted(paths) else sorted(paths)
    rank_pattern = {re.escape(p): config.rank_for(p) for p in paths if config.rank_for(p) != config.rank}
    alpha_pattern = {re.escape(p): config.alpha_for(p) for p in paths if config.alpha_for(p) != config.alpha}
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": name or None,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "target_modules": targets,
        "exclude_modules": None,
        "lora_dropout": config.dropout,
        "fan_in_fan_out": any(isinstance(layers[p], LoraConv1D) for p in paths),
        "bias": config.bias,
        "use_rslora": config.rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True if config.init == "default" else "gaussian",
        "inference_mode": True,
        "modules_to_save": saved or None,
        "use_dora": False,
        "lora_bias": False,
    }


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                         ("ForSequenceClassification", "SEQ_CLS")):
        if name.endswith(suffix):
            return task
    return None


def _peft_modules_to_save(model: nn.Module, adapter: str, paths: list[str]) -> tuple[str | None, dict[str, nn.Module]]:
    """(task_type, path -> module written in full) such that PEFT wraps exactly those modules.

    Under task_type SEQ_CLS PEFT always trains and loads the classifier head (SEQ_CLS_HEADS): one
    without a copy for this adapter is written as it is (PEFT's copy of it changes nothing). Where
    that would take a LoRA-adapted module from PEFT, the task type is left out instead.
    """
    written = {p: w.copies[adapter] for p, w in saved_modules(model) if adapter in w.copies}
    modules = candidate_modules(model)
    task = _task_type(model)
    if task == "SEQ_CLS":
        heads = {p: base_of(m) for p, m in modules if _peft_saves(p, SEQ_CLS_HEADS) and p not in written}
        if any(p in heads or _peft_excludes(p, SEQ_CLS_HEADS) for p in paths):
            task = None
        else:
            written.update(heads)
    names = list(written) + list(SEQ_CLS_HEADS if task == "SEQ_CLS" else ())
    extra = sorted({p for p, _ in modules if _peft_saves(p, names)} - set(written))
    excluded = [p for p in paths if _peft_excludes(p, list(written))]
    if extra or excluded:
        raise LoraError(f"modules_to_save: PEFT picks modules to save by plain name suffix, so {list(written)!r} "
                        f"would also pick {extra or excluded!r}; adapter={adapter!r} cannot be written in PEFT's "
                        "layout: rename those modules or drop them from targets/modules_to_save")
    order = {p: i for i, (p, _) in enumerate(modules)}
    return task, dict(sorted(written.items(), key=lambda item: order[item[0]]))


def _peft_saves(path: str, names) -> bool:
    """PEFT's rule for modules_to_save: a module path that ends with a name (no '.' boundary)."""
    return any(path.endswith(name) for name in names)


def _peft_excludes(path: str, names) -> bool:
    """PEFT's rule keeping LoRA off modules to save and everything inside them (names are regexes)."""
    return any(re.match(rf"(^|.*\.){name}($|\..*)", path) for name in names)


def _peft_keys(layer_or_cls, path: str) -> tuple[str, str]:
    cls = layer_or_cls if isinstance(layer_or_cls, type) else type(layer_or_cls)
    if issubclass(cls, LoraEmbedding):
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def _bias_params(model: nn.Module, bias: str, paths: list[str], saved=()) -> dict[str, nn.Parameter]:
    """PEFT key -> bias parameter saved with the adapter for this bias mode.

    Keys do not depend on whether the model is injected yet: an adapted module's bias is
    PEFT's `<path>.base_layer.bias`, any other module's `<path>.bias`. Modules saved in full
    (`saved`, and what lies inside them) are skipped: their biases are in the saved copy.
    """
    if bias == "none":
        return {}
    adapted = set(paths)
    found = {}
    for path, module in candidate_modules(model):
        if (bias == "lora_only" and path not in adapted) or any(path == s or path.startswith(s + ".") for s in saved):
            continue
        param = dict(base_of(module).named_parameters(recurse=False)).get("bias")
        if param is not None:
            found[f"{PREFIX}{path}.base_layer.bias" if path in adapted else f"{PREFIX}{path}.bias"] = param
    return found


# --- base fingerprint ---------------------------------------------------------------------------------
def base_fingerprint(model: nn.Module, paths: list[str]) -> dict[str, list[float]]:
    """Per adapted module: mean, RMS and a fixed random projection of the original base weight,
    all over FINGERPRINT_ENTRIES entries at fixed random positions (a probe, not a checksum: it
    costs microseconds per module, so loading an adapter stays in milliseconds).

    Robust to dtype casts (float32 / bfloat16 / float16 copies of one model agree to ~1e-3 of the
    RMS); a different model (another pretraining, another seed) differs by about the RMS itself.
    """
    modules = dict(model.named_modules())
    result = {}
    for path in paths:
        module = modules[path]
        weight = module.original_weight if isinstance(module, LoraLayer) else module.weight
        w = weight.detach().reshape(-1)
        generator = torch.Generator().manual_seed(0)
        if w.numel() > FINGERPRINT_ENTRIES:
            w = w[torch.randint(w.numel(), (FINGERPRINT_ENTRIES,), generator=generator).to(w.device)]
        w = w.float().cpu()
        probe = torch.randn(w.numel(), generator=generator)
        result[path] = [w.mean().item(), w.square().mean().sqrt().item(), (w @ probe).item() / math.sqrt(w.numel())]
    return result


def _fingerprint_problems(saved: dict, current: dict) -> list[str]:
    bad = []
    for path, (mean, rms, proj) in saved.items():
        if path not in current:
            continue
        c_mean, c_rms, c_proj = current[path]
        tol = 1e-2 * max(rms, c_rms, 1e-12)
        if abs(mean - c_mean) > tol or abs(rms - c_rms) > tol or abs(proj - c_proj) > tol:
            bad.append(path)
    return bad


# --- loading ----------------------------------------------------------------------------------------
def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter: str = "default",
    allow_base_mismatch: bool = False,
) -> str:
    """Load an adapter directory (lorakit's or PEFT's) into `model` as `adapter`; returns the name.

    Injects LoRA layers (and copies of the modules to save) as needed, or fills an existing
    adapter of the same name and shapes. Everything is checked before the model is touched; on
    any error the model is unchanged.
    """
    check_adapter_name(adapter)
    directory = Path(directory)
    peft_config = _read_config(directory)
    tensors, metadata = _read_weights(directory / WEIGHTS_FILE)
    paths = _resolve_peft_targets(model, peft_config, directory)
    saved = _resolve_peft_saved(model, peft_config, paths, directory)
    config = _lorakit_config(peft_config, paths, saved)
    tensors = _without_peft_bias_repeats(tensors, peft_config, saved)
    _check_tensors(model, config, paths, tensors, directory)
    _check_fingerprint(model, paths, metadata, directory, allow_base_mismatch)
    if adapter in adapters(model) and (sorted(adapter_paths(model, adapter)) != sorted(paths)
                                       or saved_paths(model, adapter) != saved):
        raise LoraError(f"adapter={adapter!r} already exists on other modules than the file's; "
                        f"load under another name or lk.delete_adapter(model, {adapter!r}) first")
    _apply(model, config, paths, tensors, adapter)
    return adapter


def check_adapter_directory(directory: str | os.PathLike) -> Path:
    """`directory` as a Path, if it holds both adapter files; reads neither (cheap enough for hundreds)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LoraError(f"directory={str(directory)!r} is not a directory; pass the folder save_adapter wrote")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (directory / n).exists()]
        hint = (f"; {pickled[0]} is a pickle file, which lorakit never loads: convert it to safetensors"
                if pickled else "")
        raise LoraError(f"{weights_path}: file not found{hint}")
    if not config_path.is_file():
        raise LoraError(f"{config_path}: file not found; an adapter directory needs {CONFIG_FILE}")
    return directory


def _read_config(directory: Path) -> dict:
    config_path = check_adapter_directory(directory) / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraError(f"{config_path}: not valid JSON ({err}); re-save the adapter") from None
    if not isinstance(raw, dict):
        raise LoraError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    problems = _config_problems(raw)
    if problems:
        raise problems_error(str(config_path), problems)
    return raw


def _config_problems(raw: dict) -> list[str]:
    p = []
    if raw.get("peft_type") != "LORA":
        p.append(f"peft_type={raw.get('peft_type')!r}: only 'LORA' adapters can be loaded")
    for key, value in raw.items():
        if key in READ_FIELDS:
            continue
        if key not in OFF_VALUES:
            p.append(f"{key}={value!r}: unknown field; remove it (lorakit reads PEFT LoRA configs)")
        elif value not in OFF_VALUES[key]:
            p.append(f"{key}={value!r}: a PEFT feature lorakit does not support; "
                     f"set it to {OFF_VALUES[key][0]!r} or use peft to load this adapter")
    r = raw.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        p.append(f"r={r!r}: must be a positive integer")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        p.append(f"lora_alpha={alpha!r}: must be a positive number")
    targets = raw.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        p.append(f"target_modules={targets!r}: must be a non-empty list of module names or a regex string")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(raw.get(key, {}), dict):
            p.append(f"{key}={raw.get(key)!r}: must be an object mapping a pattern to a value")
    if raw.get("bias", "none") not in ("none", "all", "lora_only"):
        p.append(f"bias={raw.get('bias')!r}: must be 'none', 'all' or 'lora_only'")
    saves = raw.get("modules_to_save")
    if saves is not None and not (isinstance(saves, list) and all(_is_pattern(n) for n in saves)):
        p.append(f"modules_to_save={saves!r}: must be null or a list of module names")
    return p


def _is_pattern(name) -> bool:
    """A module name PEFT can use in its modules_to_save regex."""
    if not isinstance(name, str) or not name:
        return False
    try:
        re.compile(name)
    except re.error:
        return False
    return True


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for corrupt or truncated files
        raise LoraError(f"{path}: not a readable safetensors file ({err}); the file is corrupt or "
                        "truncated: save the adapter again") from None
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise LoraError(f"{path}: tensors hold NaN or Inf values: {', '.join(sorted(bad)[:5])}; "
                        "the adapter diverged in training: use an earlier checkpoint")
    return tensors, metadata


def _peft_matches(path: str, targets) -> bool:
    if isinstance(targets, str):
        return bool(re.fullmatch(targets, path))
    return any(path == t or path.endswith("." + t) for t in targets)


def _resolve_peft_targets(model: nn.Module, raw: dict, directory: Path) -> list[str]:
    """Module paths PEFT would adapt with this config (PEFT's matching rules, not lorakit's)."""
    targets, exclude = raw["target_modules"], raw.get("exclude_modules") or []
    modules = candidate_modules(model)
    if targets == "all-linear":
        head = output_head(model)
        hits = [p for p, m in modules if is_linear(base_of(m)) and base_of(m) is not head]
    else:
        hits = [p for p, _ in modules if _peft_matches(p, targets)]
    hits = [p for p in hits if not _peft_matches(p, exclude)]
    if not hits:
        raise LoraError(f"{directory / CONFIG_FILE}: target_modules={targets!r} matches no module of this model; "
                        "is it the model the adapter was trained on?")
    hits = [p for p in hits if not _peft_excludes(p, _peft_save_names(raw))]
    unsupported = [f"{p} ({type(base_of(m)).__name__})" for p, m in modules if p in hits and not layer_class_for(base_of(m))]
    if unsupported:
        raise LoraError(f"{directory / CONFIG_FILE}: target_modules={targets!r} matches modules lorakit cannot "
                        f"adapt: {', '.join(unsupported[:5])}")
    return hits


def _peft_save_names(raw: dict) -> list[str]:
    """The names PEFT saves in full: the config's modules_to_save, plus the heads SEQ_CLS adds."""
    names = list(raw.get("modules_to_save") or [])
    return names + list(SEQ_CLS_HEADS) if raw.get("task_type") == "SEQ_CLS" else names


def _resolve_peft_saved(model: nn.Module, raw: dict, paths: list[str], directory: Path) -> list[str]:
    """Module paths PEFT would save in full with this config (PEFT's suffix rule), in module order."""
    names = _peft_save_names(raw)
    hits = [p for p, _ in candidate_modules(model) if _peft_saves(p, names)]
    clash = [p for p in hits if p in paths or any(p.startswith(q + ".") for q in hits)]
    if clash:
        raise LoraError(f"{directory / CONFIG_FILE}: modules_to_save={names!r} picks {clash[0]!r}, which is also "
                        "adapted with LoRA or lies inside another module to save; PEFT cannot load this adapter either")
    return hits


def _without_peft_bias_repeats(tensors: dict, raw: dict, saved: list[str]) -> dict:
    """PEFT's bias='all' also writes a module to save's biases as `<path>.original_module.*` (the frozen
    original's, unchanged) and `<path>.modules_to_save.*` (the copy's again, which PEFT's own loader
    reports as unexpected): both repeat what is read elsewhere, so they are set aside."""
    if raw.get("bias") != "all":
        return tensors
    repeats = tuple(f"{PREFIX}{p}.{part}." for p in saved for part in ("original_module", "modules_to_save"))
    return {k: t for k, t in tensors.items() if not k.startswith(repeats)}


def _lorakit_config(raw: dict, paths: list[str], saved: list[str]) -> LoraConfig:
    """A LoraConfig naming each module exactly, with PEFT's pattern rules already applied."""
    def pattern_value(patterns: dict, path: str, default):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    rank, alpha = raw["r"], raw.get("lora_alpha", 8)
    ranks = {p: pattern_value(raw.get("rank_pattern") or {}, p, rank) for p in paths}
    alphas = {p: pattern_value(raw.get("alpha_pattern") or {}, p, alpha) for p in paths}
    init = raw.get("init_lora_weights", True)
    try:
        return LoraConfig(
            rank=rank, alpha=alpha, dropout=float(raw.get("lora_dropout", 0.0)), targets=tuple(paths),
            bias=raw.get("bias", "none"), rslora=bool(raw.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "default",
            rank_pattern={p: r for p, r in ranks.items() if r != rank},
            alpha_pattern={p: a for p, a in alphas.items() if a != alpha}, modules_to_save=tuple(saved),
        )
    except LoraError as err:
        raise LoraError(f"{CONFIG_FILE}: {err}") from None


def _check_tensors(model, config: LoraConfig, paths: list[str], tensors: dict, directory: Path) -> None:
    modules = dict(candidate_modules(model))
    expected: dict[str, tuple[int, ...]] = {}
    for path in paths:
        base = base_of(modules[path])
        cls = layer_class_for(base)
        shape_a, shape_b = cls.adapter_shapes(base, config.rank_for(path))
        key_a, key_b = _peft_keys(cls, path)
        expected[key_a], expected[key_b] = tuple(shape_a), tuple(shape_b)
    for path in config.modules_to_save:
        state = base_of(modules[path]).state_dict()
        expected.update({f"{PREFIX}{path}.{k}": tuple(t.shape) for k, t in state.items()})
    biases = _bias_params(model, config.bias, paths, config.modules_to_save)
    expected.update({k: tuple(p.shape) for k, p in biases.items()})
    problems = [f"missing key {k!r} (shape {list(s)})" for k, s in expected.items() if k not in tensors]
    problems += [f"unexpected key {k!r}" for k in tensors if k not in expected]
    problems += [
        f"key {k!r} has shape {list(tensors[k].shape)}, the model needs {list(s)}"
        for k, s in expected.items() if k in tensors and tuple(tensors[k].shape) != s
    ]
    if problems:
        raise problems_error(f"{directory / WEIGHTS_FILE} does not fit this model", problems[:20])


def _check_fingerprint(model, paths, metadata: dict, directory: Path, allow: bool) -> None:
    if allow or "lorakit_base_fingerprint" not in metadata:
        return
    if metadata.get("lorakit_format_version") != FORMAT_VERSION:  # another fingerprint method: not comparable
        return
    try:
        saved = json.loads(metadata["lorakit_base_fingerprint"])
    except json.JSONDecodeError:
        raise LoraError(f"{directory / WEIGHTS_FILE}: metadata lorakit_base_fingerprint is not JSON; "
                        "pass allow_base_mismatch=True to load anyway") from None
    bad = _fingerprint_problems(saved, base_fingerprint(model, paths))
    if bad:
        raise LoraError(
            f"{directory}: the adapter was trained on different base weights ({len(bad)} module(s) differ, "
            f"e.g. {bad[0]!r}); load it onto the model it was trained on, or pass allow_base_mismatch=True"
        )


@torch.no_grad()
def _apply(model: nn.Module, config: LoraConfig, paths: list[str], tensors: dict, adapter: str) -> None:
    """Inject (if needed) and copy the tensors in; on any failure, undo everything."""
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    biases = _bias_params(model, config.bias, paths, config.modules_to_save)
    old_biases = {k: p.detach().clone() for k, p in biases.items()}
    injected = adapter not in adapters(model)
    old_adapter, old_copies = {}, {}
    try:
        if injected:
            inject_(model, config, adapter)
        layers = dict(lora_layers(model))
        for path in paths:
            layer = layers[path]
            key_a, key_b = _peft_keys(layer, path)
            old_adapter[path] = (layer.lora_A[adapter].detach().clone(), layer.lora_B[adapter].detach().clone())
            layer.lora_A[adapter].copy_(tensors[key_a])
            layer.lora_B[adapter].copy_(tensors[key_b])
        wrappers = dict(saved_modules(model))
        for path in config.modules_to_save:
            state = wrappers[path].copies[adapter].state_dict()  # detached views of the copy's tensors
            old_copies[path] = {k: t.clone() for k, t in state.items()}
            for k, t in state.items():
                t.copy_(tensors[f"{PREFIX}{path}.{k}"])
        for key, param in _bias_params(model, config.bias, paths, config.modules_to_save).items():
            param.copy_(tensors[key])
    except BaseException:
        if injected and adapter in adapters(model):
            from ..core.adapters import delete_adapter
            delete_adapter(model, adapter)
        else:
            layers = dict(lora_layers(model))
            for path, (a, b) in old_adapter.items():
                layers[path].lora_A[adapter].copy_(a)
                layers[path].lora_B[adapter].copy_(b)
            wrappers = dict(saved_modules(model))
            for path, old in old_copies.items():
                for k, t in wrappers[path].copies[adapter].state_dict().items():
                    t.copy_(old[k])
        for key, param in biases.items():
            param.copy_(old_biases[key])
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        raise


# --- reading the factors alone --------------------------------------------------------------------
def read_factors(directory: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scale) per adapted module of an adapter folder, read without a model: enough to study
    the update dW = scale * B @ A itself (lorakit.analysis). Paths are the file's own; A is
    (r, fan_in[, *kernel]), B (d_out, r[, *ones]), as stored."""
    directory = Path(directory)
    raw = _read_config(directory)
    tensors, _ = _read_weights(directory / WEIGHTS_FILE)
    factor = re.compile(rf"{re.escape(PREFIX)}(.+)\.lora_(A\.weight|embedding_A)")
    pairs = {}
    for key, A in tensors.items():
        found = factor.fullmatch(key)
        if found is None:
            continue
        path = found.group(1)
        key_b = _peft_keys(LoraEmbedding if found.group(2) == "embedding_A" else LoraLayer, path)[1]
        if key_b not in tensors:
            raise LoraError(f"{directory / WEIGHTS_FILE}: {key!r} has no matching {key_b!r}; save the adapter again")
        pairs[path] = (A, tensors[key_b])
    if not pairs:
        raise LoraError(f"{directory / WEIGHTS_FILE}: holds no LoRA factors (keys like {PREFIX}<module>.lora_A.weight)")
    config = _lorakit_config(raw, list(pairs), [])
    return {path: (A, B, config.scale_for(path)) for path, (A, B) in pairs.items()}


# --- inspecting -------------------------------------------------------------------------------------
def adapter_info(directory: str | os.PathLike) -> dict:
    """What an adapter directory holds: its config, adapted modules, parameter count, file sizes and
    lorakit metadata. Reads the JSON config and the safetensors header only (no tensor data, no pickle)."""
    directory = Path(directory)
    raw = _read_config(directory)
    weights = directory / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            slices = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: (s.get_shape(), s.get_dtype()) for key, s in slices.items()}
    except Exception as err:  # safetensors raises several types for corrupt or truncated files
        raise LoraError(f"{weights}: not a readable safetensors file ({err}); save the adapter again") from None
    fingerprint = metadata.get("lorakit_base_fingerprint")
    return {
        "directory": str(directory),
        "config": {
            "rank": raw["r"], "alpha": raw.get("lora_alpha", 8), "targets": raw["target_modules"],
            "dropout": raw.get("lora_dropout", 0.0), "bias": raw.get("bias", "none"),
            "rslora": bool(raw.get("use_rslora", False)),
            "rank_pattern": raw.get("rank_pattern") or {}, "alpha_pattern": raw.get("alpha_pattern") or {},
        },
        "modules": sum(key.endswith((".lora_A.weight", ".lora_embedding_A")) for key in shapes),
        "parameters": sum(math.prod(shape) for shape, _ in shapes.values()),
        "dtypes": sorted({dtype for _, dtype in shapes.values()}),
        "files": {name: (directory / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE)},
        "format_version": metadata.get("lorakit_format_version"),  # None: not written by lorakit (e.g. PEFT)
        "adapter": metadata.get("lorakit_adapter"),
        "task": metadata.get("lorakit_task"),
        "label_names": _label_names(metadata.get("lorakit_label_names"), weights),
        "base_model": metadata.get("lorakit_base_model") or raw.get("base_model_name_or_path"),
        "base_fingerprint": hashlib.sha256(fingerprint.encode()).hexdigest()[:12] if fingerprint else None,
    }


def _label_names(text: str | None, weights: Path) -> list[str] | None:
    if text is None:
        return None
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise LoraError(f"{weights}: metadata lorakit_label_names={text!r} is not a JSON list of strings; "
                        "save the adapter again")
    return names
