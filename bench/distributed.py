"""Benchmark: `lorakit train` under torchrun, one and two processes, DDP vs FSDP2 (here: the CPU, gloo).

    .venv/bin/python bench/distributed.py            # SmolLM2-135M, 5 runs: a few minutes on 2 CPU cores
    .venv/bin/python bench/distributed.py --quick    # a tiny Llama, 3 steps: a smoke run (results not kept)

Every run is the real training loop (lorakit.training.train) with the same global batch; the worker
wraps its step to time it and wraps torch.distributed's collectives to count the bytes of each kind
per step (the size of the collective's whole tensor as one process sees it: an all-reduce's buffer, an
all-gather's output, a reduce-scatter's input; a ring moves about (W-1)/W of that, twice for an
all-reduce). Next to the counts, what the parameter sizes predict: DDP all-reduces the trainable
gradients; FSDP all-gathers each block's parameters (frozen base included, padded to a multiple of W
rows) for its forward and again for its backward and the root's once, and reduce-scatters the trainable
gradients. Per process: the median step time, the peak RSS (loading the model included) and the
largest RSS right after a step (the steady state, once FSDP has sharded the base). Appends to
bench/results/distributed.jsonl, draws distributed.png and writes distributed.md.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import lorakit as lk
import lorakit.training.train as training
from lorakit.training.config import TrainConfig
from lorakit.training.parallel import blocks

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
COLLECTIVES = {"all_reduce": "all_reduce", "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
               "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}
KINDS = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class Settings:
    """One benchmark run: (strategy, processes) pairs, all with the same global batch."""

    model: str = "smollm2-135m"
    data: str = str(ROOT / "data" / "kjv_sample.txt")
    runs: tuple = (("none", 1), ("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2))
    steps: int = 5  # the first is not timed (first-call allocations)
    rounds: int = 2  # every run this many times, in an order rotated each round (a shared machine's load moves)
    batch_size: int = 4
    max_length: int = 64
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    threads: int = 1  # torch threads per process: on a loaded shared machine a 2-thread process stalls on its slower
    # thread (steps here swung from 0.9 to 23 s); one-thread processes stay steady, so 2 processes use 2 cores
    label: str = ""
    out: Path = RESULTS / "distributed.jsonl"
    keep: bool = True  # write distributed.md and .png


# --- the worker: one process of one run -----------------------------------------------------------
def worker(settings: Settings, strategy: str, records: Path) -> None:
    """Train under `strategy` in this process (torchrun started it, or alone for "none"); write rank{r}.json."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(settings.threads)
    counted = {kind: 0 for kind in KINDS}
    for name, kind in COLLECTIVES.items():
        setattr(dist, name, _counting(getattr(dist, name), kind, counted))
    steps, predicted, held, trimmed = [], {}, [], []
    real_step = training._Run.train_step

    def timed_step(run):
        if not predicted:
            predicted.update(predicted_bytes(run.model, strategy, processes))
        before = dict(counted)
        started = time.perf_counter()
        record = real_step(run)
        if not held:  # after a backward, when FSDP has sharded every unit again (an evaluation leaves the root whole)
            held.append(held_bytes(run.model))
        steps.append({"seconds": time.perf_counter() - started, "rss": _current_rss(),
                      **{kind: counted[kind] - before[kind] for kind in KINDS}})
        if len(steps) == settings.steps:  # glibc keeps freed blocks (FSDP frees a block's weights twice a step)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            trimmed.append(_current_rss())
        return record

    training._Run.train_step = timed_step
    out = Path(tempfile.mkdtemp(prefix="run-", dir=records))
    cfg = TrainConfig(model=settings.model, data=settings.data, out=str(out), steps=settings.steps,
                      batch_size=settings.batch_size, max_length=settings.max_length, eval_fraction=0.01,
                      lora=lk.LoraConfig(rank=settings.rank, targets=settings.targets), progress=False,
                      strategy=None if strategy == "none" else strategy)
    result = training.train(cfg)
    rank = int(os.environ.get("RANK", "0"))
    adapter = sum(f.stat().st_size for f in (out / "adapter").iterdir()) if rank == 0 else None
    (records / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "steps": steps[1:], "predicted": predicted, "peak_rss": _peak_rss(), "held_bytes": held[0],
        "trimmed_rss": trimmed[0],
        "trainable_bytes": 4 * result.trainable, "adapter_file_bytes": adapter, "total_parameters": result.total}))


def _counting(collective, kind: str, counted: dict):
    def wrapped(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if hasattr(a, "element_size")]
        # all_reduce: its one tensor; all_gather: the output (first); reduce_scatter: the input (second)
        tensor = tensors[1] if kind == "reduce_scatter" else tensors[0]
        counted[kind] += tensor.numel() * tensor.element_size()
        return collective(*args, **kwargs)
    return wrapped


def predicted_bytes(model: nn.Module, strategy: str, processes: int) -> dict:
    """Per step, from the parameter sizes (see the module docstring)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if strategy == "ddp":
        return {"all_reduce": sum(_bytes(p, 1) for p in trainable) + 8}  # + the token count and the loss
    if strategy != "fsdp" or processes == 1:  # FSDP on one process copies instead of calling collectives
        return {"all_reduce": 8} if strategy == "fsdp" else {}
    in_blocks = {id(p) for block in blocks(model) for p in block.parameters()}
    block_bytes = sum(_bytes(p, processes) for p in model.parameters() if id(p) in in_blocks)
    root_bytes = sum(_bytes(p, processes) for p in _unique(model.parameters()) if id(p) not in in_blocks)
    return {"all_reduce": 8, "all_gather": 2 * block_bytes + root_bytes,
            "reduce_scatter": sum(_bytes(p, processes) for p in trainable)}


def held_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this process holds (its shards, under FSDP)."""
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in [*model.parameters(), *model.buffers()]]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _bytes(param, processes: int) -> int:
    """The parameter's bytes with its first dimension padded to a multiple of `processes` (FSDP's shards)."""
    rows = -(-param.shape[0] // processes) * processes if param.dim() else 1
    return rows * math.prod(param.shape[1:]) * param.element_size()


def _unique(params):
    seen = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- the driver -----------------------------------------------------------------------------------
def run(settings: Settings) -> list[dict]:
    """Every (strategy, processes) run, `rounds` times; one summary record per run, appended to settings.out."""
    from common import Log, machine, rotated

    log = Log(settings.out, uuid.uuid4().hex[:8])
    log("meta", settings={k: str(v) for k, v in asdict(settings).items()}, machine=machine())
    names = [f"{strategy} x{processes}" for strategy, processes in settings.runs]
    measured: dict[str, list] = {name: [] for name in names}
    for round_ in range(settings.rounds):
        for name in rotated(names, round_):
            strategy, processes = settings.runs[names.index(name)]
            with tempfile.TemporaryDirectory() as tmp:
                ranks = launch(settings, strategy, processes, Path(tmp))
            measured[name].append(ranks)
            log("round", round=round_, strategy=strategy, processes=processes, ranks=ranks)
            print(f"round {round_}: {name}: {statistics.median(_step_seconds(ranks)):.3f} s/step", flush=True)
    summaries = [summarize(*run_, measured[name], settings) for name, run_ in zip(names, settings.runs)]
    for summary in summaries:
        log("summary", **summary)
    return summaries


def launch(settings: Settings, strategy: str, processes: int, records: Path) -> list[dict]:
    worker_args = ["--worker", json.dumps({**asdict(settings), "out": str(settings.out)}), strategy, str(records)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [sys.executable, *(launcher if strategy != "none" else []), str(Path(__file__)), *worker_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(settings.threads)}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{strategy} x{processes} failed:\n{proc.stderr[-4000:]}")
    return [json.loads((records / f"rank{r}.json").read_text()) for r in range(processes)]


def _step_seconds(ranks: list[dict]) -> list[float]:
    """Each timed step's time: the slowest process's (they wait for each other)."""
    return [max(r["steps"][i]["seconds"] for r in ranks) for i in range(len(ranks[0]["steps"]))]


def summarize(strategy: str, processes: int, rounds: list[list[dict]], settings: Settings) -> dict:
    """The median over rounds of each round's median step; memory maxima over processes and rounds; the bytes
    of each collective kind per step (the same every step and round)."""
    ranks = rounds[0]
    step = statistics.median(statistics.median(_step_seconds(r)) for r in rounds)
    measured = {kind: statistics.median(s[kind] for s in ranks[0]["steps"]) for kind in KINDS}
    every = [rank for r in rounds for rank in r]
    return {"strategy": strategy, "processes": processes, "step_seconds": step,
            "step_seconds_by_round": [statistics.median(_step_seconds(r)) for r in rounds],
            "tokens_per_second": settings.batch_size * settings.max_length / step,
            "held_bytes": max(r["held_bytes"] for r in every),
            "peak_rss_mb": max(r["peak_rss"] for r in every) / 2**20,
            "steady_rss_mb": max(max(s["rss"] for s in r["steps"]) for r in every) / 2**20,
            "trimmed_rss_mb": max(r["trimmed_rss"] for r in every) / 2**20,
            "bytes_per_step": {k: int(v) for k, v in measured.items() if v}, "predicted_bytes": ranks[0]["predicted"],
            "trainable_bytes": ranks[0]["trainable_bytes"], "adapter_file_bytes": ranks[0]["adapter_file_bytes"],
            "total_parameters": ranks[0]["total_parameters"]}


# --- the report -------------------------------------------------------------------------------------
def size(value: float) -> str:
    """Bytes in B, kB, MB or GB (powers of 1024)."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if value >= scale:
            return f"{value / scale:.{2 if value < 10 * scale else 1}f} {unit}"
    return f"{value:.0f} B"


def table(summaries: list[dict]) -> str:
    def comm(s: dict, kind: str) -> str:
        got, want = s["bytes_per_step"].get(kind, 0), s["predicted_bytes"].get(kind, 0)
        if not got and not want:
            return "-"
        return f"{size(got)} ({'=' if got == want else f'predicted {size(want)}'})"

    rows = ["| strategy | processes | step (s) | tokens/s | weights held / process | peak RSS / process | "
            "steady RSS / process | after malloc_trim | "
            "all-reduce / step | all-gather / step | reduce-scatter / step | comm / adapter |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        total = sum(s["bytes_per_step"].values())
        ratio = f"{total / s['trainable_bytes']:.1f}x" if total else "-"
        rows.append(f"| {s['strategy']} | {s['processes']} | {s['step_seconds']:.3f} | {s['tokens_per_second']:.0f} | "
                    f"{size(s['held_bytes'])} | {s['peak_rss_mb']:.0f} MB | {s['steady_rss_mb']:.0f} MB | "
                    f"{s['trimmed_rss_mb']:.0f} MB | {comm(s, 'all_reduce')} | "
                    f"{comm(s, 'all_gather')} | {comm(s, 'reduce_scatter')} | {ratio} |")
    return "\n".join(rows)


def markdown(summaries: list[dict], settings: Settings, seconds: float) -> str:
    by = {(s["strategy"], s["processes"]): s for s in summaries}
    first, ddp1, ddp2, fsdp2 = summaries[0], by.get(("ddp", 1)), by.get(("ddp", 2)), by.get(("fsdp", 2))
    notes = []
    exact = all(s["bytes_per_step"].get(k, 0) == s["predicted_bytes"].get(k, 0) for s in summaries for k in KINDS)
    if ddp2 and fsdp2:
        gathered = fsdp2["bytes_per_step"].get("all_gather", 0)
        notes.append(
            f"- Traffic: DDP all-reduces the adapter's gradients once per step ({size(ddp2['bytes_per_step']['all_reduce'])}, "
            f"the last 8 bytes being the token count and the loss); FSDP on two processes all-gathers "
            f"{size(gathered)} per step ({gathered / fsdp2['trainable_bytes']:.0f}x the adapter: each block twice, for its "
            "forward and its backward, the root once) and reduce-scatters the adapter's gradients. "
            + ("Every count equals what the parameter sizes predict. " if exact else
               "Some counts differ from what the parameter sizes predict (see the table). ")
            + "On one process FSDP calls no collective (it copies).")
        higher = fsdp2["steady_rss_mb"] > ddp2["steady_rss_mb"]
        notes.append(
            f"- Memory: under FSDP each of two processes holds {size(fsdp2['held_bytes'])} of weights, against "
            f"{size(ddp2['held_bytes'])} under DDP ({fsdp2['held_bytes'] / ddp2['held_bytes']:.2f}x). "
            + ("Its RSS is higher here all the same: glibc keeps the blocks FSDP gathers and frees twice a step, and "
               "returns them on malloc_trim(0) " if higher else "Its RSS after malloc_trim(0) is ")
            + f"({fsdp2['trimmed_rss_mb']:.0f} MB against DDP's {ddp2['trimmed_rss_mb']:.0f} MB). The peak includes "
            "loading: every process loads the whole base before FSDP shards it.")
    if ddp1 and ddp2 and fsdp2:
        notes.append(
            f"- Time: one thread per process on a 2-core machine other jobs were also using (step times moved by up to "
            f"2x between rounds; see the jsonl). DDP on two processes stepped {ddp1['step_seconds'] / ddp2['step_seconds']:.1f}x "
            f"as fast as on one; FSDP on two took {fsdp2['step_seconds'] / ddp2['step_seconds']:.1f}x DDP's time: on CPUs "
            "with gloo, gathering the base every step costs more than the compute it shares out. FSDP is for a base "
            "that does not fit one device; these are not GPU + NCCL numbers.")
    return f"""## Distributed training: DDP vs FSDP2, one and two processes

`make bench-distributed` (`bench/distributed.py`, {seconds / 60:.0f} min here): `lorakit train` on {settings.model}
({first['total_parameters'] / 1e6:.0f}M parameters, float32), LoRA rank {settings.rank} on {', '.join(settings.targets)}
({size(first['trainable_bytes'])} of float32 adapter weights; the adapter file is {size(first['adapter_file_bytes'])}),
global batch {settings.batch_size} x {settings.max_length} tokens, {settings.steps - 1} timed steps x {settings.rounds}
rounds (medians), one thread per process, gloo on the CPU. Bytes per step and process are counted by wrapping
torch.distributed's collectives in each worker (an all-reduce's buffer, an all-gather's output, a
reduce-scatter's input), in brackets what the parameter sizes predict ("=": equal); "comm / adapter" is their
sum over the adapter's size. Weights held: the parameters' storage in the process (its shards under FSDP).
Steady RSS: the largest resident size right after a step.

{table(summaries)}

{chr(10).join(notes)}
"""


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['strategy']} x{s['processes']}" for s in summaries]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(labels, [s["step_seconds"] for s in summaries], color="tab:blue")
    axes[0].set_title("step time (s, median)")
    axes[1].bar(labels, [s["steady_rss_mb"] for s in summaries], color="tab:green", label="steady RSS")
    axes[1].bar(labels, [s["held_bytes"] / 2**20 for s in summaries], color="tab:olive", width=0.5, label="weights held")
    axes[1].plot(labels, [s["peak_rss_mb"] for s in summaries], "k_", markersize=18, label="peak RSS (load)")
    axes[1].set_title("memory per process (MB)")
    axes[1].legend(fontsize=8)
    bottom = [0.0] * len(summaries)
    for kind, color in zip(KINDS, ("tab:orange", "tab:purple", "tab:red")):
        values = [s["bytes_per_step"].get(kind, 0) / 2**20 for s in summaries]
        axes[2].bar(labels, values, bottom=bottom, color=color, label=kind.replace("_", "-"))
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[2].axhline(summaries[0]["trainable_bytes"] / 2**20, color="k", linestyle="--", label="adapter")
    axes[2].set_yscale("symlog", linthresh=1)
    axes[2].set_title("bytes per step and process (MB)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        fields = json.loads(argv[1])
        settings = Settings(**{**fields, "runs": tuple(map(tuple, fields["runs"])), "targets": tuple(fields["targets"]),
                               "out": Path(fields["out"])})
        worker(settings, argv[2], Path(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, 3 steps; nothing kept in bench/results")
    parser.add_argument("--label", default="", help="free text kept with the run, e.g. what else the machine ran")
    args = parser.parse_args(argv)
    settings = Settings(label=args.label)
    if args.quick:
        settings = quick_settings(Path(tempfile.mkdtemp(prefix="bench-distributed-")))
    began = time.perf_counter()
    summaries = run(settings)
    print(table(summaries))
    if settings.keep:
        (RESULTS / "distributed.md").write_text(markdown(summaries, settings, time.perf_counter() - began))
        plot(summaries, RESULTS / "distributed.png")
    return 0


def quick_settings(folder: Path) -> Settings:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    data = folder / "text.txt"
    data.write_text("\n\n".join(tiny.TEXT.strip().splitlines() * 4) + "\n")
    return Settings(model=str(tiny.causal_lm_dir(folder / "lm")), data=str(data), steps=3, max_length=16, rounds=1,
                    out=folder / "distributed.jsonl", keep=False)


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))  # common.py, imported by name as when run as a script
    raise SystemExit(main())
