"""What the benchmarks share: the JSON-lines log, the machine description, the profile of one call,
the rotating order of interleaved rounds, torch's thread count for a run, and the command-line main."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import torch
import transformers

BENCH = Path(__file__).resolve().parent


PHASE = "phase: "  # torch.profiler.record_function labels that name a phase of the call, not an op


# --- timing and profiles ------------------------------------------------------------------------------------------
def rotated(names: list[str], round_: int) -> list[str]:
    """The order of interleaved round `round_`: `names` rotated one place further each round."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` for the block, then set back."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile(call: Callable, rows: int = 12, python: bool = True, interval: float = 0.0005, memory: bool = False) -> dict:
    """torch.profiler's op table (by self CPU time) and, if installed, pyinstrument's Python view.
    memory: also the ops by the memory they allocated and did not free within the op (outputs, saved
    activations), their call counts, and the total time of each `PHASE` the call marks."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=memory) as prof:
        call()
    averages = prof.key_averages()
    ops = [e for e in averages if not e.key.startswith(PHASE)]
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    report = {"table": averages.table(sort_by="self_cpu_time_total", row_limit=rows),
              "self_ms": {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in top}}
    if memory:
        by_memory = sorted(ops, key=lambda e: e.self_cpu_memory_usage, reverse=True)[:rows]
        report.update(
            memory_table=averages.table(sort_by="self_cpu_memory_usage", row_limit=rows),
            calls={e.key: e.count for e in top},
            self_mb={e.key: round(e.self_cpu_memory_usage / 2**20, 1) for e in by_memory if e.self_cpu_memory_usage > 0},
            phases_ms={e.key[len(PHASE):]: round(e.cpu_time_total / 1e3, 2) for e in averages if e.key.startswith(PHASE)})
    try:
        from pyinstrument import Profiler
    except ImportError:
        return report
    if python:
        profiler = Profiler(interval=interval)
        profiler.start()
        call()
        profiler.stop()
        report["python"] = profiler.output_text(unicode=False, color=False, show_all=False)
    return report


class Log:
    """Appends one JSON object per record, every one tagged with the run id."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path, self.run_id = path, run_id
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, kind: str, **fields) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"run": self.run_id, "kind": kind, **fields}, default=str) + "\n")


def machine() -> dict:
    """What the numbers were measured on, and how busy it was."""
    import peft

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "memory_gb": _memory_gb(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": loadavg(),
            "git": _git_state()}


def _git_state() -> dict | None:
    """The commit measured, and which files of lorakit/ differed from it (uncommitted work counts too)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=BENCH.parent, check=True).stdout

    try:
        changed = [line[3:] for line in git("status", "--porcelain", "--", "lorakit").splitlines()]
        return {"head": git("rev-parse", "--short", "HEAD").strip(), "lorakit_changed": changed}
    except (OSError, subprocess.CalledProcessError):
        return None


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- the command line -----------------------------------------------------------------------------------------
def command_line(argv: list[str], target: str, settings_from: Callable, run: Callable, report: ModuleType) -> dict:
    """A benchmark's main: its settings from `argv`, the run with timed progress lines, then its report printed and
    written (`report.body`, `report.write_outputs`); the run's result, its command recorded as `make target`."""
    settings = settings_from(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, from inside PEFT
    began = time.perf_counter()

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {text}", flush=True)

    result = run(settings, progress)
    result["meta"]["command"] = f"make {target}" + (f" BENCH_ARGS='{' '.join(argv)}'" if argv else "")
    print(report.body(result))
    report.write_outputs(result, settings)
    print(f"records appended to {settings.out} (run {result['run']})")
    return result


def model_options(parser: argparse.ArgumentParser, out: Path, outputs: str) -> None:
    """The options bench/perf.py and bench/precision.py share: models, profiles, RESULTS.md, label, records file."""
    parser.add_argument("--models", nargs="+", choices=("gpt2-small", "smollm2-135m"),
                        help="models to measure (default: both)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiles")
    parser.add_argument("--no-results-md", action="store_true", help=f"do not write bench/RESULTS.md or {outputs}")
    parser.add_argument("--label", default="", help="note kept with the run, e.g. what else the machine runs")
    parser.add_argument("--out", type=Path, default=out, help="JSON-lines file to append to")


def narrowed(settings, args: argparse.Namespace):
    """`settings` with model_options' choices applied: fewer models, no profiles, no RESULTS.md or chart."""
    if args.models:
        settings = replace(settings, cases=tuple(c for c in settings.cases if c.model in args.models))
    if args.no_profile:
        settings = replace(settings, profile=False, profile_out=None)
    if args.no_results_md:
        settings = replace(settings, results_md=None, plot=None)
    return settings

