"""The models bench/perf.py measures, and the same rank-8 adapter on them through lorakit and PEFT.

Shared by the parent (bench/perf.py) and the training-step child (bench/perf_step.py), so both
build exactly the same thing from a model name.
"""
from __future__ import annotations

import copy
import gc
import re
import tempfile
from pathlib import Path

import torch
import transformers
from torch import nn

import lorakit as lk

# GPT2Config() overrides per name ({}: GPT-2 small, 124M); anything else is a lorakit bundled model.
GPT2_SHAPES = {
    "gpt2-small": {},
    "gpt2-tiny": dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32),  # the smoke test's
}
TARGETS = {"gpt2-small": ("c_attn",), "gpt2-tiny": ("c_attn",), "smollm2-135m": ("q_proj", "v_proj")}
TITLES = {"gpt2-small": "GPT-2 small (124M, random init from GPT2Config())",
          "gpt2-tiny": "GPT-2 tiny (smoke-test shape)",
          "smollm2-135m": "SmolLM2-135M (pretrained, bundled)"}


def build_base(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM in eval mode: GPT-2 shapes are random-initialised (seed 0), others loaded offline."""
    torch.manual_seed(0)
    if name in GPT2_SHAPES:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_SHAPES[name]))
        return model.to(dtype).eval()
    from lorakit.core.precision import BasePrecision
    from lorakit.zoo import load_task_model

    return load_task_model(name, "causal-lm", base=BasePrecision(base_dtype=str(dtype).removeprefix("torch."))).eval()


# --- a base in another precision, loaded the way each library's users load it ----------------------------------
def model_source(name: str, directory: Path) -> Path:
    """Where `name` loads from: a bundled model's own directory, or a GPT-2 shape built by build_base (random
    init, seed 0) and saved into `directory`, so that every configuration loads it as a pretrained model."""
    if name not in GPT2_SHAPES:
        from lorakit.zoo import model_directory

        return model_directory(name)
    build_base(name).save_pretrained(directory)
    return Path(directory)


def load_base(directory: str | Path, base: str, loader: str) -> nn.Module:
    """The causal LM saved in `directory`, in eval mode, its frozen base stored in `base` (lk.BASE_DTYPES):
    loader "lorakit" through lk.load_base (what `lorakit train --base-dtype` does), "transformers" as
    PEFT's QLoRA guide does: from_pretrained with the dtype, and a BitsAndBytesConfig for int8 and nf4."""
    if loader == "lorakit":
        return lk.load_base(str(directory), base).eval()
    kwargs = {"dtype": getattr(torch, base)} if base in ("float32", "bfloat16", "float16") else {
        "dtype": torch.bfloat16, "quantization_config": bitsandbytes_config(base)}
    return transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **kwargs).eval()


def bitsandbytes_config(base: str) -> transformers.BitsAndBytesConfig:
    """The quantization PEFT users ask transformers for (QLoRA: NF4, double-quantized scales, bfloat16 compute;
    LLM.int8 with its default outlier threshold), written out here rather than taken from lorakit."""
    if base == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    if base == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"base={base!r}: bitsandbytes quantizes to int8 or nf4")


def add_lorakit(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
                random_b: bool = False, seed: int = 1, dora: bool = False) -> nn.Module:
    """Inject a rank-`rank` adapter "default" (DoRA with dora=True) in place; random_b: B ~ N(0, 0.02) so it
    changes the output."""
    torch.manual_seed(seed)
    lk.inject_(model, lk.LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=targets, dora=dora))
    if random_b:
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                layer.adapters["default"].B.normal_(std=0.02)
    return model


def add_peft(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, dora: bool = False):
    """A trainable PEFT LoRA (or DoRA) model around `model` (fresh adapter: B = 0), the same adapter as
    add_lorakit's; GPT-2's Conv1D stores its weight transposed."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none",
                             fan_in_fan_out=isinstance(model, transformers.GPT2PreTrainedModel), use_dora=dora)
    return peft.get_peft_model(model, config)


def peft_from_lorakit(base: nn.Module, lorakit_model: nn.Module) -> nn.Module:
    """A PEFT model around a copy of `base` holding lorakit_model's adapter, read from lorakit's files."""
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        lk.save_adapter(lorakit_model, tmp)
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()


def adapted_weights(model: nn.Module, library: str) -> dict[str, torch.Tensor]:
    """path -> the base weight tensor of every adapted layer (the tensor merging writes into)."""
    if library == "lorakit":
        return {path: layer.base_layer.weight for path, layer in lk.lora_layers(model)}
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {path: module.get_base_layer().weight for path, module in model.named_modules()
            if isinstance(module, PeftLoraLayer)}


def random_ids(model: nn.Module, batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    """(batch, seq) random token ids, the same for every variant."""
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --- process memory (Linux /proc) ---------------------------------------------------------------------
def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (kB there), in MB; None off Linux."""
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def rss_mb() -> float | None:
    """Resident set size of this process now, MB (None off Linux)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float | None:
    """The kernel's high-water mark of this process's RSS (VmHWM) since start or reset_peak_rss()."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Start a new RSS high-water mark from the current RSS (Linux >= 4.0); False if not possible."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS is what is live
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
