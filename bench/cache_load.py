"""Benchmark: cache misses of lk.AdapterCache on SmolLM2-135M, as hundreds of distinct adapters cycle through it.

    .venv/bin/python bench/cache_load.py            # 300 adapters, capacity 8, two cycles: 600 misses (~2 min)
    .venv/bin/python bench/cache_load.py --quick    # 40 adapters, one cycle, no profile

Writes N rank-8 q_proj,v_proj adapters (random A and non-zero random B) with lk.save_adapter, registers them all on
an AdapterCache(model, capacity) over lk.load_base("smollm2-135m"), then asks for them round robin: every request
is a miss, and once the cache is full each miss evicts the least recently used adapter and loads the next one.
Each miss (cache.ensure([name])) is timed: wall clock, process CPU time, and the garbage collector's pauses
inside it. The summary gives percentiles over the misses that evict, their first 20 against their last 20 and the
least-squares trend in ms per 100 misses (flat: no growth as adapters cycle). Correctness: afterwards, logits of a
mixed batch through the cache equal a fresh base with each adapter loaded directly. Every record goes to
bench/results/cache_load.jsonl (tagged with the run id); the profile of a block of misses to
bench/results/cache_load_profile.txt.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import lorakit as lk
from common import BENCH, Log, machine, profile, torch_threads
from perf_load import Meter, QuietGate

RESULTS = BENCH / "results"
TARGET_MS = 10.0  # a miss of this adapter on this CPU: at most this long (median)
BLOCK = 20  # misses compared at the start and the end of the run
TOL = dict(rtol=1e-4, atol=1e-4)  # float32 logits: a mixed batch sums in another order than one adapter alone


@dataclass(frozen=True)
class Settings:
    """One benchmark run."""

    model: str = "smollm2-135m"  # a bundled name or a transformers directory (lk.load_base)
    adapters: int = 300
    capacity: int = 8
    cycles: int = 2
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    threads: int = 2
    gc_freeze: bool = False  # gc.freeze() once the base is loaded, as a server may do after starting up
    profile_misses: int = 20  # misses profiled after the timed ones, twice that many adapters (0: none)
    check_rows: int = 4  # adapters in the closing correctness batch (plus one row through the base)
    quiet_wait_s: float = 15.0  # before timing, wait at most this long for other work on the machine to stop
    label: str = ""  # free text kept in the run's meta record, e.g. what else the machine was running
    out: Path = RESULTS / "cache_load.jsonl"


# --- adapters ----------------------------------------------------------------------------------------------
def write_adapters(settings: Settings, root: Path, bar: tqdm) -> dict[str, Path]:
    """name -> folder of `settings.adapters` distinct adapters saved by lk.save_adapter from one scratch base."""
    writer = lk.load_base(settings.model)
    config = lk.LoraConfig(rank=settings.rank, alpha=settings.alpha, targets=settings.targets)
    g = torch.Generator().manual_seed(0)
    folders = {}
    for i in range(settings.adapters):
        lk.inject_(writer, config, adapter="w")
        with torch.no_grad():
            for _, layer in lk.lora_layers(writer):
                part = layer.adapters["w"]
                part.B.copy_(torch.randn(part.B.shape, generator=g) * 0.02)  # non-zero: each adapter matters
        folders[f"a{i:03d}"] = lk.save_adapter(writer, root / f"a{i:03d}", adapter="w")
        lk.delete_adapter(writer, "w")
        bar.update()
    return folders


# --- timing ------------------------------------------------------------------------------------------------
class GcPauses:
    """Seconds the garbage collector ran, per generation, while attached (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds, self._start = [0.0, 0.0, 0.0], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start

    def total(self) -> float:
        return sum(self.seconds)


def time_misses(cache: lk.AdapterCache, names: list[str], log: Log, bar: tqdm) -> list[dict]:
    """Ask for each name in turn (each a miss), timing each; one record per miss, each with the CPUs other work
    used during its block of BLOCK misses (perf_load.Meter: the machine is shared)."""
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    records, meter = [], Meter()
    try:
        for i, name in enumerate(names):
            if i % BLOCK == 0 and i:
                others = meter.others()
                for record in records[-BLOCK:]:
                    record["others_cpus"] = others
                meter.start()
            evictions, gc_before = cache.evictions, pauses.total()
            wall, cpu = time.perf_counter(), time.process_time()
            cache.ensure([name])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            records.append({"miss": i, "adapter": name, "evicted": cache.evictions > evictions, "ms": 1e3 * wall,
                            "cpu_ms": 1e3 * cpu, "gc_ms": 1e3 * (pauses.total() - gc_before),
                            "load_ms": 1e3 * cache.load_times[name]})
            bar.update()
    finally:
        gc.callbacks.remove(pauses)
    others = meter.others()
    for record in records[BLOCK * ((len(records) - 1) // BLOCK):]:  # the last block
        record["others_cpus"] = others
    for record in records:
        log("miss", **record)
    return records


def summarise(records: list[dict]) -> dict:
    """Percentiles over the misses that evict; their first and last BLOCK; the trend across them."""
    evicting = [r for r in records if r["evicted"]]
    ms = [r["ms"] for r in evicting]
    ordered = sorted(ms)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    n = len(ms)
    mean_i = (n - 1) / 2
    slope = sum((i - mean_i) * (v - statistics.fmean(ms)) for i, v in enumerate(ms)) / max(
        sum((i - mean_i) ** 2 for i in range(n)), 1e-12)
    return {"misses": len(records), "evicting": n, "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "max_ms": ordered[-1], "mean_ms": statistics.fmean(ms),
            "cpu_p50_ms": statistics.median(r["cpu_ms"] for r in evicting),
            "load_p50_ms": statistics.median(r["load_ms"] for r in evicting),
            "first_p50_ms": statistics.median(ms[:BLOCK]), "last_p50_ms": statistics.median(ms[-BLOCK:]),
            "first_cpu_p50_ms": statistics.median(r["cpu_ms"] for r in evicting[:BLOCK]),
            "last_cpu_p50_ms": statistics.median(r["cpu_ms"] for r in evicting[-BLOCK:]),
            "first_others_cpus": _mean_others(evicting[:BLOCK]), "last_others_cpus": _mean_others(evicting[-BLOCK:]),
            "trend_ms_per_100": 100 * slope, "gc_ms": sum(r["gc_ms"] for r in records),
            "misses_with_gc_over_5ms": sum(r["gc_ms"] > 5 for r in evicting)}


def _mean_others(records: list[dict]) -> float | None:
    values = [r["others_cpus"] for r in records if r.get("others_cpus") is not None]
    return statistics.fmean(values) if values else None


def profile_misses(cache: lk.AdapterCache, block: list[str], other_block: list[str]) -> dict:
    """torch.profiler's op table over misses of `block`, cProfile's functions by own time over `other_block`."""
    queue = iter(block * 2)  # common.profile calls it twice when pyinstrument is installed
    report = profile(lambda: [cache.ensure([next(queue)]) for _ in block], rows=15, interval=0.001)
    python = cProfile.Profile()
    python.runcall(lambda: [cache.ensure([name]) for name in other_block])
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(25)
    return {**report, "cprofile": text.getvalue()}


# --- correctness ---------------------------------------------------------------------------------------------
@torch.no_grad()
def check(model: torch.nn.Module, cache: lk.AdapterCache, folders: dict[str, Path], settings: Settings) -> dict:
    """Logits through the cache (a mixed batch of resident adapters and the base) against a fresh base with each
    adapter loaded directly."""
    names = cache.loaded()[-settings.check_rows:] + [None]
    ids = torch.randint(0, model.config.vocab_size, (len(names), 16), generator=torch.Generator().manual_seed(1))
    with cache.batch(names):
        served = model(input_ids=ids).logits
    reference = lk.load_base(settings.model).eval()
    rows = []
    for name, row in zip(names, ids):
        if name is not None:
            lk.load_adapter(reference, folders[name], adapter="ref")
        with lk.use(reference, "ref" if name is not None else None):
            rows.append(reference(input_ids=row[None]).logits[0])
        if name is not None:
            lk.delete_adapter(reference, "ref")
    expected = torch.stack(rows)
    error = (served - expected).abs().max().item()
    effect = (expected[:-1] - reference(input_ids=ids[:-1]).logits).abs().max().item()  # the adapters matter
    close = torch.allclose(served, expected, **TOL)
    return {"names": names, "max_abs_error": error, "adapter_effect": effect,
            "passed": close and effect > 100 * TOL["atol"]}


# --- the run -------------------------------------------------------------------------------------------------
def run(settings: Settings) -> dict:
    with torch_threads(settings.threads), tempfile.TemporaryDirectory() as root:
        return _run(settings, Path(root))


def _run(settings: Settings, root: Path) -> dict:
    log = Log(settings.out, time.strftime("%Y%m%dT%H%M%S"))
    log("meta", settings={**asdict(settings), "out": str(settings.out)}, machine=machine(), argv=sys.argv)
    misses = settings.adapters * settings.cycles
    bar = tqdm(total=settings.adapters + misses + settings.profile_misses, unit="step")
    bar.set_description("write adapters")
    folders = write_adapters(settings, root, bar)
    model = lk.load_base(settings.model).eval()
    cache = lk.AdapterCache(model, settings.capacity)
    cache.register_many(folders)
    if settings.gc_freeze:
        gc.collect()
        gc.freeze()
    others_before = QuietGate(max_wait_s=settings.quiet_wait_s).wait() if settings.quiet_wait_s else None
    bar.set_description("time misses")
    meter = Meter()
    records = time_misses(cache, list(folders) * settings.cycles, log, bar)
    summary = {**summarise(records), "others_cpus": meter.others(), "others_before": others_before}
    if settings.profile_misses:
        bar.set_description("profile")
        n = settings.profile_misses
        report = profile_misses(cache, list(folders)[:n], list(folders)[n:2 * n])  # none of them resident
        bar.update(n)
        log("profile", **report)
        settings.out.with_name(settings.out.stem + "_profile.txt").write_text(
            f"== {settings.profile_misses} misses, {settings.model}, capacity {settings.capacity}\n"
            f"{report['table']}\n{report['cprofile']}")
    bar.set_description("check")
    summary["check"] = check(model, cache, folders, settings)
    bar.close()
    log("summary", **summary)
    return summary


def table(summary: dict, settings: Settings) -> str:
    """A markdown table of one run's summary."""
    s = summary
    verdict = "met" if s["p50_ms"] <= TARGET_MS else "not met"
    others = f"{s['others_cpus']:.2f} CPUs" if s["others_cpus"] is not None else "unknown"
    return "\n".join([
        f"{settings.adapters} adapters x {settings.cycles} cycles through capacity {settings.capacity} "
        f"({settings.model}, rank {settings.rank}, {','.join(settings.targets)}, {settings.threads} threads"
        f"{', gc frozen' if settings.gc_freeze else ''}); other work on the machine meanwhile: {others}",
        "",
        "| misses (evicting) | p50 ms | p90 | p99 | max | mean | CPU p50 | load alone p50 "
        "| first 20: p50 / CPU / others | last 20: p50 / CPU / others | trend ms/100 misses | GC ms (misses > 5 ms) "
        "| check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {s['misses']} ({s['evicting']}) | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} "
        f"| {s['max_ms']:.1f} | {s['mean_ms']:.2f} | {s['cpu_p50_ms']:.2f} | {s['load_p50_ms']:.2f} "
        f"| {_block(s, 'first')} | {_block(s, 'last')} | {s['trend_ms_per_100']:+.3f} "
        f"| {s['gc_ms']:.0f} ({s['misses_with_gc_over_5ms']}) "
        f"| {'pass' if s['check']['passed'] else 'FAIL'} (max err {s['check']['max_abs_error']:.1e}) |",
        "",
        f"miss p50 <= {TARGET_MS:g} ms: **{verdict}** ({s['p50_ms']:.2f} ms)",
    ])


def _block(summary: dict, which: str) -> str:
    others = summary[f"{which}_others_cpus"]
    return (f"{summary[f'{which}_p50_ms']:.2f} / {summary[f'{which}_cpu_p50_ms']:.2f} / "
            + ("?" if others is None else f"{others:.2f}"))


def settings_from(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 adapters, one cycle, no profile")
    parser.add_argument("--adapters", type=int, help="distinct adapters (default 300)")
    parser.add_argument("--capacity", type=int, help="AdapterCache capacity (default 8)")
    parser.add_argument("--cycles", type=int, help="rounds through all adapters (default 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default 2)")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after loading the base")
    parser.add_argument("--model", help="bundled model name or transformers directory (default smollm2-135m)")
    parser.add_argument("--label", default="", help="note kept with the run, e.g. what else the machine runs")
    parser.add_argument("--out", type=Path, default=Settings.out, help="JSON-lines file to append to")
    args = parser.parse_args(argv)
    settings = Settings(adapters=40, cycles=1, profile_misses=0) if args.quick else Settings()
    given = {"adapters": args.adapters, "capacity": args.capacity, "cycles": args.cycles, "threads": args.threads,
             "model": args.model}
    changes = {key: value for key, value in given.items() if value is not None}
    return replace(settings, **changes, gc_freeze=args.gc_freeze, label=args.label, out=args.out)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from(argv)
    summary = run(settings)
    print(table(summary, settings))
    print(f"records appended to {settings.out}")
    return 0 if summary["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
