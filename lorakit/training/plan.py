"""Planning a run before making it: trainable parameters, adapter file size and peak training memory.

    plan("smollm2-135m", rank=8, targets=("q_proj", "v_proj"), batch=8, seq=128)

The model is built from its config on fake tensors (shapes and dtypes, no storage), so no weights
are loaded or allocated, stored as the base precision says: in float32, bfloat16 or float16, or with
its linear layers quantized to int8 / nf4 (bitsandbytes' layers, represented by the stand-ins of
plan_quantized: what they store, what their forward and backward allocate) and the rest in the compute
dtype. Peak memory is predicted per process for one step of `lorakit train` (LoRA, and float32 full
fine-tuning for comparison), in one process or in world_size processes by DDP or FSDP2, as plan_memory
states it; for one process

    weights + AdamW states + max(forward/backward peak, gradients + optimizer-step temporaries)

where the forward/backward peak (activations saved for backward, transients, gradients as they
appear) is found by running that step's forward and backward on the fake model and counting the
bytes of every tensor the step creates while it is alive (plan_trace): the activations follow from the
architecture (layers, hidden size, heads, vocabulary, batch, sequence, dtype) as torch lays them out.
A deep model of alike layers is traced with a few of them and scaled per layer: a 70B plans in seconds.
Predictions are for CPU kernels (bitsandbytes' included); a GPU's attention kernels usually keep less.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..core.config import LoraConfig, option
from ..core.identity import adapter_config
from ..core.init import plain_config
from ..core.inject import candidate_modules, inject_
from ..core.layers import LoraLayer
from ..core.precision import BASE_DTYPES, BasePrecision
from ..core.targets import default_targets
from ..errors import LoraError, problems_error
from ..io.adapter_files import adapter_metadata, adapter_tensors
from ..io.integrity import base_fingerprint
from ..zoo import HEADS
from .plan_memory import STRATEGIES, default_strategy, process_memory, strategy_problems
from .plan_models import PUBLISHED, model_config
from .plan_quantized import stand_in_quantized_
from .plan_trace import Trace, step_trace

# A base-weight fingerprint entry of typical length, for when no weights are at hand (fake model).
TYPICAL_FINGERPRINT = [-1.2345678901234567e-05, 0.012345678901234567, -0.012345678901234567]


@dataclass(frozen=True)
class PlanConfig:
    """What to plan. Every field is also a `lorakit plan` option (underscores become dashes); `lora`'s and
    `base`'s fields are options of their own (--rank, --targets, --base-dtype, ...), as in `lorakit train`."""

    model: str = option("smollm2-135m", "a published architecture, built from its config alone "
                                        f"({', '.join(PUBLISHED)}), a config.json file, a bundled model (smollm2-135m, "
                                        "minilm-l6) or a transformers model directory")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "the adapter lorakit train would inject"})
    base: BasePrecision = field(default_factory=BasePrecision, metadata={
        "help": "how the frozen base is stored, as lorakit train stores it: float32, bfloat16, float16, or "
                "quantized to int8 / nf4 (the full fine-tuning comparison stays float32)"})
    batch: int = option(8, "examples per forward pass over all processes (lorakit train's batch_size / grad_accum); "
                           "each process takes batch / world_size")
    seq: int = option(128, "tokens per example (lorakit train's max_length)")
    bf16: bool = option(False, "bfloat16 autocast for forward and backward")
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    world_size: int = option(1, "training processes, one per GPU (torchrun's nnodes x nproc_per_node); memory is "
                                "predicted per process")
    strategy: str | None = option(None, "how the processes share the model: single (one process), ddp (each holds "
                                        "all of it), fsdp (FSDP2: parameters, gradients and AdamW states sharded, "
                                        "one decoder layer per unit) (default: single; ddp if --world-size > 1)",
                                  choices=STRATEGIES)

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)!r}: must be a positive integer" for k in ("batch", "seq")
                    if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool)
                    or getattr(self, k) < 1]
        if not isinstance(self.lora, LoraConfig):
            problems.append(f"lora={self.lora!r}: must be a LoraConfig, e.g. lora=LoraConfig(rank=8)")
        if not isinstance(self.base, BasePrecision):
            problems.append(f"base={self.base!r}: must be a BasePrecision, e.g. base=BasePrecision(base_dtype='nf4')")
        problems += strategy_problems(self.world_size, self.strategy, self.batch,
                                      isinstance(self.base, BasePrecision) and self.base.quantized)
        if problems:
            raise problems_error("invalid plan options", problems)
        if self.strategy is None:  # resolved once, here: what runs is what the config says
            object.__setattr__(self, "strategy", default_strategy(self.world_size))

    def run(self) -> dict:
        result = plan(self.model, self.lora, self.batch, self.seq, base=self.base, bf16=self.bf16,
                      grad_checkpointing=self.grad_checkpointing, world_size=self.world_size, strategy=self.strategy)
        return {**result, "model": self.model}  # the name given, not the folder it resolved to


def plan(model_or_config, lora: LoraConfig = LoraConfig(), batch: int = 8, seq: int = 128, *,
         base: BasePrecision | str = BasePrecision(), bf16: bool = False, grad_checkpointing: bool = False,
         world_size: int = 1, strategy: str | None = None, full: bool = True, **lora_fields) -> dict:
    """Trainable parameters, adapter file bytes and predicted peak training memory per process, LoRA and full.

    model_or_config: a published architecture (plan_models.PUBLISHED), a config.json file, a bundled name
    or model directory (str or path), a transformers config, or a transformers model (read, never
    changed; its weights make the adapter size exact to the byte). batch: examples per forward pass over
    all world_size processes, each taking batch / world_size; strategy: single, ddp or fsdp (None: ddp
    if world_size > 1), whose per-process terms plan_memory states.
    lora: the adapter to plan for; `lora_fields` (rank=8, targets=(...), ...) change some of its
    fields, as `lora.replace(...)` does. base: how the frozen base is stored (a BasePrecision or one of
    BASE_DTYPES), as lorakit train stores it; full fine-tuning, for comparison, is planned in float32 (what
    `lorakit train --full` trains), and not at all with full=False ("full" is then None).
    Returns {"model", "batch", "seq", "world_size", "strategy", "base", "total_parameters", "lora": {...},
    "full": {...}}; each mode has trainable_parameters and the bytes per process of weights, gradients,
    optimizer_states, activations (saved for backward at the end of the forward pass), gradient_bucket
    (ddp), gathered_parameter and reduce_scatter (fsdp), and peak; "lora" also adapter_file_bytes and
    targets (as given, or the architecture's default).
    """
    if not isinstance(lora, LoraConfig):
        raise LoraError(f"lora={lora!r}: must be a LoraConfig, e.g. lora=LoraConfig(rank=8)")
    base = BasePrecision(base_dtype=base) if isinstance(base, str) else base
    if not isinstance(base, BasePrecision):
        raise LoraError(f"base={base!r}: must be a BasePrecision or one of {', '.join(BASE_DTYPES)}")
    problems = strategy_problems(world_size, strategy, batch, base.quantized)
    if problems:
        raise problems_error("invalid plan options", problems)
    strategy = strategy or default_strategy(world_size)
    config, weights = _config_of(model_or_config)
    lora_config = lora.replace(**lora_fields) if lora_fields else lora
    step = _Step(batch // world_size, seq, bf16, grad_checkpointing, world_size, strategy)
    lora_model, total, lora_result = _dry_run(config, lora_config, base, step)
    lora_result["adapter_file_bytes"] = _adapter_file_bytes(lora_model, weights, base.base_dtype)
    lora_result["targets"] = list(lora_config.targets or default_targets(lora_model))
    return {"model": getattr(config, "_name_or_path", "") or config.model_type, "batch": batch, "seq": seq,
            "world_size": world_size, "strategy": strategy, "base": dataclasses.asdict(base),
            "total_parameters": total, "lora": lora_result,
            "full": _dry_run(config, None, BasePrecision(), step)[2] if full else None}


# --- the model, on fake tensors ------------------------------------------------------------------------
def _config_of(model_or_config):
    """(transformers config, the real model if one was given)."""
    if isinstance(model_or_config, transformers.PreTrainedModel):
        return model_or_config.config, model_or_config
    if isinstance(model_or_config, transformers.PretrainedConfig):
        return model_or_config, None
    if isinstance(model_or_config, (str, os.PathLike)):
        return model_config(model_or_config), None
    raise LoraError(f"model={type(model_or_config).__name__}: give a published architecture, a config.json file, a "
                    "bundled model name, a transformers model directory, config or model")


def _fake_model(config, base: BasePrecision, fake: FakeTensorMode) -> tuple[nn.Module, int]:
    """(the model stored as `base` stores it, on fake tensors; its parameter count before quantization)."""
    with fake:
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=base.torch_dtype)
        except ValueError as err:  # e.g. an encoder such as minilm-l6
            raise LoraError(f"model={getattr(config, '_name_or_path', config.model_type)!r}: plan covers causal "
                            f"language models ({err})") from None
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        if base.quantized:  # as load_task_model stores it: every linear layer but the output head
            heads = tuple(model.get_submodule(name) for name in HEADS if hasattr(model, name))
            stand_in_quantized_(model, base, keep=heads)
    return model, total


@dataclass(frozen=True)
class _Step:
    """One training step's shape on one process: its examples, tokens each, autocast, activation
    recomputation; and how many processes take such a step, by which strategy."""

    batch: int
    seq: int
    bf16: bool
    grad_checkpointing: bool
    world_size: int = 1
    strategy: str = "single"


def _dry_run(config, lora_config: LoraConfig | None, base: BasePrecision,
             step: _Step) -> tuple[nn.Module, int, dict]:
    """One training step's forward and backward on a fake model; (the model, its parameter count, the
    bytes per process the step would take). lora_config None: full fine-tuning."""
    model, total, fake = _prepared(config, lora_config, base, step)
    return model, total, process_memory(model, _trace(model, fake, lora_config, base, step), step.strategy,
                                        step.world_size)


def _prepared(config, lora_config: LoraConfig | None, base: BasePrecision, step: _Step):
    """(the fake model as lorakit train trains it, its parameter count, its fake mode)."""
    fake = _FakeMode()
    model, total = _fake_model(config, base, fake)
    _prepare(model, lora_config, step.grad_checkpointing, fake)
    return model, total, fake


def _trace(model: nn.Module, fake, lora_config: LoraConfig | None, base: BasePrecision, step: _Step) -> Trace:
    """The step traced on `model`, or on shallower copies of it (plan_trace.step_trace)."""
    def build(config) -> tuple[nn.Module, FakeTensorMode]:
        shallow, _, shallow_fake = _prepared(config, lora_config, base, step)
        return shallow, shallow_fake

    return step_trace(model, fake, build, step.batch, step.seq, step.bf16)


def _prepare(model: nn.Module, lora_config: LoraConfig | None, grad_checkpointing: bool, fake) -> None:
    """Make the fake model what lorakit train trains: adapters injected (or every weight trainable)."""
    with fake:
        if lora_config is None:
            model.requires_grad_(True)
        else:
            with warnings.catch_warnings():  # copying a module to save reads its fake tensors' (absent) data pointer
                warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
                inject_(model, lora_config)
        if grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()


class _FakeMode(FakeTensorMode):
    """A FakeTensorMode that deep copies of its tensors (a module to save's copy) share: a fake tensor
    carries its mode, and a copied mode would be a second one, which no op can mix with the first."""

    def __deepcopy__(self, memo: dict) -> "_FakeMode":
        return self


# --- the adapter file --------------------------------------------------------------------------------
def _adapter_file_bytes(model: nn.Module, weights: nn.Module | None, base_dtype: str) -> int:
    """Size of the adapter_model.safetensors that save_adapter writes for this (fake) injected model:
    the same tensors and metadata save_adapter builds (adapter_files.adapter_tensors/adapter_metadata).

    Tensor data exactly; the header too when the real model's weights give the base fingerprint,
    otherwise to within a few bytes per adapted module.
    """
    modules = candidate_modules(model)
    tensors, _, _ = adapter_tensors(model, modules, "default")
    paths = [p for p, m in modules if isinstance(m, LoraLayer)]
    fingerprint = base_fingerprint(dict(candidate_modules(weights)), paths) if weights is not None else \
        {path: TYPICAL_FINGERPRINT for path in paths}
    checksum = "0" * 64  # a sha256 in hex: its length is all the size depends on
    metadata = adapter_metadata("default", plain_config(adapter_config(model, "default")), fingerprint, checksum,
                                base_dtype)
    return _safetensors_bytes({k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, metadata)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def _safetensors_bytes(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> int:
    """A safetensors file of these (shape, dtype)s: 8-byte header length, JSON header padded to 8, data."""
    header, offset = {"__metadata__": metadata}, 0
    for name in sorted(tensors):  # the format orders tensors by dtype, then name (one dtype here: offsets alike)
        shape, dtype = tensors[name]
        size = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(text) + (-len(text)) % 8 + offset
