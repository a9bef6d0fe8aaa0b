"""Benchmark: mixed-adapter batches on GPT-2 small, base forward vs lk.mixed_batch vs PEFT's adapter_names.

    .venv/bin/python bench/mixed_batch.py            # full run: c_attn and all-linear, K in {1, 8, 32}
    .venv/bin/python bench/mixed_batch.py --quick    # smoke run: c_attn, K in {1, 32}, 2 repeats, no profile

For each target set and K: one random-init GPT-2 (124M), a lorakit copy with K rank-8 adapters
(random non-zero B, so each one changes the output) and a PEFT copy that loads the same adapters
from lorakit's files. Example i of the batch uses adapter i % K. The three forwards are timed in
interleaved rounds (the order rotates each round) so that a noisy, shared CPU slows all of them
alike; ratios are medians of the per-round ratios to the base forward of the same round.
Correctness: lorakit's mixed logits equal PEFT's, and equal each adapter run alone (lk.use).
Every measurement is appended to bench/results/mixed_batch.jsonl, tagged with the run's id.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import transformers
from tqdm import tqdm

import lorakit as lk
from common import Log, machine, profile, rotated, torch_threads

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("base", "lorakit", "peft")
TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 logits ~1 after 12 layers: room for sums taken in another order


@dataclass(frozen=True)
class Settings:
    """One benchmark run. `model` overrides GPT2Config() fields (empty: GPT-2 small, 124M)."""

    model: dict = field(default_factory=dict)
    batch: int = 32
    seq: int = 64
    ks: tuple[int, ...] = (1, 8, 32)
    targets: tuple[str, ...] = ("c_attn", "all-linear")
    rank: int = 8
    alpha: float = 16.0
    repeats: int = 5
    warmup: int = 0  # untimed rounds first; the correctness check has already run every variant once
    threads: int = 2
    profile_k: int | None = 32  # profile lorakit's forward at this K (None: no profile)
    settle: int = 2  # untimed base forwards before the first case: a fresh process's first ones are slow
    label: str = ""  # free text kept in the run's meta record, e.g. what else the machine was running
    out: Path = RESULTS / "mixed_batch.jsonl"


# --- models ------------------------------------------------------------------------------------------
def build_base(settings: Settings) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(**settings.model)
    return transformers.GPT2LMHeadModel(config).eval()


def adapter_names(k: int) -> list[str]:
    return [f"a{i}" for i in range(k)]


def routing(k: int, batch: int) -> list[str]:
    """Adapter names of the batch's rows, round-robin: row i uses adapter i % k."""
    return [f"a{i % k}" for i in range(batch)]


def build_lorakit(base: torch.nn.Module, targets: str, k: int, settings: Settings) -> torch.nn.Module:
    """A copy of `base` with k adapters a0..a{k-1}; B is random so every adapter matters."""
    model = copy.deepcopy(base)
    config = lk.LoraConfig(rank=settings.rank, alpha=settings.alpha,
                           targets=targets if targets == "all-linear" else (targets,))
    for i, name in enumerate(adapter_names(k)):
        torch.manual_seed(1000 + i)
        lk.inject_(model, config, adapter=name)
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                layer.adapters[name].B.normal_(std=0.02)
    return model.eval()


def build_peft(base: torch.nn.Module, lorakit_model: torch.nn.Module, k: int) -> torch.nn.Module:
    """A PEFT copy of `base` holding the same k adapters, loaded from the files lorakit writes."""
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        names = adapter_names(k)
        for name in names:
            lk.save_adapter(lorakit_model, Path(tmp) / name, adapter=name)
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(Path(tmp) / name, adapter_name=name)
    return model.eval()


# --- the three forwards ------------------------------------------------------------------------------
def forwards(base, lorakit_model, peft_model, ids: torch.Tensor, names: list[str]) -> dict[str, Callable]:
    """Variant -> a call returning the batch's logits. lorakit's context is entered per call, as a
    server would do with every new batch."""

    def lorakit_mixed():
        with lk.mixed_batch(lorakit_model, names):
            return lorakit_model(ids).logits

    return {
        "base": lambda: base(ids).logits,
        "lorakit": lorakit_mixed,
        "peft": lambda: peft_model(input_ids=ids, adapter_names=names).logits,
    }


def time_interleaved(calls: dict[str, Callable], repeats: int, warmup: int, bar: tqdm) -> dict[str, list[float]]:
    """Milliseconds per call, `repeats` rounds of every variant; the order rotates each round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name in rotated(list(calls), round_):
            start = time.perf_counter()
            calls[name]()
            elapsed = (time.perf_counter() - start) * 1e3
            if round_ >= warmup:
                times[name].append(elapsed)
            bar.update(1)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median ms per variant, and the median of its per-round ratios to the same round's base."""
    out = {}
    for name, ms in times.items():
        ratios = [t / b for t, b in zip(ms, times["base"])]
        out[name] = {"median_ms": statistics.median(ms), "ratio": statistics.median(ratios),
                     "min_ms": min(ms), "max_ms": max(ms)}
    return out


# --- correctness ---------------------------------------------------------------------------------------
def check(base, lorakit_model, peft_model, ids: torch.Tensor, names: list[str]) -> dict:
    """lorakit mixed == PEFT mixed; lorakit mixed == a few rows run alone with lk.use; adapters matter."""
    calls = forwards(base, lorakit_model, peft_model, ids, names)
    base_out, mixed, peft_out = calls["base"](), calls["lorakit"](), calls["peft"]()
    present = list(dict.fromkeys(names))  # in the order of their first row
    rows = sorted({names.index(n) for n in (present[0], present[len(present) // 2], present[-1])})
    result = {"rows_alone": rows, "adapter_effect": (mixed - base_out).abs().max().item(),
              "vs_peft_max_abs": (mixed - peft_out).abs().max().item(), "vs_alone_max_abs": 0.0}
    problems = _mismatch("lorakit vs peft", mixed, peft_out)
    for row in rows:
        with lk.use(lorakit_model, names[row]):
            alone = lorakit_model(ids[row:row + 1]).logits
        result["vs_alone_max_abs"] = max(result["vs_alone_max_abs"], (mixed[row:row + 1] - alone).abs().max().item())
        problems += _mismatch(f"lorakit row {row} vs {names[row]} alone", mixed[row:row + 1], alone)
    if result["adapter_effect"] < 100 * TOL["atol"]:
        problems.append(f"adapters move the logits by only {result['adapter_effect']:.2e}: the check proves nothing")
    result.update(passed=not problems, problems=problems)
    return result


def _mismatch(what: str, actual: torch.Tensor, expected: torch.Tensor) -> list[str]:
    try:
        torch.testing.assert_close(actual, expected, **TOL)
    except AssertionError as error:
        return [f"{what}: {str(error).splitlines()[0]}"]
    return []


# --- the run ---------------------------------------------------------------------------------------------
def run(settings: Settings) -> list[dict]:
    """Every (targets, K) case: build, check, time, (profile); returns the summary rows."""
    with torch_threads(settings.threads):
        return _run(settings)


def _run(settings: Settings) -> list[dict]:
    log = Log(settings.out, time.strftime("%Y%m%dT%H%M%S"))
    log("meta", settings={**asdict(settings), "out": str(settings.out)}, machine=machine(), argv=sys.argv)
    base = build_base(settings)
    ids = torch.randint(0, base.config.vocab_size, (settings.batch, settings.seq),
                        generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for _ in range(settings.settle):
            base(ids)
    cases = [(t, k) for t in settings.targets for k in settings.ks]
    bar = tqdm(total=len(cases) * (settings.warmup + settings.repeats) * len(VARIANTS), unit="fwd")
    summary, profiles = [], []
    for targets, k in cases:
        rows, report = run_case(base, ids, targets, k, settings, log, bar)
        summary += rows
        if report is not None:
            profiles.append(f"== lorakit mixed batch, {targets}, K={k}\n{report['table']}\n{report.get('python', '')}")
        gc.collect()  # at most three 124M models alive at a time
    bar.close()
    if profiles:  # the latest run's profiles, for reading (the JSON lines keep every run's)
        settings.out.with_name(settings.out.stem + "_profile.txt").write_text("\n\n".join(profiles))
    return summary


def run_case(base, ids: torch.Tensor, targets: str, k: int, settings: Settings, log: Log, bar: tqdm):
    """Build the two adapted copies, check them, time the three forwards; (summary rows, profile or None)."""
    bar.set_description(f"{targets} K={k}: build")
    names = routing(k, settings.batch)
    lorakit_model = build_lorakit(base, targets, k, settings)
    peft_model = build_peft(base, lorakit_model, k)
    calls = forwards(base, lorakit_model, peft_model, ids, names)
    with torch.inference_mode():  # the models are built outside it: their weights stay ordinary tensors
        bar.set_description(f"{targets} K={k}: check")
        result = check(base, lorakit_model, peft_model, ids, names)
        log("check", targets=targets, k=k, **result)
        bar.set_description(f"{targets} K={k}: time")
        times = time_interleaved(calls, settings.repeats, settings.warmup, bar)
        report = None
        if k == settings.profile_k:
            bar.set_description(f"{targets} K={k}: profile")
            report = profile(calls["lorakit"], rows=15, interval=0.005)  # coarse: this machine's fine timer is slow
            log("profile", targets=targets, k=k, **report)
    for variant, ms in times.items():
        for repeat, value in enumerate(ms):
            log("time", targets=targets, k=k, variant=variant, repeat=repeat, ms=value)
    rows = [{"targets": targets, "k": k, "variant": variant, **stats, "check_passed": result["passed"]}
            for variant, stats in summarise(times).items()]
    for row in rows:
        log("summary", **row)
    return rows, report


def table(summary: list[dict]) -> str:
    """A markdown table: one row per (targets, K), ms and ratio to base per variant."""
    lines = ["| targets | K | base ms | lorakit ms | lorakit / base | PEFT ms | PEFT / base | check |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    cases = dict.fromkeys((row["targets"], row["k"]) for row in summary)
    for targets, k in cases:
        rows = {row["variant"]: row for row in summary if (row["targets"], row["k"]) == (targets, k)}
        b, l, p = rows["base"], rows["lorakit"], rows["peft"]
        lines.append(f"| {targets} | {k} | {b['median_ms']:.0f} | {l['median_ms']:.0f} | {l['ratio']:.3f}x "
                     f"| {p['median_ms']:.0f} | {p['ratio']:.3f}x | {'pass' if b['check_passed'] else 'FAIL'} |")
    return "\n".join(lines)


def settings_from(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: c_attn, K in {1, 32}, 2 repeats, no profile")
    parser.add_argument("--repeats", type=int, help="timed rounds per case (default 5; 2 with --quick)")
    parser.add_argument("--targets", nargs="+", choices=Settings.targets, help="target sets (default: both)")
    parser.add_argument("--ks", nargs="+", type=int, help="adapter counts K (default: 1 8 32)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of lorakit at K=32")
    parser.add_argument("--label", default="", help="note kept with the run, e.g. what else the machine runs")
    parser.add_argument("--out", type=Path, default=Settings.out, help="JSON-lines file to append to")
    args = parser.parse_args(argv)
    if args.quick:
        settings = Settings(ks=(1, 32), targets=("c_attn",), repeats=2, profile_k=None, settle=0)
    else:
        settings = Settings()
    given = {"repeats": args.repeats, "targets": args.targets and tuple(args.targets), "ks": args.ks and tuple(args.ks)}
    changes = {key: value for key, value in given.items() if value is not None}
    if args.no_profile:
        changes["profile_k"] = None
    return replace(settings, **changes, label=args.label, out=args.out)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, from inside PEFT
    summary = run(settings)
    print(table(summary))
    print(f"records appended to {settings.out}")
    return 0 if all(row["check_passed"] for row in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
