"""Benchmark: `lorakit serve` under concurrent streaming clients, against PEFT, and as the adapters multiply.

    .venv/bin/python bench/serve.py            # full run (`make bench-serve`): about 13 minutes on 2 quiet CPU cores
    .venv/bin/python bench/serve.py --quick    # smoke run: 4 adapters, 8 clients, one round (1-2 minutes)

SmolLM2-135M, prompts of exactly 64 tokens (windows of data/kjv_sample.txt, whose greedy continuations
run to the token limit), 32 tokens generated greedily; what is counted is what was generated. Four ways
to answer the same requests:

 (a) `lorakit serve`, every request on the base (`model` = the base's name);
 (b) the same server, the requests round-robin over 32 rank-8 q_proj/v_proj adapters (--max-loaded 32);
 (c) PEFT as a user writes it: `set_adapter` then transformers' `generate`, one request at a time;
 (d) PEFT with the requests of one adapter batched: `set_adapter`, one left-padded `generate` per adapter.

(a) and (b): 16 clients (official `openai` client, streaming, timed from the client: bench/serve_http.py),
each sending its next request when its last one is answered; their first requests are spread over one
request's latency (measured in the warm-up), so that requests arrive spread out as in a steady stream
rather than in waves of 16. TTFT runs from sending a request to its first text chunk, ITL is the gap
between chunks. (c) and (d) run in this process: TTFT from `set_adapter` to the first token `generate`
streams (a streamer that notes when each step's tokens arrive), ITL the gap between tokens.
16 clients: on 2 cores a 16-row decode step costs about twice a 1-row step for 16 times the tokens, so
batching has much to win, while at 32 rows the cores rather than the weights' memory become the limit
and the prefills that admit new requests stall every running row for longer.

A warm-up (every adapter loaded, every first call paid) comes first, then timed rounds, the four taking
turns in an order that rotates each round, each run waiting for a quiet machine first; ratios are taken
round by round. Each round (a) and (b) answer every request; (c) and (d) answer those of the adapters
r, r + rounds, ... (round r), so that over the rounds they answer (b)'s requests once, in (b)'s groups.

Scaling: one server per count of registered adapters (1, 8, 32, 128), each --max-loaded 8, started
together; rounds of 24 requests to each in turn, round-robin over its adapters (so 32 and 128 cycle
through the cache): throughput, latencies, and from /metrics the cache misses and the adapter load
histogram (`lorakit_adapter_load_seconds`). Its buckets are coarse below 10 ms, so the load path alone
(AdapterCache.ensure of 128 adapters through 8 slots, twice round) is also timed exactly in this process.

Every record goes to bench/results/serve.jsonl (tagged with the run id); the chart to
bench/results/serve.png, the markdown section to bench/results/serve.md (bench/serve_report.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import lorakit as lk
from lorakit.zoo import load_tokenizer, model_directory
import perf_models as pm
import serve_report
from common import BENCH, Log, command_line, loadavg, machine, rotated, torch_threads
from perf import clean_rounds
from perf_load import Meter, QuietGate
from serve_http import Job, ServerSpec, Streamed, drive, metrics_delta, metrics_sum, scrape, servers

RESULTS = BENCH / "results"
TEXT = BENCH.parent / "data" / "kjv_sample.txt"
VARIANTS = ("a", "b", "c", "d")
ADAPTERS_VERSION = 1  # bump when make_adapters makes different adapters
MIN_CLEAN = 2  # summaries keep the rounds with little other work when at least this many had little


@dataclass(frozen=True)
class Settings:
    """One benchmark run."""

    model: str = "smollm2-135m"  # bundled name or a transformers causal-LM directory (tests: a tiny Llama)
    text: Path = TEXT  # prompts are windows of this text
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    prompt_tokens: int = 64
    max_tokens: int = 32
    concurrency: int = 16
    adapters: int = 32  # (b), (c) and (d)
    requests: int = 64  # per round, (a) and (b) each
    rounds: int = 3
    scaling: tuple[int, ...] = (1, 8, 32, 128)  # adapters registered
    scaling_max_loaded: int = 8
    scaling_requests: int = 24  # per server per round
    scaling_rounds: int = 3
    load_path_cycles: int = 2  # times round the largest scaling count, in-process
    threads: int = 2  # torch threads of every server (OMP_NUM_THREADS) and of PEFT in this process
    request_timeout_s: float = 120.0
    round_timeout_s: float = 600.0
    start_timeout_s: float = 240.0
    spread_s: float | None = None  # clients' first requests spread over this long (None: a request's latency,
    # the median of the warm-up's): requests then arrive spread out as in a steady stream, not in waves
    quiet_budget_s: float = 120.0  # waiting for a quiet machine before runs, at most this long in all (0: never)
    adapter_cache: Path | None = BENCH / ".cache" / "serve"  # adapters made once (None: a temporary folder)
    mode: str = "full"
    label: str = ""
    out: Path = RESULTS / "serve.jsonl"
    plot: Path | None = RESULTS / "serve.png"
    markdown: Path | None = RESULTS / "serve.md"


# --- adapters and prompts ------------------------------------------------------------------------------------
def make_adapters(settings: Settings, count: int, directory: Path) -> list[Path]:
    """`count` adapters a000, a001, ...: rank-r on the targets, B ~ N(0, 0.02) seeded per adapter (so each one
    changes the output), saved with lk.save_adapter. Kept: made again only for other settings or more adapters."""
    folders = [directory / f"a{i:03d}" for i in range(count)]
    recipe = {"model": settings.model, "targets": list(settings.targets), "rank": settings.rank,
              "alpha": settings.alpha, "version": ADAPTERS_VERSION}
    marker = directory / "recipe.json"
    made = json.loads(marker.read_text()) if marker.is_file() else {}
    if made.pop("count", 0) >= count and made == recipe:
        return folders
    shutil.rmtree(directory, ignore_errors=True)
    model = pm.build_base(settings.model)
    for seed, folder in enumerate(folders, start=1):
        pm.add_lorakit(model, settings.targets, settings.rank, settings.alpha, random_b=True, seed=seed)
        lk.save_adapter(model, folder)
        lk.delete_adapter(model, "default")
    marker.write_text(json.dumps({**recipe, "count": count}))
    return folders


def adapter_root(folders: list[Path], directory: Path) -> Path:
    """A folder holding a link to each of `folders`: `lorakit serve --adapter-root` registers exactly them."""
    directory.mkdir(parents=True)
    for folder in folders:
        (directory / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    return directory


def prompts(tokenizer, text: str, tokens: int, count: int) -> list[str]:
    """`count` distinct windows of `text` that the tokenizer reads back (as the server does) as `tokens` tokens."""
    specials = len(tokenizer("")["input_ids"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    width, found = tokens - specials, []
    for start in range(0, len(ids) - width, max(1, width // 2)):
        window = tokenizer.decode(ids[start:start + width])
        if len(tokenizer(window)["input_ids"]) == tokens and window not in found:
            found.append(window)
            if len(found) == count:
                return found
    raise ValueError(f"text: only {len(found)} windows of {tokens} tokens, {count} wanted; give a longer text")


@dataclass(frozen=True)
class Request:
    adapter: str
    prompt: str


# --- PEFT, in this process -----------------------------------------------------------------------------------
class TokenTimes:
    """A `generate` streamer that notes when each step's tokens arrive (generate first hands it the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def load_peft(settings: Settings, folders: list[Path]):
    """The base as PEFT's users load it (transformers' from_pretrained), every adapter in `folders` on it."""
    import peft

    base = pm.load_base(model_directory(settings.model), "float32", "transformers")
    model = peft.PeftModel.from_pretrained(base, folders[0], adapter_name=folders[0].name)
    for folder in folders[1:]:
        model.load_adapter(folder, adapter_name=folder.name)
    return model.eval()


def peft_generate(model, tokenizer, adapter: str, texts: list[str], max_tokens: int) -> list[Streamed]:
    """set_adapter, then one left-padded greedy `generate` of `texts`; a row's tokens count up to its first EOS."""
    sent = time.perf_counter()
    model.set_adapter(adapter)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    streamer = TokenTimes()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                             pad_token_id=tokenizer.pad_token_id)
    eos = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
    records = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        stop = next((i + 1 for i, token in enumerate(row) if token in eos), None)
        tokens = stop or len(row)
        records.append(Streamed(adapter, sent, streamer.times[:tokens], tokens, "stop" if stop else "length"))
    return records


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def peft_sequential(model, tokenizer, requests: list[Request], max_tokens: int) -> list[Streamed]:
    """(c): one request at a time, each with its own set_adapter."""
    return [r for request in requests for r in peft_generate(model, tokenizer, request.adapter, [request.prompt],
                                                             max_tokens)]


def peft_grouped(model, tokenizer, requests: list[Request], max_tokens: int) -> list[Streamed]:
    """(d): the requests grouped by adapter, one batched generate per group."""
    groups: dict[str, list[str]] = {}
    for request in requests:
        groups.setdefault(request.adapter, []).append(request.prompt)
    return [r for adapter, texts in groups.items() for r in peft_generate(model, tokenizer, adapter, texts, max_tokens)]


# --- statistics ----------------------------------------------------------------------------------------------
def run_stats(records: list[Streamed]) -> dict:
    """Throughput of one run (generated tokens / the run's wall time, first send to last token) and its counts."""
    answered = [r for r in records if r.error is None]
    wall = max(r.done for r in records) - min(r.sent for r in records)
    tokens = sum(r.tokens for r in answered)
    return {"requests": len(records), "errors": len(records) - len(answered), "tokens": tokens, "wall_s": wall,
            "throughput": tokens / wall if wall > 0 else 0.0,
            "ran_to_limit": sum(r.finish_reason == "length" for r in answered) / max(1, len(answered))}


def percentiles(values: list[float]) -> dict:
    """p50 and p99 (linear between order statistics) in ms, and how many values."""
    if not values:
        return {"p50": None, "p99": None, "n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        k = q * (len(ordered) - 1)
        low = int(k)
        high = min(low + 1, len(ordered) - 1)
        return 1e3 * (ordered[low] + (ordered[high] - ordered[low]) * (k - low))

    return {"p50": at(0.5), "p99": at(0.99), "n": len(ordered)}


def latency_stats(records: list[Streamed]) -> dict:
    answered = [r for r in records if r.error is None]
    return {"ttft_ms": percentiles([r.ttft for r in answered if r.ttft is not None]),
            "itl_ms": percentiles([g for r in answered for g in r.gaps])}


def used_rounds(*series: list[dict]) -> list[int]:
    """The rounds to summarise: those in which other work stayed under CLEAN_CPUS during every one of the runs
    given (one run per round in each series), or every round if fewer than MIN_CLEAN were."""
    others = [None if any(run["others"] is None for run in runs) else max(run["others"] for run in runs)
              for runs in zip(*series)]
    return clean_rounds(others, minimum=MIN_CLEAN)


def ratio_stats(runs: list[dict], references: list[dict]) -> dict:
    """Throughput of `runs` / `references`: the median of per-round ratios over the rounds used (with their range),
    and the ratio of the best rounds (over all)."""
    used = used_rounds(runs, references)
    ratios = [runs[i]["throughput"] / references[i]["throughput"] for i in used]
    return {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios),
            "best": max(r["throughput"] for r in runs) / max(r["throughput"] for r in references)}


def summarise_runs(runs: list[dict], records: list[list[Streamed]]) -> dict:
    """A configuration over the rounds used: median throughput, latencies over their requests; the best
    throughput, the counts and the other work of every round."""
    used = used_rounds(runs)
    requests = sum(r["requests"] for r in runs)
    return {"throughput": statistics.median(runs[i]["throughput"] for i in used), "used": used,
            "best": max(r["throughput"] for r in runs), "rounds": [r["throughput"] for r in runs],
            "tokens": sum(r["tokens"] for r in runs), "requests": requests, "errors": sum(r["errors"] for r in runs),
            "others": [r["others"] for r in runs],
            "ran_to_limit": sum(r["ran_to_limit"] * r["requests"] for r in runs) / max(1, requests),
            **latency_stats([record for i in used for record in records[i]])}


def log_requests(log: Log, records: list[Streamed], **where) -> None:
    for r in records:
        log("request", **where, adapter=r.model, ttft_ms=None if r.ttft is None else round(1e3 * r.ttft, 2),
            itl_ms=[round(1e3 * g, 2) for g in r.gaps], tokens=r.tokens, finish=r.finish_reason, error=r.error)


# --- the runs -------------------------------------------------------------------------------------------------
def timed(answer: Callable[[], list[Streamed]], gate: QuietGate | None, pids: list[int]) -> tuple[list[Streamed], dict]:
    """One run, after waiting for a quiet machine: its records and run_stats, with the CPUs other work used."""
    if gate is not None:
        gate.wait(pids)
    meter = Meter(pids)
    records = answer()
    return records, {**run_stats(records), "others": meter.others()}


def http(settings: Settings, url: str, jobs: list[Job], spread_s: float) -> list[Streamed]:
    return drive(url, jobs, settings.concurrency, settings.max_tokens, spread_s, settings.request_timeout_s,
                 settings.round_timeout_s)


def answerers(settings: Settings, url: str, model, tokenizer,
              spread_s: float) -> dict[str, Callable[[list[Request]], list[Streamed]]]:
    """(a)-(d), each a function of the requests to answer."""
    return {"a": lambda rs: http(settings, url, [Job(settings.model, r.prompt) for r in rs], spread_s),
            "b": lambda rs: http(settings, url, [Job(r.adapter, r.prompt) for r in rs], spread_s),
            "c": lambda rs: peft_sequential(model, tokenizer, rs, settings.max_tokens),
            "d": lambda rs: peft_grouped(model, tokenizer, rs, settings.max_tokens)}


def warm_up(settings: Settings, url: str, model, tokenizer, requests: list[Request],
            log: Log) -> tuple[dict[str, Callable], float]:
    """Every first call paid and every adapter loaded, untimed: (a) with all clients at once, whose median latency
    is the spread of the timed runs' first requests (unless settings give one), then (b), (c) and (d) once.
    Returns (the answerers, the spread)."""
    warm, stats = timed(lambda: http(settings, url, [Job(settings.model, q.prompt)
                                                     for q in requests[:settings.concurrency]], 0.0), None, [])
    spread = settings.spread_s if settings.spread_s is not None else statistics.median(r.done - r.sent for r in warm)
    log("run", phase="compare", variant="a", round=-1, spread_s=spread, **stats)
    answer = answerers(settings, url, model, tokenizer, spread)
    adapters = list(dict.fromkeys(q.adapter for q in requests))
    for variant, subset in (("b", requests[:len(adapters)]), ("c", requests[:1]),
                            ("d", [q for q in requests if q.adapter == adapters[0]])):
        log("run", phase="compare", variant=variant, round=-1, **timed(lambda: answer[variant](subset), None, [])[1])
    return answer, spread


def compare(settings: Settings, folders: list[Path], pool: list[str], tokenizer, tmp: Path, log: Log,
            gate: QuietGate | None, bar: tqdm) -> dict:
    """(a)-(d) in rotating rounds; {"variants": {name: summary}, "ratios": {"b/a": ..., ...}, "spread_s", ...}."""
    chosen = folders[:settings.adapters]
    names = [f.name for f in chosen]
    requests = [Request(names[i % len(names)], pool[i % len(pool)]) for i in range(settings.requests)]
    slices = [[q for q in requests if names.index(q.adapter) % settings.rounds == r] for r in range(settings.rounds)]
    model = load_peft(settings, chosen)
    spec = ServerSpec("compare", settings.model, adapter_root(chosen, tmp / "compare"), settings.adapters,
                      settings.threads, tmp / "compare.log")
    runs, kept = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    with servers([spec], settings.start_timeout_s) as [server], torch_threads(settings.threads):
        bar.set_description("compare: warm-up")
        answer, spread = warm_up(settings, server.url, model, tokenizer, requests, log)
        for round_ in range(settings.rounds):
            for variant in rotated(list(VARIANTS), round_):
                bar.set_description(f"compare: round {round_ + 1}/{settings.rounds}, ({variant})")
                subset = requests if variant in ("a", "b") else slices[round_]
                records, stats = timed(lambda: answer[variant](subset), gate, [server.pid])
                runs[variant].append(stats)
                kept[variant].append(records)
                log("run", phase="compare", variant=variant, round=round_, **stats)
                log_requests(log, records, phase="compare", variant=variant, round=round_)
                bar.update(1)
    return {"variants": {v: summarise_runs(runs[v], kept[v]) for v in VARIANTS},
            "ratios": {f"{a}/{b}": ratio_stats(runs[a], runs[b])
                       for a, b in (("b", "a"), ("c", "a"), ("d", "a"), ("b", "c"), ("b", "d"), ("d", "c"))},
            "requests": len(requests), "adapters": len(names), "spread_s": spread}


def scaling(settings: Settings, folders: list[Path], pool: list[str], spread_s: float, tmp: Path, log: Log,
            gate: QuietGate | None, bar: tqdm) -> dict:
    """One server per adapter count, --max-loaded scaling_max_loaded, in rotating rounds; per count its summary,
    cache counters and adapter load histogram (from /metrics), and its throughput over the 1-adapter server's."""
    specs = [ServerSpec(f"scale-{n}", settings.model, adapter_root(folders[:n], tmp / f"scale-{n}"),
                        settings.scaling_max_loaded, settings.threads, tmp / f"scale-{n}.log") for n in settings.scaling]
    runs, kept = {n: [] for n in settings.scaling}, {n: [] for n in settings.scaling}
    with servers(specs, settings.start_timeout_s) as started:
        by_count = dict(zip(settings.scaling, started))
        pids = [s.pid for s in started]
        bar.set_description("scaling: warm-up")
        for server in started:  # the base only: the first forwards are paid, no adapter is loaded
            http(settings, server.url, [Job(settings.model, p) for p in pool[:settings.concurrency]], spread_s)
        last = {n: scrape(s.url) for n, s in by_count.items()}
        for round_ in range(settings.scaling_rounds):
            for n in rotated(list(settings.scaling), round_):
                bar.set_description(f"scaling: round {round_ + 1}/{settings.scaling_rounds}, {n} adapters")
                count, offset = settings.scaling_requests, round_ * settings.scaling_requests
                jobs = [Job(folders[(offset + i) % n].name, pool[i % len(pool)]) for i in range(count)]
                records, stats = timed(lambda: http(settings, by_count[n].url, jobs, spread_s), gate, pids)
                now = scrape(by_count[n].url)
                stats["cache"], last[n] = metrics_delta(now, last[n]), now
                runs[n].append(stats)
                kept[n].append(records)
                log("run", phase="scaling", adapters=n, round=round_, **stats)
                log_requests(log, records, phase="scaling", adapters=n, round=round_)
                bar.update(1)
    return {n: scaling_summary(runs[n], kept[n], runs[settings.scaling[0]]) for n in settings.scaling}


def scaling_summary(runs: list[dict], records: list[list[Streamed]], reference: list[dict]) -> dict:
    """summarise_runs, the throughput over the reference's, the cache counters and load histogram over the
    rounds used ("cache") and over all ("cache_all"), and the mean load time of every round."""
    summary = summarise_runs(runs, records)
    return {**summary, "vs_first": ratio_stats(runs, reference),
            "cache": metrics_sum([runs[i]["cache"] for i in summary["used"]]),
            "cache_all": metrics_sum([r["cache"] for r in runs]),
            "round_load_ms": [1e3 * r["cache"]["loads"]["sum"] / r["cache"]["loads"]["count"]
                              if r["cache"]["loads"]["count"] else None for r in runs]}


def load_path(settings: Settings, folders: list[Path]) -> dict:
    """AdapterCache.ensure of each adapter in turn, load_path_cycles times round, through scaling_max_loaded slots
    (every call a miss when there are more adapters than slots): what the server's engine calls on a miss."""
    model = pm.build_base(settings.model)
    cache = lk.AdapterCache(model, capacity=settings.scaling_max_loaded)
    cache.register_many({f.name: f for f in folders})
    seconds, meter = [], Meter()
    with torch_threads(settings.threads):
        for i in range(settings.load_path_cycles * len(folders)):
            start = time.perf_counter()
            cache.ensure([folders[i % len(folders)].name])
            seconds.append(time.perf_counter() - start)
    cycle = len(folders)
    return {"adapters": len(folders), "slots": cache.capacity, "calls": len(seconds), "misses": cache.misses,
            "others": meter.others(),
            "evictions": cache.evictions, "all": percentiles(seconds), "max_ms": 1e3 * max(seconds),
            "mean_ms": 1e3 * statistics.mean(seconds), "first_cycle": percentiles(seconds[:cycle]),
            "last_cycle": percentiles(seconds[-cycle:]), "ms": [round(1e3 * s, 3) for s in seconds]}


def run(settings: Settings, progress: Callable[[str], None] = lambda text: None) -> dict:
    """Adapters, (a)-(d), scaling, the load path; returns {"meta", "run", "compare", "scaling", "load_path"}."""
    log = Log(settings.out, time.strftime("%Y%m%dT%H%M%S"))
    started = time.perf_counter()
    gate = QuietGate(budget_s=settings.quiet_budget_s) if settings.quiet_budget_s > 0 else None
    meta = {"settings": asdict(settings), "machine": machine(), "argv": sys.argv, "mode": settings.mode,
            "label": settings.label}
    log("meta", **meta)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        store = (settings.adapter_cache / f"{Path(settings.model).name}-r{settings.rank}-{'+'.join(settings.targets)}"
                 if settings.adapter_cache else tmp / "adapters")
        progress(f"adapters in {store}")
        folders = make_adapters(settings, max(settings.adapters, *settings.scaling), store)
        tokenizer = load_tokenizer(settings.model)
        tokenizer.padding_side = "left"  # for (d)'s batches; the prompts all have the same length anyway
        pool = prompts(tokenizer, settings.text.read_text(), settings.prompt_tokens,
                       max(settings.requests, settings.scaling_requests, settings.concurrency))
        with tqdm(total=len(VARIANTS) * settings.rounds + len(settings.scaling) * settings.scaling_rounds,
                  unit="run") as bar:
            compared = compare(settings, folders, pool, tokenizer, tmp, log, gate, bar)
            scaled = scaling(settings, folders, pool, compared["spread_s"], tmp, log, gate, bar)
        progress("load path, in process")
        loads = load_path(settings, folders[:max(settings.scaling)])
    meta.update(seconds=time.perf_counter() - started, loadavg_end=loadavg(),
                waited_for_quiet_s=gate.waited_s if gate else 0.0)
    log("summary", compare=compared, scaling=scaled, load_path=loads)
    log("end", seconds=meta["seconds"], loadavg=meta["loadavg_end"], waited_for_quiet_s=meta["waited_for_quiet_s"])
    return {"meta": meta, "run": log.run_id, "compare": compared, "scaling": scaled, "load_path": loads}


# --- command line ---------------------------------------------------------------------------------------------
QUICK = dict(adapters=4, requests=8, concurrency=8, rounds=1, max_tokens=16, scaling=(1, 16), scaling_requests=16,
             scaling_rounds=2, load_path_cycles=1, quiet_budget_s=30.0, mode="quick")


def settings_from(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 adapters, 8 clients, 8 requests of 16 tokens, one round, scaling over 1 "
                             "and 16 adapters; writes serve.jsonl only (not serve.md or serve.png)")
    parser.add_argument("--rounds", type=int, help="timed rounds of (a)-(d) (default: 3)")
    parser.add_argument("--concurrency", type=int, help="clients at once for (a), (b) and scaling (default: 16)")
    parser.add_argument("--threads", type=int, help="torch threads of the servers and of PEFT (default: 2; 1 keeps a "
                                                    "busy 2-core machine from stalling both threads of every op)")
    parser.add_argument("--label", default="", help="free text kept with the run, e.g. what else the machine ran")
    args = parser.parse_args(argv)
    settings = Settings(label=args.label)
    if args.quick:
        settings = replace(settings, **QUICK, plot=None, markdown=None)
    if args.rounds:
        settings = replace(settings, rounds=args.rounds)
    if args.concurrency:
        settings = replace(settings, concurrency=args.concurrency)
    if args.threads:
        settings = replace(settings, threads=args.threads)
    return settings


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (`timeout`, a CI runner) unwinds like Ctrl-C, so the finally blocks stop the servers
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    command_line(sys.argv[1:] if argv is None else argv, "bench-serve", settings_from, run, serve_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
