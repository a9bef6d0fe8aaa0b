"""Benchmark: LoRA training on a low-precision or quantized frozen base, lorakit vs PEFT at the same precision.

    .venv/bin/python bench/precision.py            # full run (`make bench-precision`): about 10 minutes on 2 quiet CPU cores
    .venv/bin/python bench/precision.py --quick    # smoke run: 1 warm-up + 2 timed rounds; RESULTS.md untouched

Per model (GPT-2 small, random init; SmolLM2-135M), with the same rank-8 adapter (alpha 16, no dropout)
on c_attn (GPT-2) or q_proj/v_proj (SmolLM2) and the same 4 x 128 random token batch, eleven training
configurations, each in a fresh process of its own (bench/perf_step.py), taking turns one step at a
time, the order rotating each round:

- lorakit with a float32, bfloat16, int8 (LLM.int8) or nf4 (QLoRA) base: `lk.load_base(directory, base)`;
- PEFT at the same four precisions, the base loaded as PEFT's users load it: transformers' from_pretrained
  with the dtype, or with a BitsAndBytesConfig (the same bitsandbytes layers), then peft.get_peft_model;
- full fine-tuning, float32;
- lorakit and PEFT on the nf4 base with gradient checkpointing (`lorakit train --grad-checkpointing`'s call, the
  same for both), what QLoRA recipes add to save activations.

Every configuration loads the model from one directory (GPT-2 small is saved there first, so that it
loads like a pretrained model), in a process that has already imported torch, transformers, PEFT and
bitsandbytes: the process's RSS after its imports, while loading, after loading and while training
is recorded, with the peak live tensors of one more step. Ratios of step times are taken round by round.

Every record goes to bench/results/precision.jsonl (tagged with the run id), the ratio chart to
bench/results/precision.png, the tables and verdicts to the "Base precision" section of
bench/RESULTS.md (bench/precision_report.py).
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import perf
import perf_models as pm
import precision_report
from common import BENCH, Log, command_line, loadavg, machine, model_options, narrowed, torch_threads
from perf_load import QuietGate
from perf_step import StepSpec

RESULTS = BENCH / "results"
BASES = {"float32": "f32", "bfloat16": "bf16", "int8": "int8", "nf4": "nf4"}  # base dtype -> its short name
LIBRARIES = ("lorakit", "peft")
PRELOAD = ("peft", "bitsandbytes")  # every process imports both before anything is measured


def config_name(library: str, base: str, checkpointing: bool = False) -> str:
    """'lorakit-nf4', 'peft-bf16', 'full-f32', 'lorakit-nf4-gc' (with gradient checkpointing)."""
    return f"{library}-{BASES[base]}" + ("-gc" if checkpointing else "")


# name -> (perf_step variant, base dtype, gradient checkpointing): each library at each precision, full
# fine-tuning, and nf4 with gradient checkpointing (what QLoRA recipes add to save activations), both libraries.
CONFIGS = {config_name(library, base): (library, base, False) for library in LIBRARIES for base in BASES}
CONFIGS.update({config_name("full", "float32"): ("full", "float32", False),
                **{config_name(library, "nf4", True): (library, "nf4", True) for library in LIBRARIES}})
# (a, b): a / b for step time, CPU time and memory. The comparisons first, then each lorakit base
# against its PEFT twin, then context.
PAIRS = (("lorakit-bf16", "peft-f32"), ("lorakit-bf16", "peft-bf16"), ("lorakit-nf4", "lorakit-bf16"),
         ("lorakit-nf4", "peft-f32"), ("lorakit-nf4", "peft-nf4"),
         ("lorakit-f32", "peft-f32"), ("lorakit-int8", "peft-int8"), ("lorakit-nf4-gc", "peft-nf4-gc"),
         ("lorakit-nf4-gc", "peft-f32"), ("lorakit-nf4-gc", "lorakit-nf4"),
         ("lorakit-int8", "lorakit-bf16"), ("lorakit-bf16", "lorakit-f32"), ("peft-nf4", "peft-f32"),
         ("lorakit-f32", "full-f32"))
MEMORY = (("peak", "peak_mb"), ("net", "net_peak_mb"), ("loaded", "loaded_rss_mb"))  # ratios added to perf's


@dataclass(frozen=True)
class Settings:
    """One benchmark run."""

    # one warm-up round (AdamW allocates its state, the weights' file pages are read in), then timed rounds
    cases: tuple[perf.Case, ...] = (perf.Case("gpt2-small", train_warmup=1, train_steps=6),
                                    perf.Case("smollm2-135m", train_warmup=1, train_steps=6))
    configs: tuple[str, ...] = tuple(CONFIGS)
    rank: int = 8
    alpha: float = 16.0
    threads: int = 2
    isolate: bool = True  # each configuration in its own process (False: in this one; tests)
    quiet_budget_s: float = 240.0  # waiting for a quiet machine before rounds, at most this long in all (0: never)
    profile: bool = True  # one more profiled step per configuration, after the timed rounds
    mode: str = "full"
    label: str = ""  # free text kept with the run, e.g. what else the machine was running
    out: Path = RESULTS / "precision.jsonl"
    plot: Path | None = RESULTS / "precision.png"
    profile_out: Path | None = RESULTS / "precision_profile.txt"
    results_md: Path | None = BENCH / "RESULTS.md"


def specs(case: perf.Case, settings: Settings, directory: Path) -> dict[str, StepSpec]:
    """One StepSpec per configuration, all loading from `directory`."""
    return {name: StepSpec(model=case.model, variant=CONFIGS[name][0], base=CONFIGS[name][1],
                           checkpointing=CONFIGS[name][2], directory=str(directory), batch=case.train_batch,
                           seq=case.train_seq, rank=settings.rank, alpha=settings.alpha, threads=settings.threads,
                           preload=PRELOAD)
            for name in settings.configs}


def summarise(result: dict, warmup: int, pairs: tuple[tuple[str, str], ...]) -> dict:
    """perf.training_summary, with what each process held and its memory from load to training: `peak_mb`
    the process at its fullest, loading included; `net_peak_mb` the same less the runtime (imports)."""
    summary = perf.training_summary(result, warmup, pairs)
    variants = summary["variants"]
    for name, stats in result["stats"].items():
        peak = max(stats["load_peak_rss_mb"], stats["peak_rss_mb"])
        variants[name].update({key: stats[key] for key in ("variant", "base", "checkpointing", "precision",
                                                            "quantized_layers", "trainable_dtypes", "runtime_rss_mb",
                                                            "loaded_rss_mb", "load_peak_rss_mb", "setup_s")},
                              peak_mb=peak, net_peak_mb=peak - stats["runtime_rss_mb"])
    for a, b in pairs:
        for metric, key in MEMORY:
            summary["ratios"][f"{metric} {a}/{b}"] = {"ratio": variants[a][key] / variants[b][key]}
    return summary


def measure_case(case: perf.Case, settings: Settings, log: Log, progress: Callable[[str], None],
                 gate: QuietGate | None) -> tuple[dict, list[dict]]:
    """The configurations of one model in lockstep; (its summary, its profiles)."""
    pairs = tuple((a, b) for a, b in PAIRS if a in settings.configs and b in settings.configs)
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"{case.model}: preparing the model directory")
        directory = pm.model_source(case.model, Path(tmp))
        gc.collect()  # a GPT-2 built to be saved goes before the training processes start
        trained = perf.training(case, settings, log, progress, gate, specs(case, settings, directory))
    summary = {"shape": {"model": case.model, "batch": case.train_batch, "seq": case.train_seq,
                         "targets": list(pm.TARGETS[case.model]), "rank": settings.rank, "alpha": settings.alpha,
                         "warmup": case.train_warmup, "steps": case.train_steps},
               "training": summarise(trained, case.train_warmup, pairs)}
    log("summary", model=case.model, **summary)
    profiles = [{"model": case.model, "what": f"training step, {name}", **report}
                for name, report in trained["profiles"].items()]
    return summary, profiles


def run(settings: Settings, progress: Callable[[str], None] = lambda text: None) -> dict:
    """Every case; returns {"meta", "run", "models": {name: summary}, "profiles"}; records go to settings.out."""
    log = Log(settings.out, time.strftime("%Y%m%dT%H%M%S"))
    started = time.perf_counter()
    gate = QuietGate(budget_s=settings.quiet_budget_s) if settings.quiet_budget_s > 0 else None
    models, profiles = {}, []
    with torch_threads(settings.threads):
        meta = {"settings": asdict(settings), "machine": machine(), "argv": sys.argv, "mode": settings.mode,
                "label": settings.label}
        log("meta", **meta)
        for case in settings.cases:
            models[case.model], found = measure_case(case, settings, log, progress, gate)
            profiles += found
    meta.update(seconds=time.perf_counter() - started, loadavg_end=loadavg(),
                waited_for_quiet_s=gate.waited_s if gate else 0.0)
    log("end", seconds=meta["seconds"], loadavg=meta["loadavg_end"], waited_for_quiet_s=meta["waited_for_quiet_s"])
    return {"meta": meta, "run": log.run_id, "models": models, "profiles": profiles}


# --- command line ---------------------------------------------------------------------------------------------
def settings_from(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 warm-up + 2 timed rounds, no profiles; writes precision.jsonl only "
                             "(not RESULTS.md or precision.png)")
    parser.add_argument("--steps", type=int, help="timed rounds per model (default: 6)")
    model_options(parser, Settings.out, "precision.png")
    args = parser.parse_args(argv)
    settings = Settings(label=args.label, out=args.out)
    if args.quick:
        settings = replace(settings, cases=tuple(replace(c, train_warmup=1, train_steps=2) for c in settings.cases),
                           profile=False, mode="quick", quiet_budget_s=60, plot=None, profile_out=None, results_md=None)
    if args.steps:
        settings = replace(settings, cases=tuple(replace(c, train_steps=args.steps) for c in settings.cases))
    return narrowed(settings, args)


def main(argv: list[str] | None = None) -> int:
    command_line(sys.argv[1:] if argv is None else argv, "bench-precision", settings_from, run, precision_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
