"""Fine-tuning runs: LoRA (or full fine-tuning, for comparison) on a causal LM or a classifier.

One loop for both modes, so they compare on equal terms. Reads top to bottom:
set-up -> model -> data -> strategy (parallel.py) -> optimiser -> [resume] -> steps (accumulate,
reduce, clip, step, log, evaluate, checkpoint) -> final save, summary, loss curve.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..analysis.figures import plot_loss_curve
from ..core.inject import inject_
from ..core.params import parameter_counts
from ..errors import LoraError
from ..io.adapter_files import base_record, save_adapter
from ..io.files import write_text_atomically
from ..zoo import classifier_head, load_task_model, load_tokenizer
from .batches import BatchStream, collate, padding_id, target_count
from .checkpoint import (TrainingState, load_checkpoint, optimizer_groups, restore_trainable_, save_checkpoint,
                         trainable_tensors)
from .config import TrainConfig
from .datasets import load_dataset, sample_dataset, split_dataset
from .distributed import World, all_reduce_sum, barrier, close_world, gather_rng, init_world, set_rng_state
from .events import EventLog
from .lora_plus import lora_plus_groups
from .loss import summed_causal_lm_loss
from .parallel import gradient_norm, parallelize, strategy_for

LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class TrainResult:
    """What a run produced; `model` is the trained model (adapter active, unmerged)."""

    steps: int
    trainable: int
    total: int
    first_eval: dict
    last_eval: dict
    best_eval: dict
    skipped_steps: int
    seconds: float
    out: Path
    saved_bytes: int
    model: nn.Module = field(repr=False, default=None)


def train(cfg: TrainConfig) -> TrainResult:
    """Run `cfg`; under torchrun, every process calls this and rank 0 writes the files."""
    world = init_world()
    try:
        return _Run(cfg, world).run()
    finally:
        close_world(world)


class _Run:
    """The state of one training run; methods are the stages of the loop."""

    def __init__(self, cfg: TrainConfig, world: World) -> None:
        self.cfg, self.world = cfg, world
        self.strategy = strategy_for(cfg.strategy, world)  # before anything loads
        self.out = Path(cfg.out)
        self.tokenizer = load_tokenizer(cfg.model)
        data = load_dataset(cfg.data, cfg.task, self.tokenizer, cfg.max_length)
        self.label_names = data.label_names
        torch.manual_seed(cfg.seed)  # the same head initialisation and LoRA A on every process
        self.model = load_task_model(cfg.model, cfg.task, data.label_names, cfg.base)
        self.head = classifier_head(self.model) if cfg.task == "classify" else None
        self.train_data, self.eval_data = split_dataset(data, cfg.eval_fraction, cfg.seed)
        self.train_data = sample_dataset(self.train_data, cfg.train_examples, cfg.seed)
        self.pad_id = padding_id(self.tokenizer)
        self._prepare_model()
        self.base = None if cfg.full else base_record(self.model)  # while the base is whole (before FSDP)
        self.parallel = parallelize(self.model, self.strategy, world)
        self.parallel.module.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP's sharded ones, if FSDP
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if cfg.batch_size % (world.size * cfg.grad_accum):
            raise LoraError(f"batch_size={cfg.batch_size}: must be a multiple of processes x grad_accum "
                            f"= {world.size} x {cfg.grad_accum}")
        self.stream = BatchStream(len(self.train_data.examples), cfg.batch_size, cfg.seed, world.rank, world.size)
        self.step, self.bad_in_a_row, self.skipped = 0, 0, 0
        self.evals: list[dict] = []
        self.events = EventLog(self.out, cfg.report_to if world.is_main else None)

    # --- set-up ---------------------------------------------------------------------------------
    def _prepare_model(self) -> None:
        cfg, model = self.cfg, self.model
        if cfg.full:
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            inject_(model, cfg.adapter_config(self.head))
        if cfg.grad_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise LoraError(f"grad_checkpointing: {type(model).__name__} does not support it; drop the option")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _param_groups(self) -> list:
        """What AdamW trains: the trainable tensors, in LoRA+'s groups with --lora-plus-ratio (the schedule
        scales every group's lr alike)."""
        cfg = self.cfg
        if cfg.lora_plus_ratio is None:
            return self.params
        return lora_plus_groups(self.model, cfg.lr, cfg.lora_plus_ratio, cfg.weight_decay)

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, world = self.cfg, self.world
        began = time.perf_counter()
        if world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self._resume()  # the log of the run goes on
        elif world.is_main:
            (self.out / LOG_FILE).write_text("")
        trainable, total = parameter_counts(self.model)
        if not self.evals:
            self.evals.append(self.evaluate())
            self._log(self.evals[-1])
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (cfg.progress and world.is_main),
                   dynamic_ncols=True)
        while self.step < cfg.steps:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
            self._log(record)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self.evals.append(self.evaluate())
                self._log(self.evals[-1])
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.checkpoint()
        bar.close()
        self.evals.append(self.evaluate())
        self._log(self.evals[-1])
        self.checkpoint()
        self.events.close()
        saved = self.save_final()
        result = TrainResult(self.step, trainable, total, self.evals[0], self.evals[-1], self._best(),
                             self.skipped, time.perf_counter() - began, self.out, saved, self.model.eval())
        if world.is_main:
            self._write_summary(result)
        return result

    def train_step(self) -> dict:
        """One optimiser step over one global batch; NaN/Inf steps are skipped and counted."""
        cfg, world = self.cfg, self.world
        started = time.perf_counter()
        indices = self.stream.next_indices()
        batch = [self.train_data.examples[i] for i in indices]
        micro = len(batch) // cfg.grad_accum
        chunks = [collate(batch[i * micro:(i + 1) * micro], self.pad_id) for i in range(cfg.grad_accum)]
        # Loss is a sum over the global batch divided by its size, so processes and micro-batches add up.
        counts = all_reduce_sum(world, torch.tensor([float(sum(target_count(c) for c in chunks))]))
        denominator = counts.item()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros(1)
        for i, chunk in enumerate(chunks):
            with self.parallel.micro_batch(last=i == len(chunks) - 1):  # gradients reduced after the last
                loss = self._loss(chunk) / denominator
                loss.backward()
            total_loss += loss.detach().float().cpu()
        all_reduce_sum(world, total_loss)
        grad_norm = gradient_norm(self.params, cfg.clip)
        finite = bool(torch.isfinite(total_loss).all()) and math.isfinite(grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self._update(finite)
        with warnings.catch_warnings():  # a skipped step still advances the schedule, which counts steps, not
            # updates; torch warns when that happens before the first optimizer.step()
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - started
        tokens = sum(int(c["attention_mask"].sum()) for c in chunks) * world.size
        return {"step": self.step, "loss": total_loss.item(), "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed, "skipped": not finite}

    def _update(self, finite: bool) -> None:
        """The optimiser step, or, for NaN/Inf loss or gradients, a skipped step (an error after too many)."""
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row += 1
        self.skipped += 1
        if self.world.is_main:
            tqdm.write(f"step {self.step + 1}: loss or gradients are NaN/Inf; step skipped ({self.bad_in_a_row} in a row)")
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            raise LoraError(f"training diverged: {self.bad_in_a_row} steps in a row had NaN/Inf loss or gradients "
                            f"(step {self.step + 1}); lower lr={self.cfg.lr} or raise warmup, or resume from the last "
                            f"checkpoint in {self.out}")

    def _loss(self, batch: dict) -> torch.Tensor:
        return summed_loss(self.parallel.module, batch, self.cfg.task, self.world.device, self.cfg.bf16)[0]

    def evaluate(self) -> dict:
        """Held-out metrics at the current step (each process scores its share; sums are reduced)."""
        record = evaluate(self.model, self.eval_data.examples, self.cfg.task, self.pad_id, self.cfg.batch_size,
                          self.world.device, self.cfg.bf16, self.world)
        return {"step": self.step, **record}

    # --- files ----------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.world.is_main:
            with open(self.out / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.events.write(record)

    def checkpoint(self) -> None:
        """Every process: its shards of the trainable state, and its generators; rank 0 the rest."""
        state = TrainingState(self.step, self.scheduler.state_dict(), self.stream.state_dict(),
                              {"bad_in_a_row": self.bad_in_a_row, "skipped": self.skipped, "evals": self.evals,
                               "config": self.cfg.to_dict()},
                              optimizer_groups(self.optimizer), gather_rng(self.world))
        adapter = None if self.cfg.full else (lambda folder: self._write_model(folder / "adapter"))
        save_checkpoint(self.world, self.out, state, trainable_tensors(self.model, self.optimizer),
                        self.cfg.keep_checkpoints, write_extra=adapter)

    def _resume(self) -> None:
        state = load_checkpoint(self.cfg.resume)
        saved_ratio = state.extra["config"].get("lora_plus_ratio")
        if saved_ratio != self.cfg.lora_plus_ratio:  # its optimizer has other param groups, other learning rates
            raise LoraError(f"lora_plus_ratio={self.cfg.lora_plus_ratio!r}: the checkpoint in {self.cfg.resume} was "
                            f"trained with lora_plus_ratio={saved_ratio!r}; resume with the same value")
        restore_trainable_(self.world, self.cfg.resume, self.model, self.optimizer, state.optimizer_groups)
        self.scheduler.load_state_dict(state.scheduler)
        self.stream.load_state_dict(state.data)
        if self.world.rank < len(state.rng):  # on more processes than wrote it, the others keep the seed's state
            set_rng_state(self.world, state.rng[self.world.rank])
        self.step = state.step
        self.bad_in_a_row, self.skipped = state.extra["bad_in_a_row"], state.extra["skipped"]
        self.evals = list(state.extra["evals"])

    def save_final(self) -> int:
        """The adapter (PEFT layout) or, for --full, the whole model; returns its size in bytes (0 off rank 0)."""
        target = self.out / ("model" if self.cfg.full else "adapter")
        self._write_model(target)
        barrier(self.world)
        if not self.world.is_main:
            return 0
        return sum(f.stat().st_size for f in target.iterdir() if f.suffix in (".safetensors", ".json"))

    def _write_model(self, target: Path) -> None:
        """Every process calls it: under FSDP they gather the trainable weights; rank 0 writes the adapter in
        PEFT's layout (for --full, the whole model and its tokenizer) to `target`."""
        with self.parallel.gathered(self.world):
            if not self.world.is_main:
                return
            if self.cfg.full:
                self.model.save_pretrained(target)
                self.tokenizer.save_pretrained(target)  # a complete model folder: from_pretrained works
            else:
                save_adapter(self.model, target, metadata=self._label_metadata(), base=self.base)

    def _label_metadata(self) -> dict[str, str]:
        meta = {"lorakit_task": self.cfg.task, "lorakit_base_model": self.cfg.model}
        if self.label_names:
            meta["lorakit_label_names"] = json.dumps(list(self.label_names))
        return meta

    def _best(self) -> dict:
        scored = [e for e in self.evals if e.get("eval_loss") is not None]
        if not scored:
            return {}
        if self.cfg.task == "classify":
            return max(scored, key=lambda e: e["eval_accuracy"])
        return min(scored, key=lambda e: e["eval_loss"])

    def _write_summary(self, result: TrainResult) -> None:
        summary = {
            "mode": "full" if self.cfg.full else "lora",
            "trainable_parameters": result.trainable,
            "total_parameters": result.total,
            "trainable_percent": 100 * result.trainable / result.total,
            "saved_bytes": result.saved_bytes,
            "steps": result.steps,
            "skipped_steps": result.skipped_steps,
            "seconds": result.seconds,
            "first_eval": result.first_eval,
            "last_eval": result.last_eval,
            "best_eval": result.best_eval,
            "peak_memory_bytes": _peak_memory(self.world),
            "config": self.cfg.to_dict(),
        }
        write_text_atomically(self.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        plot_loss_curve(self.out / LOG_FILE, self.out / "loss.png")


def summed_loss(model: nn.Module, batch: dict, task: str, device: torch.device,
                bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss summed over the batch, logits): over target tokens for causal-lm, examples for classify.

    causal-lm returns no logits: its loss is computed by chunks that never form them (lorakit.loss).
    """
    batch = {k: v.to(device) for k, v in batch.items()}
    if task == "causal-lm":
        return summed_causal_lm_loss(model, batch, bf16), None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.float()
    return F.cross_entropy(logits, batch["labels"], reduction="sum"), logits


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], task: str, pad_id: int, batch_size: int = 8,
             device: torch.device = torch.device("cpu"), bf16: bool = False, world: World = World()) -> dict:
    """Mean loss over `examples`, with perplexity or accuracy; each process scores every world.size-th
    example and the sums are reduced."""
    was_training = model.training
    model.eval()
    shard = examples[world.rank::world.size]
    # The same number of forwards on every process (an FSDP forward is collective): one that has run out
    # of examples scores a stand-in batch and counts nothing.
    batch_size = max(1, batch_size)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, count, correct
    for start in range(0, -(-len(examples) // world.size), batch_size):
        part = shard[start:start + batch_size]
        batch = collate(part or examples[:1], pad_id)
        loss, logits = summed_loss(model, batch, task, device, bf16)
        if not part:
            continue
        totals[0] += loss.item()
        totals[1] += target_count(batch)
        if task == "classify":
            totals[2] += (logits.argmax(-1).cpu() == batch["labels"]).sum().item()
    model.train(was_training)
    all_reduce_sum(world, totals)
    if totals[1] == 0:
        return {"eval_loss": None}
    record = {"eval_loss": totals[0].item() / totals[1].item()}
    if task == "classify":
        record["eval_accuracy"] = totals[2].item() / totals[1].item()
    else:
        record["eval_perplexity"] = math.exp(min(record["eval_loss"], 50.0))
    return record


def _peak_memory(world: World) -> int:
    if world.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(world.device))
    import resource  # Unix only: imported where used, so that the module loads elsewhere

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
