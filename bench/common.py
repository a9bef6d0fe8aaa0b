"""What bench/perf.py and bench/mixed_batch.py share: the JSON-lines log, the machine description and
the profile of one call."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import transformers

BENCH = Path(__file__).resolve().parent


# --- profiles --------------------------------------------------------------------------------------------------
def profile(call: Callable, rows: int = 12, python: bool = True, interval: float = 0.0005) -> dict:
    """torch.profiler's op table (by self CPU time) and, if installed, pyinstrument's Python view."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    averages = prof.key_averages()
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    report = {"table": averages.table(sort_by="self_cpu_time_total", row_limit=rows),
              "self_ms": {e.key: round(e.self_cpu_time_total / 1e3, 2) for e in top}}
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
            "memory_gb": _memory_gb(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": _loadavg(),
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


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
