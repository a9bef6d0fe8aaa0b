"""TrainConfig: one training run's options, frozen and validated once; every field is a `lorakit train` option."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..core.config import LoraConfig, option
from ..core.precision import BasePrecision
from ..errors import problems_error
from .datasets import TASKS
from .parallel import INT8_UNSHARDABLE, STRATEGIES

SCHEDULES = ("constant", "linear", "cosine")
REPORTERS = ("tensorboard",)


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Every field is also a `lorakit train` option (underscores become dashes);
    `lora`'s fields are options of their own (--rank, --targets, ...).

        TrainConfig(model="minilm-l6", task="classify", data="data/wordnet_supersenses.jsonl",
                    lora=LoraConfig(rank=8, targets=("query", "value")))
    """

    model: str = option("smollm2-135m", "bundled model name (smollm2-135m, minilm-l6) or a transformers model directory")
    data: str = option("data/kjv_sample.txt", "training data: .txt, JSONL {text} or {prompt,response}; classify: JSONL/CSV {text,label}")
    task: str = option("causal-lm", "causal-lm or classify", choices=TASKS)
    out: str = option("out/run", "output folder: adapter/, checkpoints/, log.jsonl, summary.json, loss.png")
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={
        "help": "the adapter to train (ignored with --full); classify adds the new classifier head to its "
                "modules_to_save"})
    base: BasePrecision = field(default_factory=BasePrecision, metadata={
        "help": "how the frozen base is stored: float32, bfloat16, float16, or quantized to int8 / nf4 "
                "(bitsandbytes) as it loads; adapters stay float32"})
    full: bool = option(False, "full fine-tuning of every weight instead of LoRA (same loop, for comparison)")
    steps: int = option(100, "optimiser steps")
    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lora_plus_ratio: float | None = option(
        None, "LoRA+ (Hayou et al., 2024): B's learning rate is this many times lr (A's), e.g. 16; adapters on "
              "embeddings train at 1e-6, as PEFT's LoRA+ does; default: off (one learning rate)")
    warmup: int = option(0, "linear warm-up steps")
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=SCHEDULES)
    batch_size: int = option(8, "examples per optimiser step, over all processes and accumulation steps")
    grad_accum: int = option(1, "micro-batches per optimiser step (batch_size must divide evenly)")
    max_length: int = option(128, "tokens per example (longer texts are split or truncated)")
    eval_fraction: float = option(0.1, "share of the data held out for evaluation (0: none)")
    train_examples: int = option(0, "train on a seeded random N of the examples left after the held-out split "
                                    "(0: all); the held-out set stays the same, so data sizes compare on it")
    eval_every: int = option(0, "evaluate every N steps (0: only at the start and end)")
    save_every: int = option(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    seed: int = option(0, "random seed (data order, initialisation, dropout)")
    clip: float = option(1.0, "gradient-norm clipping (0: off)")
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    bf16: bool = option(False, "bfloat16 autocast for forward and backward")
    max_bad_steps: int = option(5, "stop after this many consecutive steps with NaN/Inf loss or gradients")
    resume: str | None = option(None, "continue from the latest checkpoint of this run folder")
    strategy: str | None = option(
        None, "how the processes torchrun starts share the work: ddp (each holds the whole model; the adapters' "
        "gradients are all-reduced) or fsdp (the frozen base and the adapters sharded across them, per "
        "transformer block, for a base too large for one device); default: ddp under torchrun, none alone",
        choices=STRATEGIES)
    progress: bool = option(True, "show a progress bar")
    report_to: str | None = option(None, "also log loss, lr and eval metrics to: tensorboard (event files in "
                                         "OUT/tensorboard/)", choices=REPORTERS)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise problems_error("invalid training options", problems)

    def _problems(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.base, BasePrecision):
            p.append(f"base={self.base!r}: must be a BasePrecision, e.g. base=BasePrecision(base_dtype='nf4')")
        elif self.full and self.base.base_dtype != "float32":
            p.append(f"base_dtype={self.base.base_dtype!r} with full=True: full fine-tuning trains every weight, "
                     "which stays float32; use --bf16 (autocast) to compute in bfloat16")
        if not isinstance(self.lora, LoraConfig):
            p.append(f"lora={self.lora!r}: must be a LoraConfig, e.g. lora=LoraConfig(rank=8, targets=('q_proj', "
                     "'v_proj'))")
        positive = ("steps", "batch_size", "grad_accum", "max_length")
        p += [f"{k}={getattr(self, k)!r}: must be a positive integer" for k in positive
              if not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        non_negative = ("train_examples", "warmup", "eval_every", "save_every", "keep_checkpoints", "clip", "weight_decay", "max_bad_steps")
        p += [f"{k}={getattr(self, k)!r}: must be >= 0" for k in non_negative if getattr(self, k) < 0]
        if self.task not in TASKS:
            p.append(f"task={self.task!r}: must be one of {', '.join(TASKS)}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            p.append(f"strategy={self.strategy!r}: must be one of {', '.join(STRATEGIES)} (or None: ddp under "
                     "torchrun, none alone)")
        if self.strategy == "fsdp" and isinstance(self.base, BasePrecision) and self.base.base_dtype == "int8":
            p.append(f"base_dtype='int8' with strategy='fsdp': {INT8_UNSHARDABLE}")
        if self.report_to is not None and self.report_to not in REPORTERS:
            p.append(f"report_to={self.report_to!r}: must be one of {', '.join(REPORTERS)} (or None: the JSONL log "
                     "and loss.png only)")
        if self.schedule not in SCHEDULES:
            p.append(f"schedule={self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        if not 0 <= self.eval_fraction < 1:
            p.append(f"eval_fraction={self.eval_fraction!r}: must be in [0, 1)")
        if not self.lr > 0:
            p.append(f"lr={self.lr!r}: must be positive, e.g. 2e-4 for LoRA, 2e-5 for full fine-tuning")
        p += self._lora_plus_problems()
        if isinstance(self.batch_size, int) and isinstance(self.grad_accum, int) and self.grad_accum >= 1 \
                and self.batch_size % self.grad_accum:
            p.append(f"grad_accum={self.grad_accum}: must divide batch_size={self.batch_size}")
        return p

    def _lora_plus_problems(self) -> list[str]:
        ratio = self.lora_plus_ratio
        if ratio is None:
            return []
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
            return [f"lora_plus_ratio={ratio!r}: must be a positive number, e.g. 16 (B learns 16 times faster "
                    "than A), or None for one learning rate"]
        if self.full:
            return [f"lora_plus_ratio={ratio!r} with full=True: LoRA+ sets the learning rate of LoRA's B factors, "
                    "which full fine-tuning has none of; drop one of the two"]
        return []

    def adapter_config(self, head: str | None) -> LoraConfig:
        """The LoraConfig to inject: `lora`, with a classifier's new `head` (if any) among its modules to save."""
        if head is None or head in self.lora.modules_to_save:
            return self.lora
        return self.lora.replace(modules_to_save=(*self.lora.modules_to_save, head))

    def to_dict(self) -> dict:
        """Plain JSON-ready fields, `lora` as a nested dict (from_dict reads it back)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "lora": self.lora.to_dict(), "base": dataclasses.asdict(self.base)}

    @classmethod
    def from_dict(cls, fields: dict) -> "TrainConfig":
        """The config `to_dict` wrote."""
        return cls(**{**fields, "lora": LoraConfig(**fields.get("lora", {})),
                      "base": BasePrecision(**fields.get("base", {}))})
