"""Training steps of one configuration (full fine-tuning, PEFT LoRA or DoRA, lorakit LoRA or DoRA, or the
no-adapter floor), in a process of its own.

bench/perf.py starts one process per configuration, all at once, and has them take turns one
step at a time (the order rotating each round), so that a shared, noisy CPU slows every
configuration alike and each round's ratios compare steps run seconds apart. The process
answers commands on stdin with one JSON line each on stdout:

    .venv/bin/python bench/perf_step.py '{"model": "gpt2-small", "variant": "lorakit"}'
    -> {"ready": ...}      after building the model (printed unasked)
    step    -> {"forward_ms", "backward_ms", "optimizer_ms", "step_ms", "cpu_ms", "loss"}
    stats   -> {"peak_rss_mb", "rss_before_mb", "ru_maxrss_mb", "trainable", "total", ...}
    profile -> torch.profiler's report of one more step
    exit

Every configuration runs the same step on the same random batch: zero_grad -> the mean causal-LM
cross-entropy (lorakit: lorakit train's chunked loss; full, PEFT and floor: the model's own
`labels=` loss, as transformers' Trainer computes it; the values agree) -> backward -> AdamW step. The model is in train mode (GPT-2's dropout is on, for every variant alike). `floor`
is the frozen model with no adapter whose backward still runs down to the first layer (the
embeddings' output requires grad): about the least a LoRA step with adapters in every layer can
cost, in time and in activations kept; `floor-chunked` is the same with lorakit's loss, so that
lorakit / floor-chunked is what lorakit's adapters themselves add.

With a `directory`, the model is loaded from there instead, its frozen base stored in `base` (float32,
bfloat16, int8, nf4), the way each library's users load it (perf_models.load_base): lorakit through
lk.load_base, PEFT and full fine-tuning through transformers' from_pretrained (a BitsAndBytesConfig
for int8 and nf4).

Memory: `runtime_rss_mb` is the process after its imports (`preload` ones included), before the
model; `load_peak_rss_mb` the high-water mark while loading it, `loaded_rss_mb` the process after.
The kernel's RSS high-water mark (VmHWM) is then reset just before the first step, and read by `stats`:
`peak_rss_mb` is the whole process at its fullest while training (weights, gradients, AdamW
state, activations, plus the Python/torch runtime); `rss_before_mb` is the same process just
before the first step, so `peak_rss_mb - rss_before_mb` is what training itself added.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch.profiler import record_function

import common
import perf_models as pm
from common import BENCH, PHASE, rotated, torch_threads
import lorakit as lk
from lorakit.core.precision import is_quantized
from lorakit.training.plan_trace import LiveBytes
from lorakit.training.train import summed_loss
from perf_load import Meter, QuietGate

CHUNKED_LOSS = ("lorakit", "lorakit-dora", "floor-chunked")  # variants whose loss is lorakit train's (others: labels=)
VARIANTS = ("full", "peft", "lorakit", "floor", "floor-chunked", "lorakit-dora", "peft-dora")  # floors: the frozen
# model's own forward + backward, no adapter, with transformers' loss and with lorakit's chunked loss; *-dora: the
# same adapter as DoRA (Liu et al., 2024)


@dataclass(frozen=True)
class StepSpec:
    """One training configuration."""

    model: str = "gpt2-small"
    variant: str = "lorakit"
    batch: int = 4
    seq: int = 128
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = field(default=())  # empty: perf_models.TARGETS[model]
    lr: float = 1e-4
    threads: int = 2
    base: str = "float32"  # the frozen base's precision, one of lk.BASE_DTYPES (not float32: needs `directory`)
    directory: str | None = None  # load the model saved here (perf_models.load_base); None: perf_models.build_base
    preload: tuple[str, ...] = field(default=())  # modules imported before anything is measured (the same for all)
    checkpointing: bool = False  # recompute activations in backward, as `lorakit train --grad-checkpointing` does

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant={self.variant!r}: must be one of {', '.join(VARIANTS)}")
        if self.base not in lk.BASE_DTYPES:
            problems.append(f"base={self.base!r}: must be one of {', '.join(lk.BASE_DTYPES)}")
        elif self.base != "float32" and self.directory is None:
            problems.append(f"base={self.base!r} needs directory=: the saved model both libraries load from")
        if self.variant == "full" and self.base != "float32":
            problems.append(f"base={self.base!r} with variant='full': full fine-tuning trains a float32 model")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "targets", tuple(self.targets) or pm.TARGETS[self.model])
        object.__setattr__(self, "preload", tuple(self.preload))


class Trainer:
    """The model, its optimiser and the batch of one configuration; `step()` times one step."""

    def __init__(self, spec: StepSpec) -> None:
        for module in spec.preload:
            importlib.import_module(module)
        self.runtime_rss = pm.rss_mb()
        started = time.perf_counter()
        self.spec = spec
        self.model, self.params = prepare(spec)
        self.loaded_rss = pm.rss_mb()
        self.load_peak_rss = pm.peak_rss_mb()  # after RSS, so that it covers it; before the first step resets it
        # The floor trains nothing: its AdamW holds one empty parameter (never given a gradient), so
        # every variant runs the same zero_grad/step calls.
        self.optimizer = torch.optim.AdamW(self.params or [torch.nn.Parameter(torch.zeros(0))], lr=spec.lr)
        self.ids = pm.random_ids(self.model, spec.batch, spec.seq)
        self.setup_s = time.perf_counter() - started
        self.rss_before = self.peak_reset = None

    def step(self) -> dict:
        """One training step: the time of each phase (ms), the process CPU time, the loss."""
        if self.rss_before is None:  # the high-water mark starts at the first step
            self.peak_reset = pm.reset_peak_rss()
            self.rss_before = pm.rss_mb()
        cpu = time.process_time()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        t3 = time.perf_counter()
        return {"forward_ms": (t1 - t0) * 1e3, "backward_ms": (t2 - t1) * 1e3, "optimizer_ms": (t3 - t2) * 1e3,
                "step_ms": (t3 - t0) * 1e3, "cpu_ms": (time.process_time() - cpu) * 1e3, "loss": loss.item()}

    def loss(self) -> torch.Tensor:
        """Mean next-token cross-entropy of the batch, computed the way the variant's users train:
        lorakit through `lorakit train`'s own loss (lorakit.training.train.summed_loss: chunked, never holding
        the (batch, seq, vocab) logits), the others through the model's own `labels=` loss (what
        transformers' Trainer calls)."""
        if self.spec.variant not in CHUNKED_LOSS:
            return self.model(input_ids=self.ids, labels=self.ids).loss
        batch = {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids), "labels": self.ids}
        summed, _ = summed_loss(self.model, batch, "causal-lm", self.ids.device)
        return summed / (self.ids.shape[0] * (self.ids.shape[1] - 1))

    def live_tensors(self) -> dict:
        """One more step with every tensor it creates tracked (lorakit.training.plan's counter): the peak bytes of
        live tensors (activations kept for backward, gradients, temporaries; not the weights or the
        AdamW state made earlier), without the allocator's slack that RSS also holds (MB)."""
        self.optimizer.zero_grad(set_to_none=True)
        counter = LiveBytes()
        with counter:
            loss = self.loss()
            after_forward = counter.live
            loss.backward()
            self.optimizer.step()
        return {"live_peak_mb": counter.peak / 2**20, "live_after_forward_mb": after_forward / 2**20}

    def stats(self) -> dict:
        """The configuration and its memory so far (MB), then one tracked step's live tensors."""
        so_far = {**asdict(self.spec), "trainable": sum(p.numel() for p in self.params),
                  "total": sum(p.numel() for p in self.model.parameters()), "setup_s": self.setup_s,
                  "runtime_rss_mb": self.runtime_rss, "load_peak_rss_mb": self.load_peak_rss,
                  "loaded_rss_mb": self.loaded_rss, "rss_before_mb": self.rss_before,
                  "peak_rss_mb": pm.peak_rss_mb() if self.peak_reset else None,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **self.held()}
        return {**so_far, **self.live_tensors()}

    def held(self) -> dict:
        """What the base and the trainable parameters are stored in, as measured on the model."""
        return {"precision": lk.precision_of(self.model),
                "quantized_layers": sum(is_quantized(m) and type(m).__module__.startswith("bitsandbytes")
                                        for m in self.model.modules()),  # not the adapter layers around them
                "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in self.params})}

    def profile(self) -> dict:
        """torch.profiler over one more step: the ops by self CPU time and by the memory they allocated,
        and each phase's total time."""
        def phased_step() -> None:
            self.optimizer.zero_grad(set_to_none=True)
            with record_function(PHASE + "forward"):
                loss = self.loss()
            with record_function(PHASE + "backward"):
                loss.backward()
            with record_function(PHASE + "optimizer"):
                self.optimizer.step()

        return common.profile(phased_step, python=False, memory=True)


def prepare(spec: StepSpec) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The model in train mode with the variant's trainable parameters."""
    if spec.directory is None:
        model = pm.build_base(spec.model)
    else:
        model = pm.load_base(spec.directory, spec.base, "lorakit" if spec.variant in CHUNKED_LOSS else "transformers")
    if spec.variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif spec.variant in ("lorakit", "lorakit-dora"):
        pm.add_lorakit(model, spec.targets, spec.rank, spec.alpha, dora=spec.variant == "lorakit-dora")
    elif spec.variant in ("floor", "floor-chunked"):
        # No weight trains, but the gradient flows back to the first layer's input, as it must for
        # adapters in every layer: the least any LoRA library's step can cost.
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    else:
        model = pm.add_peft(model, spec.targets, spec.rank, spec.alpha, dora=spec.variant == "peft-dora")
    if spec.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def serve(spec: StepSpec, commands, answer) -> None:
    """Build, announce, then answer commands (one per line) until `exit` or end of input."""
    torch.set_num_threads(spec.threads)
    trainer = Trainer(spec)
    answer({"ready": True, "setup_s": trainer.setup_s})
    actions = {"step": trainer.step, "stats": trainer.stats, "profile": trainer.profile}
    for line in commands:
        command = line.strip()
        if command == "exit":
            return
        if command not in actions:
            answer({"error": f"unknown command {command!r}; commands: {', '.join(actions)}, exit"})
            continue
        answer(actions[command]())


# --- the driver's side: workers in lockstep ---------------------------------------------------------------
class LocalWorker:
    """A Trainer in this process (tests: fast, but its memory numbers are the whole process's)."""

    isolated = False

    def __init__(self, spec: StepSpec) -> None:
        torch.set_num_threads(spec.threads)
        self.trainer, self.pid = Trainer(spec), os.getpid()  # pid: whose CPU time is the benchmark's

    def ready(self) -> dict:
        return {"ready": True, "setup_s": self.trainer.setup_s}

    def ask(self, command: str) -> dict:
        return getattr(self.trainer, command)()

    def close(self) -> None:
        del self.trainer


class ProcessWorker:
    """A Trainer in a fresh Python process, driven over its stdin/stdout (stderr kept for errors)."""

    isolated = True

    def __init__(self, spec: StepSpec) -> None:
        root = str(BENCH.parent)  # lorakit itself, should it not be installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.spec, self.errors = spec, tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, str(BENCH / "perf_step.py"), json.dumps(asdict(spec))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                        text=True, env=env)
        self.pid = self.process.pid

    def ready(self) -> dict:
        return self._read()

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            self.errors.seek(0)
            raise RuntimeError(f"perf_step.py ({self.spec.model}, {self.spec.variant}) exited with "
                               f"{self.process.returncode}:\n{self.errors.read()[-3000:]}")
        record = json.loads(line)
        if "error" in record:
            raise RuntimeError(f"perf_step.py ({self.spec.model}, {self.spec.variant}): {record['error']}")
        return record

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.stdin.write("exit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            self.errors.close()


def lockstep(specs: dict[str, StepSpec], rounds: int, isolate: bool = True, profile: bool = False,
             gate: QuietGate | None = None, progress=lambda text: None) -> dict:
    """Start a worker per configuration, then `rounds` rounds of one step each, the order rotating;
    each round waits for a quiet machine first (given a gate) and records the CPUs other work used.

    Returns {"steps": [per step: round, position, variant, phase times], "others": [per round],
    "stats": {variant: stats}, "profiles": {variant: report} (empty unless `profile`), "isolated"}.
    """
    worker = ProcessWorker if isolate else LocalWorker
    workers = {}
    with torch_threads(torch.get_num_threads()):  # a LocalWorker sets the count; it is set back after
        try:
            for variant, spec in specs.items():  # processes build their models side by side
                workers[variant] = worker(spec)
            for w in workers.values():
                w.ready()
            pids = [w.pid for w in workers.values()]
            steps, others = [], []
            for round_ in range(rounds):
                if gate is not None:
                    gate.wait(pids)
                progress(f"round {round_ + 1}/{rounds}")
                meter = Meter(pids)
                for position, variant in enumerate(rotated(list(specs), round_)):
                    steps.append({"round": round_, "position": position, "variant": variant, **workers[variant].ask("step")})
                others.append(meter.others())
            stats = {variant: w.ask("stats") for variant, w in workers.items()}
            profiles = {variant: w.ask("profile") for variant, w in workers.items()} if profile else {}
        finally:
            for w in workers.values():
                w.close()
    return {"steps": steps, "others": others, "stats": stats, "profiles": profiles, "isolated": isolate}


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")  # transformers' and PEFT's notices go to stderr anyway; keep it short

    def answer(record: dict) -> None:
        print(json.dumps(record), flush=True)

    serve(StepSpec(**json.loads(argv[0])), sys.stdin, answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
