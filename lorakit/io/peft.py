"""PEFT's adapter format: the config JSON both ways, tensor key names, PEFT's own target-matching
rules, modules to save and bias keys. lorakit writes what `peft.PeftModel.from_pretrained` reads and
reads what PEFT writes; this module knows nothing about lorakit's extras (see adapter_files).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from torch import nn

from ..core.config import BIAS_MODES, LoraConfig
from ..core.inject import base_of, is_linear, output_head
from ..core.layers import LoraConv1D, LoraEmbedding, LoraLayer, layer_class_for
from ..core.targets import ALL_LINEAR, names_module, paths_named
from ..errors import LoraError, problems_error

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
SEQ_CLS_HEADS = ("classifier", "score")  # PEFT adds these to modules_to_save for task_type SEQ_CLS
# init_lora_weights values that only choose how A and B start (a trained adapter is then just its A and B);
# PEFT's others (pissa, olora, corda, loftq) also rewrite the base weights, which a plain base lacks.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")

Modules = list[tuple[str, nn.Module]]  # core.inject.candidate_modules(model)


def _optional(kind):
    return lambda v: v is None or isinstance(v, kind)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _names(v) -> bool:
    return isinstance(v, list) and all(_is_pattern(n) for n in v)


# PEFT config fields lorakit reads: field -> (valid?, what it must be). Absent fields take PEFT's defaults.
READ_FIELDS = {
    "peft_type": (lambda v: v == "LORA", "'LORA' (only LoRA adapters can be loaded)"),
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
    "lora_alpha": (lambda v: _number(v) and v > 0, "a positive number"),
    "target_modules": (lambda v: _is_pattern(v) or (_names(v) and bool(v)),
                       "a non-empty list of module names or a regex string"),
    "exclude_modules": (lambda v: v is None or _is_pattern(v) or _names(v), "null, a regex string or a list of names"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "fan_in_fan_out": (_optional(bool), "true or false"),
    "bias": (lambda v: v in BIAS_MODES, " or ".join(map(repr, BIAS_MODES))),
    "use_rslora": (_optional(bool), "true or false"),
    "use_dora": (_optional(bool), "true or false"),
    "rank_pattern": (lambda v: v is None or _patterns(v, lambda r: isinstance(r, int) and not isinstance(r, bool)
                                                   and r >= 1), "an object mapping a regex to a positive integer"),
    "alpha_pattern": (lambda v: v is None or _patterns(v, lambda a: _number(a) and a > 0),
                      "an object mapping a regex to a positive number"),
    "init_lora_weights": (lambda v: any(v is x or (isinstance(x, str) and v == x) for x in PLAIN_INITS),
                          f"one of {', '.join(map(repr, PLAIN_INITS))} (PiSSA/OLoRA/CorDA/LoftQ adapters need "
                          "their base converted first)"),
    "base_model_name_or_path": (_optional(str), "null or a string"),
    "task_type": (_optional(str), "null or a string such as 'CAUSAL_LM'"),
    "inference_mode": (_optional(bool), "true or false"),
    "revision": (_optional(str), "null or a string"),
    "peft_version": (_optional(str), "null or a string"),
    "auto_mapping": (_optional(dict), "null or an object"),
    "modules_to_save": (lambda v: v is None or _names(v), "null or a list of module names"),
    "megatron_core": (_optional(str), "null or a string"),  # inert unless megatron_config is set
    "qalora_group_size": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),  # inert
    "runtime_config": (_optional(dict), "null or an object"),
}
# PEFT fields lorakit does not read: each must hold a value that switches its feature off.
OFF_VALUES = {
    "layers_to_transform": (None, []), "layers_pattern": (None, []),
    "megatron_config": (None,), "trainable_token_indices": (None,), "loftq_config": ({}, None),
    "eva_config": (None,), "corda_config": (None,), "lora_ga_config": (None,),
    "velora_config": (None,), "alora_invocation_tokens": (None,), "use_qalora": (False,),
    "monteclora_config": (None,), "layer_replication": (None,), "lora_bias": (False,),
    "target_parameters": (None, []), "use_bdlora": (None, False), "arrow_config": (None,),
    "kasa_config": (None,), "ensure_weight_tying": (False,),
}


def _is_pattern(name) -> bool:
    """A non-empty string that compiles as a regex (PEFT matches names as regexes in several places)."""
    if not isinstance(name, str) or not name:
        return False
    try:
        re.compile(name)
    except re.error:
        return False
    return True


def _patterns(value, valid) -> bool:
    return isinstance(value, dict) and all(_is_pattern(k) and valid(v) for k, v in value.items())


# --- the config JSON, read ----------------------------------------------------------------------------
def read_config(directory: Path) -> dict:
    """adapter_config.json, every field type-checked; every problem is reported in one LoraError."""
    config_path = directory / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraError(f"{config_path}: not valid JSON ({err}); re-save the adapter") from None
    if not isinstance(raw, dict):
        raise LoraError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    problems = config_problems(raw)
    if problems:
        raise problems_error(str(config_path), problems)
    return raw


def config_problems(raw: dict) -> list[str]:
    problems = [f"{key}: missing; an adapter config needs it" for key in ("peft_type", "r", "target_modules")
                if key not in raw]
    for key, value in raw.items():
        if key in READ_FIELDS:
            valid, expected = READ_FIELDS[key]
            if not valid(value):
                problems.append(f"{key}={value!r}: must be {expected}")
        elif key not in OFF_VALUES:
            problems.append(f"{key}={value!r}: unknown field; remove it (lorakit reads PEFT LoRA configs)")
        elif not any(value == off and type(value) is type(off) for off in OFF_VALUES[key]):
            problems.append(f"{key}={value!r}: a PEFT feature lorakit does not support; "
                            f"set it to {OFF_VALUES[key][0]!r} or use peft to load this adapter")
    return problems


def lorakit_config(raw: dict, paths: list[str], saved: list[str]) -> LoraConfig:
    """A LoraConfig naming each module exactly, with PEFT's pattern rules already applied."""
    def pattern_value(patterns: dict, path: str, default):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    rank, alpha = raw["r"], raw.get("lora_alpha", 8)
    ranks = {p: pattern_value(raw.get("rank_pattern") or {}, p, rank) for p in paths}
    alphas = {p: pattern_value(raw.get("alpha_pattern") or {}, p, alpha) for p in paths}
    try:
        return LoraConfig(
            rank=rank, alpha=alpha, dropout=float(raw.get("lora_dropout", 0.0)), targets=tuple(paths),
            bias=raw.get("bias", "none"), rslora=bool(raw.get("use_rslora")), dora=bool(raw.get("use_dora")),
            init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "default",
            rank_pattern={p: r for p, r in ranks.items() if r != rank},
            alpha_pattern={p: a for p, a in alphas.items() if a != alpha}, modules_to_save=tuple(saved),
        )
    except LoraError as err:
        raise LoraError(f"{CONFIG_FILE}: {err}") from None


# --- the config JSON, written -------------------------------------------------------------------------
def peft_config(model: nn.Module, modules: Modules, config: LoraConfig, paths: list[str],
                layers: dict[str, LoraLayer], task: str | None, saved: list[str]) -> dict:
    """The adapter_config.json PEFT needs to rebuild exactly `paths` with their ranks and alphas."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    by_leaf = [p for p, _ in modules if any(names_module(p, leaf) for leaf in leaves)]
    targets = leaves if sorted(by_leaf) == sorted(paths) else sorted(paths)
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    fan_in_fan_out = any(isinstance(layers[p], LoraConv1D) for p in paths)
    return config_json(config, paths, targets, task, name or None, fan_in_fan_out, saved)


def config_json(config: LoraConfig, paths: list[str], targets: list[str], task: str | None,
                base_model: str | None, fan_in_fan_out: bool, saved: list[str]) -> dict:
    """adapter_config.json for `config` on the modules `paths`, which `targets` selects by PEFT's rules;
    each module's rank and alpha other than the config's own go in rank_pattern/alpha_pattern."""
    rank_pattern = {re.escape(p): config.rank_for(p) for p in paths if config.rank_for(p) != config.rank}
    alpha_pattern = {re.escape(p): config.alpha_for(p) for p in paths if config.alpha_for(p) != config.alpha}
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "target_modules": targets,
        "exclude_modules": None,
        "lora_dropout": config.dropout,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": config.bias,
        "use_rslora": config.rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True if config.init == "default" else "gaussian",
        "inference_mode": True,
        "modules_to_save": saved or None,
        "use_dora": config.dora,
        "lora_bias": False,
    }


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                         ("ForSequenceClassification", "SEQ_CLS")):
        if name.endswith(suffix):
            return task
    return None


def modules_written_in_full(model: nn.Module, modules: Modules, adapter: str, paths: list[str],
                            copies: dict[str, nn.Module]) -> tuple[str | None, dict[str, nn.Module]]:
    """(task_type, path -> module written in full) such that PEFT wraps exactly those modules.

    `copies` are the adapter's own copies of its modules to save. Under task_type SEQ_CLS PEFT always
    trains and loads the classifier head (SEQ_CLS_HEADS): one without a copy for this adapter is
    written as it is (PEFT's copy of it changes nothing). Where that would take a LoRA-adapted module
    from PEFT, the task type is left out instead.
    """
    written = dict(copies)
    task = task_type(model)
    if task == "SEQ_CLS":
        heads = {p: base_of(m) for p, m in modules if peft_saves(p, SEQ_CLS_HEADS) and p not in written}
        if any(p in heads or peft_excludes(p, SEQ_CLS_HEADS) for p in paths):
            task = None
        else:
            written.update(heads)
    names = list(written) + list(SEQ_CLS_HEADS if task == "SEQ_CLS" else ())
    extra = sorted({p for p, _ in modules if peft_saves(p, names)} - set(written))
    excluded = [p for p in paths if peft_excludes(p, list(written))]
    if extra or excluded:
        raise LoraError(f"modules_to_save: PEFT picks modules to save by plain name suffix, so {list(written)!r} "
                        f"would also pick {extra or excluded!r}; adapter={adapter!r} cannot be written in PEFT's "
                        "layout: rename those modules or drop them from targets/modules_to_save")
    order = {p: i for i, (p, _) in enumerate(modules)}
    return task, dict(sorted(written.items(), key=lambda item: order[item[0]]))


# --- PEFT's matching rules ----------------------------------------------------------------------------
def peft_matches(path: str, targets) -> bool:
    """PEFT's rule for target_modules / exclude_modules: a regex string matches the whole path; a list
    of names matches a path equal to a name or ending with '.' + name."""
    if isinstance(targets, str):
        return bool(re.fullmatch(targets, path))
    return any(names_module(path, t) for t in targets)


def peft_matching(paths: list[str], targets) -> list[str]:
    """The paths peft_matches, in order; a list of names looked up rather than compared with every path."""
    if isinstance(targets, str):
        return [p for p in paths if peft_matches(p, targets)]
    named = set().union(*paths_named(paths, targets).values())
    return [p for p in paths if p in named]


def peft_saves(path: str, names) -> bool:
    """PEFT's rule for modules_to_save: a module path that ends with a name (no '.' boundary)."""
    return any(path.endswith(name) for name in names)


def peft_excludes(path: str, names) -> bool:
    """PEFT's rule keeping LoRA off modules to save and everything inside them (names are regexes)."""
    return any(re.match(rf"(^|.*\.){name}($|\..*)", path) for name in names)


def save_names(raw: dict) -> list[str]:
    """The names PEFT saves in full: the config's modules_to_save, plus the heads SEQ_CLS adds."""
    names = list(raw.get("modules_to_save") or [])
    return names + list(SEQ_CLS_HEADS) if raw.get("task_type") == "SEQ_CLS" else names


def resolve_targets(model: nn.Module, modules: Modules, raw: dict, where: Path) -> list[str]:
    """Module paths PEFT would adapt with this config (PEFT's matching rules, not lorakit's)."""
    targets, exclude = raw["target_modules"], raw.get("exclude_modules") or []
    if targets == ALL_LINEAR:
        head = output_head(model, modules)
        hits = [p for p, m in modules if is_linear(base_of(m)) and base_of(m) is not head]
    else:
        hits = peft_matching([p for p, _ in modules], targets)
    hits = [p for p in hits if not peft_matches(p, exclude)]
    if not hits:
        raise LoraError(f"{where}: target_modules={targets!r} matches no module of this model; "
                        "is it the model the adapter was trained on?")
    hits = [p for p in hits if not peft_excludes(p, save_names(raw))]
    bases = dict(modules)
    unsupported = [f"{p} ({type(base_of(bases[p])).__name__})" for p in hits if not layer_class_for(base_of(bases[p]))]
    if unsupported:
        raise LoraError(f"{where}: target_modules={targets!r} matches modules lorakit cannot "
                        f"adapt: {', '.join(unsupported[:5])}")
    return hits


def resolve_saved(modules: Modules, raw: dict, paths: list[str], where: Path) -> list[str]:
    """Module paths PEFT would save in full with this config (PEFT's suffix rule), in module order."""
    names = save_names(raw)
    hits = [p for p, _ in modules if peft_saves(p, names)]
    clash = [p for p in hits if p in paths or any(p.startswith(q + ".") for q in hits)]
    if clash:
        raise LoraError(f"{where}: modules_to_save={names!r} picks {clash[0]!r}, which is also "
                        "adapted with LoRA or lies inside another module to save; PEFT cannot load this adapter either")
    return hits


# --- tensor keys --------------------------------------------------------------------------------------
def factor_keys(layer_type: type[LoraLayer], path: str) -> tuple[str, str]:
    """PEFT's keys for A and B of the LoRA layer of this type at `path`."""
    if issubclass(layer_type, LoraEmbedding):
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def magnitude_key(path: str) -> str:
    """PEFT's key for a DoRA adapter's magnitude vector (d_out,) at `path`."""
    return f"{PREFIX}{path}.lora_magnitude_vector"


def adapter_keys(layer_type: type[LoraLayer], path: str, dora: bool) -> tuple[str, ...]:
    """PEFT's keys for what an adapter holds at `path`, in LoraAdapter.trained() order: A, B (and DoRA's m)."""
    return factor_keys(layer_type, path) + ((magnitude_key(path),) if dora else ())


FACTOR_KEY = re.compile(rf"{re.escape(PREFIX)}(.+)\.lora_(A\.weight|embedding_A)")  # a key of A: (path, kind)


def factor_pairs(tensors: dict, where: Path) -> dict[str, tuple[str, str]]:
    """Module path -> (key of A, key of B) of every LoRA factor pair among `tensors` (read from `where`)."""
    pairs = {}
    for key in tensors:
        found = FACTOR_KEY.fullmatch(key)
        if found is None:
            continue
        path = found.group(1)
        key_b = factor_keys(LoraEmbedding if found.group(2) == "embedding_A" else LoraLayer, path)[1]
        if key_b not in tensors:
            raise LoraError(f"{where}: {key!r} has no matching {key_b!r}; save the adapter again")
        pairs[path] = (key, key_b)
    if not pairs:
        raise LoraError(f"{where}: holds no LoRA factors (keys like {PREFIX}<module>.lora_A.weight)")
    return pairs


def copy_keys(path: str, state: dict) -> dict[str, str]:
    """PEFT key -> entry of a module to save's state dict: `<path>.<name in the module>`."""
    return {f"{PREFIX}{path}.{k}": k for k in state}


def bias_params(modules: Modules, bias: str, paths: list[str], saved=()) -> dict[str, nn.Parameter]:
    """PEFT key -> bias parameter saved with the adapter for this bias mode.

    Keys do not depend on whether the model is injected yet: an adapted module's bias is
    PEFT's `<path>.base_layer.bias`, any other module's `<path>.bias`. Modules saved in full
    (`saved`, and what lies inside them) are skipped: their biases are in the saved copy.
    """
    if bias == "none":
        return {}
    adapted = set(paths)
    found = {}
    for path, module in modules:
        if (bias == "lora_only" and path not in adapted) or any(path == s or path.startswith(s + ".") for s in saved):
            continue
        param = dict(base_of(module).named_parameters(recurse=False)).get("bias")
        if param is not None:
            found[f"{PREFIX}{path}.base_layer.bias" if path in adapted else f"{PREFIX}{path}.bias"] = param
    return found


def without_bias_repeats(tensors: dict, raw: dict, saved: list[str]) -> dict:
    """PEFT's bias='all' also writes a module to save's biases as `<path>.original_module.*` (the frozen
    original's, unchanged) and `<path>.modules_to_save.*` (the copy's again, which PEFT's own loader
    reports as unexpected): both repeat what is read elsewhere, so they are set aside."""
    if raw.get("bias") != "all":
        return tensors
    repeats = tuple(f"{PREFIX}{p}.{part}." for p in saved for part in ("original_module", "modules_to_save"))
    return {k: t for k, t in tensors.items() if not k.startswith(repeats)}
