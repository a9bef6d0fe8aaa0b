"""Saving and loading adapters: a folder in PEFT's layout (adapter_config.json + adapter_model.safetensors).

lorakit's extras live in the safetensors metadata, so PEFT reads our files and we read PEFT's:
the format version, the adapter's name and LoraConfig as the user wrote it (read back on load),
a checksum of the tensor bytes and a fingerprint of the base weights. A load is planned in full
(every file, field, key, shape and the base checked, the new adapter built off the model) before
the model is touched, then applied in one step that is undone on any error. Writes are atomic;
only JSON and safetensors are read: no pickle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping

import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.adapters import unwrap_empty_
from ..core.config import LoraConfig
from ..core.identity import FOLLOWER_TYPES, active_adapter, adapter_config, check_adapter_name, followers
from ..core.init import plain_config
from ..core.inject import (attach_, attach_settable, base_of, base_parameters, candidate_modules, check_not_merged,
                           check_residual_alone, new_parts, resolve)
from ..core.layers import DoraAdapter, LoraLayer, layer_class_for
from ..core.modules_to_save import ModuleToSave
from ..core.precision import precision_of
from ..errors import LoraError, problems_error
from . import peft
from .files import write_atomically
from .integrity import (base_fingerprint, checksum_started, fingerprint_problems, is_fingerprint, modules_precision,
                        non_finite, tensor_checksum)
from .peft import CONFIG_FILE, WEIGHTS_FILE

FORMAT_VERSION = "3"  # 3: tensor checksum, config read back; 2: sampled base fingerprint; 1: full fingerprint
FINGERPRINT_VERSIONS = ("2", "3")  # versions whose fingerprints compare with this one's
DEFAULT_ADAPTER = "default"
# lorakit's own metadata keys: save_adapter writes them and refuses them in `metadata`.
META_VERSION, META_ADAPTER, META_CONFIG = "lorakit_format_version", "lorakit_adapter", "lorakit_config"
META_FINGERPRINT, META_CHECKSUM = "lorakit_base_fingerprint", "lorakit_checksum"
META_BASE_DTYPE = "lorakit_base_dtype"  # the precision of the base it was trained on (float32 when absent)
RESERVED_KEYS = (META_VERSION, META_ADAPTER, META_CONFIG, META_FINGERPRINT, META_CHECKSUM, META_BASE_DTYPE)


# --- saving ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BaseRecord:
    """What an adapter file records of the frozen base under it: a fingerprint of the weights of the
    adapter's layers (integrity.base_fingerprint) and the base's precision. Take it with base_record
    while the weights are whole, e.g. before FSDP shards them; save_adapter takes it then."""

    fingerprint: dict[str, list[float]]
    precision: str


def base_record(model: nn.Module, adapter: str | None = None) -> BaseRecord:
    """The BaseRecord of the base under adapter `adapter` (default: the active one)."""
    adapter = active_adapter(model) if adapter is None else adapter
    adapter_config(model, adapter)  # raises for an unknown adapter
    modules = candidate_modules(model)
    layers = [p for p, m in modules if isinstance(m, LoraLayer) and m.holds(adapter)]
    return BaseRecord(base_fingerprint(dict(modules), layers), precision_of(model))


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str | None = None,
                 metadata: dict[str, str] | None = None, base: BaseRecord | None = None) -> Path:
    """Write adapter `adapter` (default: the active one) to `directory` in PEFT's layout.

    An adapter initialised with init='pissa' or 'olora' is written as the plain LoRA of rank 2r it equals on the
    original base weights (core.init.plain_factors, as PEFT's save_pretrained(...,
    path_initial_model_for_weight_conversion=...)), with their fingerprint: it loads onto the user's unmodified
    model, in lorakit or PEFT.
    `metadata` adds string entries to the safetensors header: keys start with 'lorakit_' and are
    not lorakit's own (RESERVED_KEYS). load_adapter reads back the name and the config. `base`: the
    base's record taken earlier (base_record), where its weights are not whole now (sharded); default:
    taken now.
    """
    extra = _checked_metadata(metadata)
    adapter = active_adapter(model) if adapter is None else adapter
    config = plain_config(adapter_config(model, adapter))  # raises for an unknown adapter; PiSSA/OLoRA: rank 2r
    modules = candidate_modules(model)
    tensors, task, written = adapter_tensors(model, modules, adapter)
    layers = {p: m for p, m in modules if isinstance(m, LoraLayer) and m.holds(adapter)}
    base = base_record(model, adapter) if base is None else base
    if set(base.fingerprint) != set(layers):
        raise LoraError(f"base: the record covers other layers than adapter {adapter!r} adapts ({len(base.fingerprint)} "
                        f"recorded, {len(layers)} here); take it with base_record(model, {adapter!r}) once the "
                        "adapter is added")
    header = {**adapter_metadata(adapter, config, base.fingerprint, tensor_checksum(tensors), base.precision),
              **extra}
    peft_config = peft.peft_config(model, modules, config, list(layers), layers, task, list(written))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    write_atomically(directory / WEIGHTS_FILE, lambda tmp: save_file(cpu, tmp, metadata=header))
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    write_atomically(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return directory


def _checked_metadata(metadata) -> dict[str, str]:
    extra = dict(metadata or {})
    bad = [k for k, v in extra.items() if not (isinstance(k, str) and k.startswith("lorakit_") and isinstance(v, str))]
    if bad:
        raise LoraError(f"metadata: keys {bad!r} must be strings starting with 'lorakit_', with string values")
    own = [k for k in extra if k in RESERVED_KEYS]
    if own:
        raise LoraError(f"metadata: {own!r} are lorakit's own keys, written by save_adapter itself; "
                        "use another 'lorakit_' name")
    return extra


def adapter_tensors(model: nn.Module, modules: peft.Modules,
                    adapter: str) -> tuple[dict[str, torch.Tensor], str | None, dict[str, nn.Module]]:
    """(PEFT key -> live tensor of adapter `adapter`, PEFT task_type, path -> module written in full).

    The tensors are the model's own (not copied): A and B (and DoRA's magnitude) of every layer holding the
    adapter, each module written in full, and the biases its bias mode trains.
    """
    tensors, paths, copies = {}, [], {}
    for path, module in modules:
        if isinstance(module, LoraLayer) and module.holds(adapter):
            part = module.adapters[adapter]
            keys = peft.adapter_keys(type(module), path, isinstance(part, DoraAdapter))
            tensors.update(zip(keys, (*part.plain_factors(), *part.trained()[2:]), strict=True))  # on the user's W0
            paths.append(path)
        elif isinstance(module, ModuleToSave) and module.holds(adapter):
            copies[path] = module.copies[adapter]
    task, written = peft.modules_written_in_full(model, modules, adapter, paths, copies)
    for path, module in written.items():
        state = module.state_dict()
        tensors.update({key: state[name] for key, name in peft.copy_keys(path, state).items()})
    tensors.update(peft.bias_params(modules, adapter_config(model, adapter).bias, paths, list(written)))
    return tensors, task, written


def adapter_metadata(adapter: str, config: LoraConfig, fingerprint: dict, checksum: str,
                     base_dtype: str) -> dict[str, str]:
    """The safetensors header entries lorakit writes besides PEFT's."""
    return {"format": "pt", META_VERSION: FORMAT_VERSION, META_ADAPTER: adapter,
            META_CONFIG: json.dumps(config.to_dict()), META_FINGERPRINT: json.dumps(fingerprint),
            META_CHECKSUM: checksum, META_BASE_DTYPE: base_dtype}


# --- loading ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Load:
    """A load, planned: the adapter's name, its config, its parts (path -> LoraAdapter or copy, filled
    from the file, not yet attached) and the bias values to copy in."""

    name: str
    config: LoraConfig
    parts: dict[str, nn.Module]
    biases: list[tuple[nn.Parameter, torch.Tensor]]
    modules: list[tuple[str, nn.Module]]  # candidate_modules(model) when planned


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str | None = None,
                 allow_base_mismatch: bool = False, reuse: Mapping[str, nn.Module] | None = None) -> str:
    """Load an adapter folder (lorakit's or PEFT's) into `model`; returns the adapter's name.

    The name is `adapter`, else the one the file was saved under, else "default". An adapter of
    that name already in the model is replaced whole (A, B, scale, dropout, config, modules to
    save, biases), as if it had never been there. Everything is checked and built before the model
    is touched; on any error the model is exactly as it was.

    `reuse`: a deleted adapter's parts (what lk.delete_adapter returned): the new adapter is built in
    those that fit (same path, shapes, dtype, device and dropout) instead of new modules, as
    lk.AdapterCache does with the adapter it evicts. They are overwritten, even by a load that fails.
    """
    load = _plan(model, Path(directory), adapter, allow_base_mismatch, reuse or {})
    _apply(model, load)
    return load.name


def _plan(model: nn.Module, directory: Path, adapter: str | None, allow_base_mismatch: bool,
          reuse: Mapping[str, nn.Module]) -> _Load:
    """Read the folder, then plan the load on the model while the file's checksum is computed; a damaged file
    is the error reported, whatever else planning found (as when the checksum was checked first)."""
    raw = peft.read_config(check_adapter_directory(directory))
    tensors, metadata, verify = _read_weights_started(directory / WEIGHTS_FILE)
    try:
        load = _plan_model(model, directory, raw, tensors, metadata, adapter, allow_base_mismatch, reuse)
    except BaseException:
        try:
            verify()
        except LoraError as damaged:
            raise damaged from None
        raise
    verify()
    return load


def _plan_model(model: nn.Module, directory: Path, raw: dict, tensors: dict, metadata: dict, adapter: str | None,
                allow_base_mismatch: bool, reuse: Mapping[str, nn.Module]) -> _Load:
    """The load of the file's adapter onto `model`, planned: every check, the new parts built off the model."""
    name = adapter if adapter is not None else metadata.get(META_ADAPTER, DEFAULT_ADAPTER)
    check_adapter_name(name)
    modules = candidate_modules(model)  # the one walk of the model: everything below reads this list
    check_not_merged(modules)
    check_residual_alone(modules, "default", name)  # a file is a plain LoRA (PiSSA/OLoRA are saved converted)
    _check_reusable(modules, reuse)
    paths = peft.resolve_targets(model, modules, raw, directory / CONFIG_FILE)
    saved = peft.resolve_saved(modules, raw, paths, directory / CONFIG_FILE)
    exact = peft.lorakit_config(raw, paths, saved)
    config = _written_config(model, modules, metadata, exact, paths, saved)
    if config is exact:  # lorakit's own checks (overlaps with other adapters, conv groups), which a written
        resolve(model, exact, modules)  # config has just passed if it rebuilds these modules with these ranks
    tensors = peft.without_bias_repeats(tensors, raw, saved)
    by_path = dict(modules)
    biases = peft.bias_params(modules, config.bias, paths, saved)
    _check_tensors(by_path, config, paths, saved, biases, tensors, directory)
    if not allow_base_mismatch:
        _check_fingerprint(by_path, paths, metadata, directory)
    factors = {path: tuple(tensors[k] for k in peft.adapter_keys(layer_class_for(base_of(by_path[path])), path,
                                                                 config.dora)) for path in paths}
    parts = new_parts(by_path, config, paths, saved, factors, reuse)
    with torch.no_grad():
        for path in saved:
            _fill_copy(parts[path], path, tensors)
    return _Load(name, config, parts, [(p, tensors[k]) for k, p in biases.items()], modules)


def _check_reusable(modules: list[tuple[str, nn.Module]], reuse: Mapping[str, nn.Module]) -> None:
    """Parts to reuse are off the model: building in them must not touch it."""
    if not isinstance(reuse, Mapping):
        raise LoraError(f"reuse={type(reuse).__name__}: give the dict lk.delete_adapter returned (path -> part)")
    if not reuse:
        return
    held = {id(part) for _, m in modules if isinstance(m, FOLLOWER_TYPES) for part in m.parts.values()}
    attached = [path for path, part in reuse.items() if id(part) in held]
    if attached:
        raise LoraError(f"reuse: the parts at {attached[:3]} belong to adapters on the model; pass the parts of a "
                        "deleted adapter (what lk.delete_adapter returned)")


def _written_config(model, modules, metadata: dict, exact: LoraConfig, paths: list[str], saved: list[str]) -> LoraConfig:
    """The LoraConfig the file was saved with (its patterns, targets=None and all), where it rebuilds
    exactly what the file holds on this model; else `exact` (PEFT's file, or a config edited by hand)."""
    text = metadata.get(META_CONFIG)
    try:
        written = LoraConfig(**json.loads(text)) if text is not None else None
        same = written is not None and resolve(model, written, modules) == (paths, saved) and \
            _same_scales(written, exact, paths) and \
            (written.dropout, written.bias, written.init, written.dora) == (exact.dropout, exact.bias, exact.init,
                                                                            exact.dora)
    except (LoraError, TypeError, ValueError, AttributeError):  # not a config this version reads: PEFT's wins
        same = False
    return written if same else exact


def _same_scales(written: LoraConfig, exact: LoraConfig, paths: list[str]) -> bool:
    """Both configs give every path the same rank, alpha and scale."""
    if not (written.rank_pattern or written.alpha_pattern or exact.rank_pattern or exact.alpha_pattern):
        paths = paths[:1]  # no patterns: every path gets each config's own rank and alpha
    return all((written.rank_for(p), written.alpha_for(p), written.scale_for(p)) ==
               (exact.rank_for(p), exact.alpha_for(p), exact.scale_for(p)) for p in paths)


def _fill_copy(part: nn.Module, path: str, tensors: dict) -> None:
    """Copy the file's tensors for `path` into a planned copy of a module to save."""
    state = part.state_dict()  # detached views of the copy's tensors
    for key, name in peft.copy_keys(path, state).items():
        state[name].copy_(tensors[key])


def _apply(model: nn.Module, load: _Load) -> None:
    """Replace any adapter of this name by the planned one, in one step undone on any error."""
    base = base_parameters(model, load.modules)
    grad_flags = [(p, p.requires_grad) for p in attach_settable(model, load.config.bias, base)]
    old_biases = [(p, p.detach().clone()) for p, _ in load.biases]
    replaced = [(module, module.drop(load.name)) for _, module in load.modules
                if isinstance(module, FOLLOWER_TYPES) and module.holds(load.name)]
    try:
        present = attach_(model, load.name, load.parts, load.config.bias, load.modules, base)
        with torch.no_grad():
            for param, value in load.biases:
                param.copy_(value)
    except BaseException:
        present = followers(model)  # attach_ may have wrapped some modules before it failed
        with torch.no_grad():
            for _, module in present:
                if module.holds(load.name):
                    module.drop(load.name)
            for module, part in replaced:
                module.put(load.name, part)
            for param, value in old_biases:
                param.copy_(value)
            for param, flag in grad_flags:
                param.requires_grad_(flag)
        unwrap_empty_(model, present)
        raise
    unwrap_empty_(model, present)  # modules only the replaced adapter used


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


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata, verified: finite values, and the checksum where lorakit wrote one."""
    tensors, metadata, verify = _read_weights_started(path)
    verify()
    return tensors, metadata


def _read_weights_started(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Callable[[], None]]:
    """The file's tensors and metadata, their values checked finite, and a function that checks the checksum
    (where lorakit wrote one), raising if it does not match: the hash is computed meanwhile, on another thread."""
    try:
        data = path.read_bytes()  # one read: the tensors and the metadata come from the same bytes
        tensors = safetensors.torch.load(data)
        metadata = _header(data).get("__metadata__") or {}
    except Exception as err:  # safetensors raises several types for corrupt or truncated files
        raise LoraError(f"{path}: not a readable safetensors file ({err}); the file is corrupt or "
                        "truncated: save the adapter again") from None
    bad = non_finite(tensors)
    if bad:
        raise LoraError(f"{path}: tensors hold NaN or Inf values: {', '.join(sorted(bad)[:5])}; "
                        "the adapter diverged in training: use an earlier checkpoint")
    checksum = metadata.get(META_CHECKSUM)
    digest = checksum_started(tensors) if checksum is not None else None

    def verify() -> None:
        if digest is not None and digest() != checksum:
            raise LoraError(f"{path}: the tensor data does not match the checksum stored with it ({META_CHECKSUM}); "
                            "the file was damaged after it was written: save the adapter again or restore a copy")
    return tensors, metadata, verify


def _header(data: bytes) -> dict:
    """The JSON header of a safetensors file's bytes (the file format: its length as 8 bytes, little-endian, then
    the JSON), read once safetensors.torch.load has validated them."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length])


def _check_tensors(modules: dict[str, nn.Module], config: LoraConfig, paths: list[str], saved: list[str],
                   biases: dict[str, nn.Parameter], tensors: dict, directory: Path) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for path in paths:
        base = base_of(modules[path])
        cls = layer_class_for(base)
        shape_a, shape_b = cls.adapter_shapes(base, config.rank_for(path))
        shapes = (tuple(shape_a), tuple(shape_b), (shape_b[0],))  # A, B, DoRA's magnitude
        expected.update(zip(peft.adapter_keys(cls, path, config.dora), shapes))
    factors = set(expected)  # floating point; a copy's buffers may be integers
    for path in saved:
        state = base_of(modules[path]).state_dict()
        expected.update({key: tuple(state[name].shape) for key, name in peft.copy_keys(path, state).items()})
    expected.update({k: tuple(p.shape) for k, p in biases.items()})
    problems = [f"missing key {k!r} (shape {list(s)})" for k, s in expected.items() if k not in tensors]
    problems += [f"unexpected key {k!r}" for k in tensors if k not in expected]
    problems += [
        f"key {k!r} has shape {list(tensors[k].shape)}, the model needs {list(s)}"
        for k, s in expected.items() if k in tensors and tuple(tensors[k].shape) != s
    ]
    problems += [f"key {k!r} has dtype {tensors[k].dtype}; LoRA factors are floating point"
                 for k in factors if k in tensors and not tensors[k].is_floating_point()]
    if problems:
        raise problems_error(f"{directory / WEIGHTS_FILE} does not fit this model", problems[:20])


def _check_fingerprint(modules: dict[str, nn.Module], paths: list[str], metadata: dict, directory: Path) -> None:
    if META_FINGERPRINT not in metadata or metadata.get(META_VERSION) not in FINGERPRINT_VERSIONS:
        return  # PEFT's file, or another fingerprint method: nothing comparable
    try:
        saved = json.loads(metadata[META_FINGERPRINT])
    except json.JSONDecodeError:
        saved = None
    if not is_fingerprint(saved):
        raise LoraError(f"{directory / WEIGHTS_FILE}: metadata {META_FINGERPRINT} is not a fingerprint; "
                        "pass allow_base_mismatch=True to load anyway")
    trained_on, here = metadata.get(META_BASE_DTYPE, "float32"), modules_precision(modules, paths)
    bad = fingerprint_problems(saved, base_fingerprint(modules, paths), (trained_on, here))
    if not bad and trained_on != here:
        warnings.warn(f"{directory}: the adapter was trained on a {trained_on} base and this base is {here}: "
                      "the same model, but outputs differ from training's by the two precisions' rounding",
                      stacklevel=5)  # the caller of load_adapter
    if bad:
        raise LoraError(
            f"{directory}: the adapter was trained on different base weights ({len(bad)} module(s) differ, "
            f"e.g. {bad[0]!r}); load it onto the model it was trained on, or pass allow_base_mismatch=True"
        )


# --- reading the files as they are --------------------------------------------------------------
def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config.json, tensors by PEFT key, safetensors metadata) of an adapter folder, read
    without a model: the config type-checked, the tensors finite and matching their checksum."""
    directory = check_adapter_directory(directory)
    raw = peft.read_config(directory)
    tensors, metadata = _read_weights(directory / WEIGHTS_FILE)
    return raw, tensors, metadata


# --- reading the factors alone --------------------------------------------------------------------
def read_factors(directory: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scale) per adapted module of an adapter folder, read without a model: enough to study
    the update dW = scale * B @ A itself (lorakit.analysis). Paths are the file's own; A is
    (r, fan_in[, *kernel]), B (d_out, r[, *ones]), as stored."""
    raw, tensors, _ = read_adapter(directory)
    if raw.get("use_dora"):
        raise LoraError(f"{directory}: a DoRA adapter (use_dora=true): its update m * (W0 + dW) / ||W0 + dW|| - W0 "
                        "depends on the base weights, which the folder does not hold; analyse it on the model it "
                        "was trained on (`lorakit analyze ADAPTER --base MODEL`)")
    pairs = peft.factor_pairs(tensors, Path(directory) / WEIGHTS_FILE)
    config = peft.lorakit_config(raw, list(pairs), [])
    return {path: (tensors[a], tensors[b], config.scale_for(path)) for path, (a, b) in pairs.items()}


# --- inspecting -------------------------------------------------------------------------------------
def adapter_info(directory: str | os.PathLike) -> dict:
    """What an adapter directory holds: its config, adapted modules, parameter count, file sizes and
    lorakit metadata. Reads the JSON config and the safetensors header only (no tensor data, no pickle)."""
    directory = check_adapter_directory(directory)
    raw = peft.read_config(directory)
    weights = directory / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}
    except Exception as err:  # safetensors raises several types for corrupt or truncated files
        raise LoraError(f"{weights}: not a readable safetensors file ({err}); save the adapter again") from None
    fingerprint = metadata.get(META_FINGERPRINT)
    return {
        "directory": str(directory),
        "config": {
            "rank": raw["r"], "alpha": raw.get("lora_alpha", 8), "targets": raw["target_modules"],
            "dropout": raw.get("lora_dropout", 0.0), "bias": raw.get("bias", "none"),
            "rslora": bool(raw.get("use_rslora", False)), "dora": bool(raw.get("use_dora", False)),
            "rank_pattern": raw.get("rank_pattern") or {}, "alpha_pattern": raw.get("alpha_pattern") or {},
        },
        "modules": sum(key.endswith((".lora_A.weight", ".lora_embedding_A")) for key in shapes),
        "parameters": sum(math.prod(shape) for shape, _ in shapes.values()),
        "dtypes": sorted({dtype for _, dtype in shapes.values()}),
        "files": {name: (directory / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE)},
        "format_version": metadata.get(META_VERSION),  # None: not written by lorakit (e.g. PEFT)
        "adapter": metadata.get(META_ADAPTER),
        "task": metadata.get("lorakit_task"),
        "label_names": _label_names(metadata.get("lorakit_label_names"), weights),
        "base_model": metadata.get("lorakit_base_model") or raw.get("base_model_name_or_path"),
        "base_dtype": metadata.get(META_BASE_DTYPE),
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
