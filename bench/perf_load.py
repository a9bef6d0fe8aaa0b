"""How busy the machine is with work other than the benchmark's own (Linux /proc), and waiting for quiet.

On a shared 2-core machine one other process can make a step take five times as long. Every round
of every comparison records `others`: the CPUs that processes other than the benchmark's used
while it ran (all CPUs' busy time from /proc/stat, steal included, minus the benchmark's own
processes' time). Rounds with others <= CLEAN_CPUS are "clean"; summaries prefer them. Before a
round, `QuietGate.wait` holds on (within a budget) until the machine is quiet.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

CLEAN_CPUS = 0.3  # a round is clean if other work used at most this many CPUs, on average, while it ran
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float | None:
    """CPU seconds all CPUs have spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def processes_cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far; gone ones count 0."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the line
    return total / _TICK


class Meter:
    """CPUs used by other work between start() and others(): (machine busy - ours) / wall time."""

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self.pids = sorted({os.getpid(), *pids})
        self.start()

    def start(self) -> None:
        self.wall, self.busy, self.ours = time.perf_counter(), machine_busy_s(), processes_cpu_s(self.pids)

    def others(self) -> float | None:
        busy = machine_busy_s()
        if busy is None or self.busy is None:
            return None
        wall = max(time.perf_counter() - self.wall, 1e-9)
        return max(0.0, (busy - self.busy) - (processes_cpu_s(self.pids) - self.ours)) / wall


@dataclass
class QuietGate:
    """Before a round: wait (at most max_wait_s, and budget_s over the whole run) until other work
    uses at most `threshold` CPUs over a `window_s` sample."""

    threshold: float = CLEAN_CPUS
    window_s: float = 0.5
    max_wait_s: float = 15.0
    budget_s: float = 240.0
    waited_s: float = 0.0

    def wait(self, pids: Iterable[int] = ()) -> float | None:
        """Others' CPUs in the last sample before going ahead."""
        started = time.perf_counter()
        while True:
            meter = Meter(pids)
            time.sleep(self.window_s)
            load = meter.others()
            waited = time.perf_counter() - started
            if (load is None or load <= self.threshold or waited >= self.max_wait_s
                    or self.waited_s + waited >= self.budget_s):
                self.waited_s += waited
                return load
