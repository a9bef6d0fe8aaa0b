"""Benchmark: base vs lorakit vs PEFT vs full fine-tuning, on GPT-2 small (random init) and SmolLM2-135M.

    .venv/bin/python bench/perf.py            # full run (`make bench`): about 15 minutes on 2 CPU cores
    .venv/bin/python bench/perf.py --quick    # smoke run, about 4 minutes: fewer repeats; RESULTS.md untouched

Per model, with the same rank-8 adapter (alpha 16, no dropout) on c_attn (GPT-2) or q_proj/v_proj
(SmolLM2), and the same random token batch for every variant:

1. inference latency: base, lorakit unmerged / merged, PEFT unmerged / merged (interleaved rounds,
   the order rotating each round; ratios are per round to that round's base, then the median);
2. merge and unmerge time; adapter save, load-and-activate (onto the model in memory, and onto a
   plain model that must be wrapped first) and switch time, lorakit and PEFT interleaved;
3. merge precision on a bfloat16 copy: merged-vs-unmerged logits, and max |W - W0| of the adapted
   weights after 1 and after 100 merge/unmerge cycles (lk.merge_/unmerge_ vs PEFT's
   merge_adapter/unmerge_adapter);
4. training step time and peak memory: full fine-tuning, PEFT and lorakit, each configuration in a
   fresh process of its own (bench/perf_step.py); the three take turns one step at a time, the
   order rotating each round, and ratios are taken per round.

Every measurement goes to bench/results/perf.jsonl (tagged with the run id), the ratio chart to
bench/results/perf.png, the profiles to bench/results/perf_profile.txt, and the tables with
their verdicts to the "Performance" section of bench/RESULTS.md (bench/perf_report.py).
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

import lorakit as lk
import perf_models as pm
import perf_report
from common import BENCH, Log, command_line, loadavg, machine, model_options, narrowed, profile, rotated, torch_threads
from perf_load import CLEAN_CPUS, Meter, QuietGate
from perf_step import VARIANTS as TRAIN_VARIANTS, StepSpec, lockstep

RESULTS = BENCH / "results"
INFER_VARIANTS = ("base", "lorakit", "lorakit merged", "peft", "peft merged")
LIBRARIES = ("lorakit", "peft")
PAIRS = (("lorakit", "full"), ("lorakit", "peft"), ("peft", "full"), ("lorakit", "floor"), ("peft", "floor"),
         ("lorakit", "floor-chunked"), ("lorakit-dora", "lorakit"), ("lorakit-dora", "peft-dora"),
         ("peft-dora", "peft"))
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 logits; the libraries order their sums differently


@dataclass(frozen=True)
class Case:
    """One model and the shapes it is measured at."""

    model: str
    batch: int = 4  # inference, I/O and merge: batch x seq random tokens
    seq: int = 128
    train_batch: int = 4
    train_seq: int = 128
    precision_batch: int = 1  # the bfloat16 merged-vs-unmerged logits check
    train_warmup: int = 2  # rounds of one step per training configuration, untimed (AdamW allocates its state)
    train_steps: int = 6  # timed rounds


@dataclass(frozen=True)
class Settings:
    """One benchmark run."""

    cases: tuple[Case, ...] = (Case("gpt2-small", train_steps=8), Case("smollm2-135m", train_steps=5))
    rank: int = 8
    alpha: float = 16.0
    infer_repeats: int = 9
    merge_repeats: int = 7
    io_repeats: int = 9
    switch_repeats: int = 41
    cycles: int = 100
    threads: int = 2
    isolate: bool = True  # each training configuration in its own process (False: in this one; tests)
    quiet_budget_s: float = 240.0  # waiting for a quiet machine before rounds, at most this long in all (0: never)
    profile: bool = True
    mode: str = "full"
    label: str = ""  # free text kept with the run, e.g. what else the machine was running
    out: Path = RESULTS / "perf.jsonl"
    plot: Path | None = RESULTS / "perf.png"
    profile_out: Path | None = RESULTS / "perf_profile.txt"
    results_md: Path | None = BENCH / "RESULTS.md"


# --- timing ----------------------------------------------------------------------------------------
@dataclass
class Op:
    """A timed call, with untimed set-up before and clean-up after it."""

    call: Callable
    setup: Callable = lambda: None
    teardown: Callable = lambda: None


@dataclass
class Timings:
    """ms[name][round], and others[round]: CPUs used by other work during that round."""

    ms: dict[str, list[float]]
    others: list[float | None]


def time_interleaved(ops: dict[str, Op], repeats: int, gate: QuietGate | None = None) -> Timings:
    """Milliseconds per call: `repeats` rounds of every op, the order rotating each round; each round
    waits for a quiet machine first (given a gate) and records the CPUs other work used meanwhile."""
    timings = Timings({name: [] for name in ops}, [])
    for round_ in range(repeats):
        if gate is not None:
            gate.wait()
        meter = Meter()
        for name in rotated(list(ops), round_):
            ops[name].setup()
            start = time.perf_counter()
            ops[name].call()
            timings.ms[name].append((time.perf_counter() - start) * 1e3)
            ops[name].teardown()
        timings.others.append(meter.others())
    return timings


def clean_rounds(others: list[float | None], minimum: int = 3) -> list[int]:
    """Rounds with little other work (all rounds if fewer than `minimum` are clean, or if unknown)."""
    clean = [i for i, load in enumerate(others) if load is not None and load <= CLEAN_CPUS]
    return clean if len(clean) >= minimum else list(range(len(others)))


def ratio_stats(values: list[float], references: list[float], others: list[float | None]) -> dict[str, float]:
    """Median, min and max of the per-round ratios values[i] / references[i] over the clean rounds,
    and the ratio of the best times (over all rounds)."""
    rounds = clean_rounds(others)
    ratios = [values[i] / references[i] for i in rounds]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "best": min(values) / min(references), "rounds_used": len(rounds), "rounds": len(values)}


def ms_stats(ms: list[float], others: list[float | None]) -> dict[str, float]:
    """The median over the clean rounds, and the best and worst of all rounds."""
    return {"median_ms": statistics.median(ms[i] for i in clean_rounds(others)), "min_ms": min(ms), "max_ms": max(ms)}


def summarise(timings: Timings, reference: str) -> dict[str, dict]:
    """Per name: ms_stats, and its ratio_stats to `reference`."""
    return {name: {**ms_stats(ms, timings.others), **ratio_stats(ms, timings.ms[reference], timings.others)}
            for name, ms in timings.ms.items()}


# --- the models in this process ----------------------------------------------------------------------
class Merged:
    """A model's merge state, changed only when it must be (PEFT warns on a repeated merge)."""

    def __init__(self, merge: Callable, unmerge: Callable) -> None:
        self._merge, self._unmerge, self.merged = merge, unmerge, False

    def set(self, merged: bool) -> None:
        if merged != self.merged:
            (self._merge if merged else self._unmerge)()
            self.merged = merged


def lorakit_state(model) -> Merged:
    return Merged(lambda: lk.merge_(model), lambda: lk.unmerge_(model))


def peft_state(model) -> Merged:
    return Merged(model.merge_adapter, model.unmerge_adapter)


def check(base, lorakit_model, peft_model, states: dict[str, Merged], ids: torch.Tensor) -> dict:
    """lorakit == PEFT, merged == unmerged (float32), and the adapter visibly changes the logits."""
    with torch.inference_mode():
        base_out = base(ids).logits
        outs = {}
        for library, model in (("lorakit", lorakit_model), ("peft", peft_model)):
            for merged in (False, True):
                states[library].set(merged)
                outs[library, merged] = model(input_ids=ids).logits
            states[library].set(False)
    pairs = {"lorakit_vs_peft": (outs["lorakit", False], outs["peft", False]),
             "lorakit_merged_vs_unmerged": (outs["lorakit", True], outs["lorakit", False]),
             "peft_merged_vs_unmerged": (outs["peft", True], outs["peft", False])}
    result = {name: (a - b).abs().max().item() for name, (a, b) in pairs.items()}
    result["adapter_effect"] = (outs["lorakit", False] - base_out).abs().max().item()
    problems = [name for name, (a, b) in pairs.items() if not torch.allclose(a, b, **TOL)]
    if result["adapter_effect"] < 100 * TOL["atol"]:
        problems.append(f"the adapter moves the logits by only {result['adapter_effect']:.2e}")
    return {**result, "passed": not problems, "problems": problems}


def inference(base, models: dict, states: dict[str, Merged], ids: torch.Tensor, repeats: int,
              gate: QuietGate | None) -> Timings:
    """Forward latency of the five variants, merge state set (untimed) before each call."""
    def forward(library: str, merged: bool) -> Op:
        model = models[library]
        return Op(lambda: model(input_ids=ids).logits, setup=lambda: states[library].set(merged))

    ops = {"base": Op(lambda: base(input_ids=ids).logits),
           "lorakit": forward("lorakit", False), "lorakit merged": forward("lorakit", True),
           "peft": forward("peft", False), "peft merged": forward("peft", True)}
    with torch.inference_mode():
        timings = time_interleaved(ops, repeats, gate)
    for state in states.values():
        state.set(False)
    return timings


def merge_times(states: dict[str, Merged], repeats: int, gate: QuietGate | None) -> Timings:
    """Merge and unmerge of the whole model (every adapted layer), each library in turn."""
    ops = {}
    for library, state in states.items():
        ops[f"{library} merge"] = Op(lambda s=state: s.set(True), setup=lambda s=state: s.set(False))
        ops[f"{library} unmerge"] = Op(lambda s=state: s.set(False), setup=lambda s=state: s.set(True))
    with torch.no_grad():
        timings = time_interleaved(ops, repeats, gate)
        for state in states.values():
            state.set(False)
    return timings


def io_times(base, lorakit_model, peft_model, tmp: Path, settings: Settings,
             gate: QuietGate | None) -> tuple[Timings, Timings]:
    """Save and load-and-activate (warm: layers already wrapped; cold: onto a plain model); then
    switching between two resident adapters (sub-millisecond: many rounds, no waiting for quiet)."""
    import peft

    lk_dir, peft_dir = tmp / "lorakit", tmp / "peft"
    lk.save_adapter(lorakit_model, lk_dir)
    peft_model.save_pretrained(peft_dir)
    lk.load_adapter(lorakit_model, lk_dir, adapter="other")  # a second resident adapter to switch to
    peft_model.load_adapter(peft_dir, adapter_name="other")
    plain, cold = copy.deepcopy(base), {}
    ops = {
        "lorakit save": Op(lambda: lk.save_adapter(lorakit_model, tmp / "lk_save")),
        "peft save": Op(lambda: peft_model.save_pretrained(tmp / "peft_save")),
        "lorakit load": Op(lambda: _lk_activate(lorakit_model, lk_dir, "new"), teardown=lambda: _lk_drop(lorakit_model, "new")),
        "peft load": Op(lambda: _peft_activate(peft_model, peft_dir, "new"), teardown=lambda: _peft_drop(peft_model, "new")),
        "lorakit cold load": Op(lambda: _lk_activate(plain, lk_dir, "default"), teardown=lambda: lk.unload_(plain, merge=False)),
        "peft cold load": Op(lambda: cold.update(peft=peft.PeftModel.from_pretrained(plain, peft_dir)),
                             teardown=lambda: cold.pop("peft").unload()),
    }
    files = time_interleaved(ops, settings.io_repeats, gate)
    switches = {"lorakit switch": Op(lambda: _lk_switch(lorakit_model)), "peft switch": Op(lambda: _peft_switch(peft_model))}
    switching = time_interleaved(switches, settings.switch_repeats)
    _lk_drop(lorakit_model, "other")
    _peft_drop(peft_model, "other")
    return files, switching


def _lk_activate(model, directory: Path, name: str) -> None:
    lk.load_adapter(model, directory, adapter=name)
    lk.set_active(model, name)


def _lk_drop(model, name: str) -> None:
    lk.set_active(model, "default")
    lk.delete_adapter(model, name)


def _peft_activate(model, directory: Path, name: str) -> None:
    model.load_adapter(directory, adapter_name=name)
    model.set_adapter(name)


def _peft_drop(model, name: str) -> None:
    model.set_adapter("default")
    model.delete_adapter(name)


def _lk_switch(model) -> None:
    lk.set_active(model, "other" if lk.active_adapter(model) == "default" else "default")


def _peft_switch(model) -> None:
    model.set_adapter("other" if model.active_adapter == "default" else "default")


# --- bfloat16 merge precision ----------------------------------------------------------------------------
def precision(base, adapter_dirs: dict[str, Path], reference_logits: torch.Tensor, ids: torch.Tensor,
              cycles: int) -> dict[str, dict]:
    """Per library, on a bfloat16 copy of `base` with the same adapter: merged-vs-unmerged logits,
    and the drift of the adapted weights from W0 after 1 and after `cycles` merge/unmerge cycles."""
    import peft

    results = {}
    for library in LIBRARIES:
        model = copy.deepcopy(base).to(torch.bfloat16)
        if library == "lorakit":
            lk.load_adapter(model, adapter_dirs[library])
            state = lorakit_state(model)
        else:
            model = peft.PeftModel.from_pretrained(model, adapter_dirs[library]).eval()
            state = peft_state(model)
        results[library] = _merge_cycles(model, library, state, reference_logits, ids, cycles)
        del model, state
        gc.collect()
    return results


@torch.inference_mode()
def _merge_cycles(model, library: str, state: Merged, reference_logits: torch.Tensor, ids: torch.Tensor,
                  cycles: int) -> dict:
    """One library's bfloat16 model: its logits merged and not, and its weights after 1 and `cycles` cycles."""
    weights = pm.adapted_weights(model, library)
    originals = {path: w.detach().clone() for path, w in weights.items()}
    unmerged = model(input_ids=ids).logits.float()
    state.set(True)
    merged = model(input_ids=ids).logits.float()
    state.set(False)
    drift_1 = _drift(weights, originals)
    cycle_ms = []
    for _ in range(cycles - 1):  # the check above was cycle 1
        start = time.perf_counter()
        state.set(True)
        state.set(False)
        cycle_ms.append((time.perf_counter() - start) * 1e3)
    error = (merged - unmerged).abs()
    return {"weight_dtype": str(next(iter(weights.values())).dtype), "adapter_dtype": _adapter_dtype(model, library),
            "logits_max_abs": error.max().item(), "logits_mean_abs": error.mean().item(),
            "logits_scale": unmerged.abs().max().item(),
            "bf16_vs_fp32_max_abs": (unmerged - reference_logits).abs().max().item(),
            "drift_after_1": drift_1, **_drift_stats(weights, originals, cycles),
            "cycle_ms": statistics.median(cycle_ms) if cycle_ms else None}


def _drift(weights: dict, originals: dict) -> float:
    return max((w.float() - originals[p].float()).abs().max().item() for p, w in weights.items())


def _drift_stats(weights: dict, originals: dict, cycles: int) -> dict:
    changed = sum(int((w != originals[p]).sum()) for p, w in weights.items())
    total = sum(w.numel() for w in weights.values())
    rms = max(originals[p].float().square().mean().sqrt().item() for p in originals)
    return {"cycles": cycles, "drift_after_cycles": _drift(weights, originals), "changed_elements": changed,
            "weight_elements": total, "weight_rms": rms}


def _adapter_dtype(model, library: str) -> str:
    if library == "lorakit":
        return str(next(layer.adapters["default"].A.dtype for _, layer in lk.lora_layers(model)))
    return str(next(p.dtype for n, p in model.named_parameters() if "lora_A" in n))


# --- training, one process per configuration -----------------------------------------------------------------
def training(case: Case, settings: Settings, log: "Log", progress: Callable[[str], None],
             gate: QuietGate | None, specs: dict[str, StepSpec] | None = None) -> dict:
    """The configurations (default: one per perf_step variant) in lockstep (perf_step.lockstep); every step and
    stat is logged, the stats under their configuration's name."""
    specs = specs or {variant: StepSpec(model=case.model, variant=variant, batch=case.train_batch, seq=case.train_seq,
                                        rank=settings.rank, alpha=settings.alpha, threads=settings.threads)
                      for variant in TRAIN_VARIANTS}
    rounds = case.train_warmup + case.train_steps
    progress(f"{case.model}: training, starting {len(specs)} processes" if settings.isolate else
             f"{case.model}: training (in this process)")
    result = lockstep(specs, rounds, settings.isolate, settings.profile, gate,
                      lambda text: progress(f"{case.model}: training {text}"))
    for step in result["steps"]:
        log("train_step", model=case.model, warmup=step["round"] < case.train_warmup, **step,
            others_cpus=result["others"][step["round"]])
    for name, stats in result["stats"].items():
        log("train", **stats, config=name, isolated=result["isolated"])
    for variant, report in result["profiles"].items():
        log("profile", model=case.model, what=f"training step, {variant}", **report)
    return result


def training_summary(result: dict, warmup: int, pairs: tuple[tuple[str, str], ...] = PAIRS) -> dict:
    """Per configuration: medians over the timed clean rounds, best step, and memory; per pair: ratio_stats
    of the step time (and of the process CPU time), and the memory ratios."""
    timed = sorted({s["round"] for s in result["steps"] if s["round"] >= warmup})
    others = [result["others"][r] for r in timed]
    used = [timed[i] for i in clean_rounds(others)]
    by = {(s["round"], s["variant"]): s for s in result["steps"]}
    variants = {}
    for variant, stats in result["stats"].items():
        variants[variant] = {key: statistics.median(by[r, variant][key] for r in used) for key in
                             ("step_ms", "forward_ms", "backward_ms", "optimizer_ms", "cpu_ms")}
        variants[variant].update(min_ms=min(by[r, variant]["step_ms"] for r in timed), trainable=stats["trainable"],
                                 total=stats["total"], rss_before_mb=stats["rss_before_mb"],
                                 peak_rss_mb=stats["peak_rss_mb"], added_mb=stats["peak_rss_mb"] - stats["rss_before_mb"],
                                 ru_maxrss_mb=stats["ru_maxrss_mb"], live_peak_mb=stats["live_peak_mb"],
                                 losses=[by[r, variant]["loss"] for r in timed])
    ratios = {}
    for a, b in pairs:
        for metric, key in (("step", "step_ms"), ("cpu", "cpu_ms")):
            values, references = ([by[r, v][key] for r in timed] for v in (a, b))
            ratios[f"{metric} {a}/{b}"] = ratio_stats(values, references, others)
        for metric, key in (("memory", "peak_rss_mb"), ("added", "added_mb"), ("live", "live_peak_mb")):
            ratios[f"{metric} {a}/{b}"] = {"ratio": variants[a][key] / variants[b][key]}
    return {"variants": variants, "ratios": ratios, "rounds": len(timed), "rounds_used": len(used),
            "isolated": result["isolated"]}


def run(settings: Settings, progress: Callable[[str], None] = lambda text: None) -> dict:
    """Every case; returns {"meta", "models": {name: summary}, "profiles": [...]}; records go to settings.out."""
    log = Log(settings.out, time.strftime("%Y%m%dT%H%M%S"))
    started = time.perf_counter()
    models, profiles = {}, []
    gate = QuietGate(budget_s=settings.quiet_budget_s) if settings.quiet_budget_s > 0 else None
    with torch_threads(settings.threads):
        meta = {"settings": asdict(settings), "machine": machine(), "argv": sys.argv, "mode": settings.mode,
                "label": settings.label}
        log("meta", **meta)
        for case in settings.cases:
            models[case.model] = measure_case(case, settings, log, progress, profiles, gate)
    meta["seconds"] = time.perf_counter() - started
    meta["loadavg_end"] = loadavg()
    meta["waited_for_quiet_s"] = gate.waited_s if gate else 0.0
    log("end", seconds=meta["seconds"], loadavg=meta["loadavg_end"], waited_for_quiet_s=meta["waited_for_quiet_s"])
    return {"meta": meta, "run": log.run_id, "models": models, "profiles": profiles}


def measure_case(case: Case, settings: Settings, log: Log, progress: Callable[[str], None], profiles: list,
                 gate: QuietGate | None) -> dict:
    """Everything for one model: in this process first (inference, merge, files, precision), then training."""
    summary = in_process(case, settings, log, progress, profiles, gate)
    gc.collect()  # the three models of this process go before the training processes start
    trained = training(case, settings, log, progress, gate)
    profiles += [{"model": case.model, "what": f"training step, {variant}", **report}
                 for variant, report in trained["profiles"].items()]
    summary["train_shape"] = {"batch": case.train_batch, "seq": case.train_seq, "warmup": case.train_warmup,
                              "steps": case.train_steps}
    summary["training"] = training_summary(trained, case.train_warmup)
    log("summary", model=case.model, **summary)
    return summary


def in_process(case: Case, settings: Settings, log: Log, progress: Callable[[str], None], profiles: list,
               gate: QuietGate | None) -> dict:
    """Base, lorakit and PEFT copies with the same adapter: check, inference, merge, files, precision."""
    progress(f"{case.model}: building base, lorakit and PEFT models")
    base = pm.build_base(case.model)
    targets = pm.TARGETS[case.model]
    lorakit_model = pm.add_lorakit(copy.deepcopy(base), targets, settings.rank, settings.alpha, random_b=True)
    peft_model = pm.peft_from_lorakit(base, lorakit_model)
    models = {"lorakit": lorakit_model, "peft": peft_model}
    states = {"lorakit": lorakit_state(lorakit_model), "peft": peft_state(peft_model)}
    ids = pm.random_ids(base, case.batch, case.seq)
    shape = {"model": case.model, "batch": case.batch, "seq": case.seq, "targets": list(targets), "rank": settings.rank}

    progress(f"{case.model}: correctness check")
    checked = check(base, lorakit_model, peft_model, states, ids)
    log("check", **shape, **checked)
    progress(f"{case.model}: inference latency")
    times = {"inference": inference(base, models, states, ids, settings.infer_repeats, gate)}
    progress(f"{case.model}: merge time")
    times["merge"] = merge_times(states, settings.merge_repeats, gate)
    with tempfile.TemporaryDirectory() as tmp:
        progress(f"{case.model}: adapter save, load, switch")
        times["io"], times["switch"] = io_times(base, lorakit_model, peft_model, Path(tmp), settings, gate)
        progress(f"{case.model}: bfloat16 merge precision ({settings.cycles} cycles)")
        dirs = {"lorakit": Path(tmp) / "lorakit", "peft": Path(tmp) / "peft"}
        small = pm.random_ids(base, case.precision_batch, case.seq, seed=2)
        with torch.inference_mode():
            reference = lorakit_model(input_ids=small).logits.float()
        prec = precision(base, dirs, reference, small, settings.cycles)
        if settings.profile:
            progress(f"{case.model}: profiles (forward, save, load, merge)")
            profiles += profile_in_process(case, base, lorakit_model, ids, dirs["lorakit"], log)
    for section, timings in times.items():
        for name, ms in timings.ms.items():
            log("time", **shape, section=section, op=name, ms=ms, others_cpus=timings.others)
    for library, result in prec.items():
        log("precision", **shape, batch_precision=case.precision_batch, library=library, **result)
    return {"shape": shape, "precision_batch": case.precision_batch, "check": checked,
            "inference": summarise(times["inference"], "base"), "merge": _paired(times["merge"]),
            "io": {**_paired(times["io"]), **_paired(times["switch"])}, "precision": prec}


def _paired(timings: Timings) -> dict[str, dict]:
    """'lorakit X' / 'peft X' pairs: each one's ms_stats, and lorakit / PEFT."""
    out = {}
    for name, ms in timings.ms.items():
        library, op = name.split(" ", 1)
        out.setdefault(op, {})[library] = ms_stats(ms, timings.others)
    for op, entry in out.items():
        entry["ratio"] = ratio_stats(timings.ms[f"lorakit {op}"], timings.ms[f"peft {op}"], timings.others)
    return out


def profile_in_process(case: Case, base, lorakit_model, ids: torch.Tensor, lk_dir: Path, log: Log) -> list[dict]:
    """Where the time goes in lorakit's unmerged forward (vs the base's), save, load-and-activate and merge."""
    @torch.inference_mode()
    def forward(model):
        return model(input_ids=ids)

    def load():
        _lk_activate(lorakit_model, lk_dir, "profiled")
        _lk_drop(lorakit_model, "profiled")

    @torch.no_grad()
    def merge_unmerge():
        lk.merge_(lorakit_model)
        lk.unmerge_(lorakit_model)

    with tempfile.TemporaryDirectory() as tmp:
        calls = (("forward, base", lambda: forward(base), False),
                 ("forward, lorakit unmerged", lambda: forward(lorakit_model), False),
                 ("lorakit save", lambda: lk.save_adapter(lorakit_model, Path(tmp) / "saved"), True),
                 ("lorakit load + activate (+ delete)", load, True), ("lorakit merge + unmerge", merge_unmerge, True))
        reports = [{"model": case.model, "what": what, **profile(call, python=python)} for what, call, python in calls]
    for report in reports:
        log("profile", **report)
    return reports


# --- command line ---------------------------------------------------------------------------------------------
def settings_from(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 repeats, 1 warm-up + 2 timed training steps, no profiles; "
                             "writes perf.jsonl only (not RESULTS.md or perf.png)")
    model_options(parser, Settings.out, "perf.png")
    args = parser.parse_args(argv)
    settings = Settings(label=args.label, out=args.out)
    if args.quick:
        quick = dict(train_warmup=1, train_steps=2)
        settings = replace(settings, cases=tuple(replace(c, **quick) for c in settings.cases), infer_repeats=3,
                           merge_repeats=3, io_repeats=3, switch_repeats=11, profile=False, mode="quick", quiet_budget_s=60,
                           plot=None, profile_out=None, results_md=None)
    return narrowed(settings, args)


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    result = command_line(sys.argv[1:] if argv is None else argv, "bench", settings_from, run, perf_report)
    checks = all(m["check"]["passed"] for m in result["models"].values())
    return 0 if checks else 1


if __name__ == "__main__":
    sys.exit(main())
