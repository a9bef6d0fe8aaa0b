"""`lorakit serve` seen from outside, for bench/serve.py: server processes, streaming clients, /metrics.

    with servers([ServerSpec("base", "smollm2-135m", root, max_loaded=32)]) as [server]:
        records = drive(server.url, jobs, concurrency=16, max_tokens=32)   # one Streamed per job

A server is `python -m lorakit serve` on 127.0.0.1 at a free port, this checkout's lorakit first on
its path; it is ready when GET /health answers, and always stopped (SIGTERM, then SIGKILL) on the way
out; on Linux the kernel also sends it SIGTERM should the benchmark's process die first.

Clients are the official `openai` client, streaming, each timed from just before its request is sent:
time to first token (TTFT) at the first chunk with text, inter-token latency (ITL) the gaps between
text chunks, the tokens counted by the server's usage chunk.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from common import BENCH

STOP_WAIT_S = 20.0  # after SIGTERM, how long a server may take to drain before SIGKILL
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class ServerSpec:
    """One `lorakit serve`: every adapter folder under `root` registered, `max_loaded` of them resident."""

    name: str
    model: str
    root: Path
    max_loaded: int
    threads: int = 2
    log: Path | None = None  # the server's stdout and stderr (None: discarded)


@dataclass
class Server:
    spec: ServerSpec
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(spec: ServerSpec) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "lorakit", "serve", "--model", spec.model, "--adapter-root", str(spec.root),
               "--max-loaded", str(spec.max_loaded), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(spec.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = open(spec.log, "w") if spec.log else subprocess.DEVNULL
    try:
        process = subprocess.Popen(command, cwd=BENCH.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    finally:
        if spec.log:
            out.close()  # the child holds its own descriptor
    return Server(spec, process, port)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), so no server outlives a
    benchmark that was killed."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_ready(server: Server, timeout_s: float) -> None:
    """Poll GET /health until it answers 200; RuntimeError (with the log's tail) if the server exits or is late."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if server.process.poll() is not None:
            code = server.process.returncode
            raise RuntimeError(f"server {server.spec.name} exited with {code}:\n{log_tail(server)}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server {server.spec.name} not ready after {timeout_s:.0f} s:\n{log_tail(server)}")


def stop(started: list[Server]) -> None:
    """SIGTERM to each (a server finishes what is in flight), then SIGKILL to any still there after STOP_WAIT_S."""
    running = [s for s in started if s.process.poll() is None]
    for server in running:
        server.process.send_signal(signal.SIGTERM)
    deadline = time.perf_counter() + STOP_WAIT_S
    for server in running:
        try:
            server.process.wait(max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def log_tail(server: Server, lines: int = 30) -> str:
    if server.spec.log is None or not server.spec.log.exists():
        return "(no log kept)"
    return "\n".join(server.spec.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def servers(specs: list[ServerSpec], timeout_s: float = 180.0) -> Iterator[list[Server]]:
    """Start every server at once (they load in parallel), wait until all are ready; stop all on the way out."""
    started: list[Server] = []
    try:
        for spec in specs:
            started.append(start(spec))
        deadline = time.perf_counter() + timeout_s
        for server in started:
            wait_ready(server, max(1.0, deadline - time.perf_counter()))
        yield started
    finally:
        stop(started)


# --- streaming clients ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One request: the `model` it names (an adapter or the base) and its prompt."""

    model: str
    prompt: str


@dataclass
class Streamed:
    """One request as its client saw it; times are time.perf_counter() seconds."""

    model: str
    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with text
    tokens: int = 0  # completion tokens, from the usage chunk
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def done(self) -> float:
        return self.chunks[-1] if self.chunks else self.sent


async def _one(client, job: Job, max_tokens: int) -> Streamed:
    record = Streamed(job.model, time.perf_counter())
    try:
        stream = await client.completions.create(model=job.model, prompt=job.prompt, max_tokens=max_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].text:
                    record.chunks.append(time.perf_counter())
                record.finish_reason = chunk.choices[0].finish_reason or record.finish_reason
            if chunk.usage is not None:
                record.tokens = chunk.usage.completion_tokens
    except Exception as err:  # recorded and counted; the run goes on
        record.error = f"{type(err).__name__}: {err}"
    return record


async def _drive(url: str, jobs: list[Job], concurrency: int, max_tokens: int, spread_s: float,
                 request_timeout_s: float, timeout_s: float) -> list[Streamed]:
    from openai import AsyncOpenAI

    pending = iter(jobs)  # shared by the clients: each takes the next job when its last one is answered
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=request_timeout_s) as client:
        async def client_loop(k: int) -> list[Streamed]:
            await asyncio.sleep(k * spread_s / concurrency)
            return [await _one(client, job, max_tokens) for job in pending]

        done = await asyncio.wait_for(asyncio.gather(*(client_loop(k) for k in range(concurrency))), timeout_s)
    return sorted((r for records in done for r in records), key=lambda r: r.sent)


def drive(url: str, jobs: list[Job], concurrency: int, max_tokens: int, spread_s: float = 0.0,
          request_timeout_s: float = 120.0, timeout_s: float = 600.0) -> list[Streamed]:
    """Every job, `concurrency` clients at a time (closed loop: a client sends its next request when its
    last one ends), all streaming; the records in the order they were sent. The clients' first requests
    are spread evenly over `spread_s` seconds (0: all at once)."""
    return asyncio.run(_drive(url, jobs, concurrency, max_tokens, spread_s, request_timeout_s, timeout_s))


# --- /metrics -------------------------------------------------------------------------------------------------
def scrape(url: str) -> dict:
    """The adapter cache's counters and the load-time histogram: {"misses", "hits", "evictions", "loads":
    {"count", "sum", "buckets": [(upper bound s, cumulative count), ...]}}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {"misses": 0.0, "hits": 0.0, "evictions": 0.0, "loads": {"count": 0.0, "sum": 0.0, "buckets": []}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("lorakit_adapter_cache_") and sample.name.endswith("_total"):
                found[sample.name.removeprefix("lorakit_adapter_cache_").removesuffix("_total")] = sample.value
            elif sample.name == "lorakit_adapter_load_seconds_bucket":
                found["loads"]["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name in ("lorakit_adapter_load_seconds_count", "lorakit_adapter_load_seconds_sum"):
                found["loads"][sample.name.rsplit("_", 1)[1]] = sample.value
    return found


def metrics_delta(after: dict, before: dict) -> dict:
    """What happened between two scrapes (counters and histogram buckets subtracted)."""
    earlier = dict(before["loads"]["buckets"])
    loads = {"count": after["loads"]["count"] - before["loads"]["count"],
             "sum": after["loads"]["sum"] - before["loads"]["sum"],
             "buckets": [(le, n - earlier.get(le, 0.0)) for le, n in after["loads"]["buckets"]]}
    return {**{k: after[k] - before[k] for k in ("misses", "hits", "evictions")}, "loads": loads}


def metrics_sum(deltas: list[dict]) -> dict:
    """The metrics_delta's of several spans added up."""
    bounds = dict.fromkeys(le for d in deltas for le, _ in d["loads"]["buckets"])
    buckets = [(le, sum(dict(d["loads"]["buckets"]).get(le, 0.0) for d in deltas)) for le in bounds]
    return {**{k: sum(d[k] for d in deltas) for k in ("misses", "hits", "evictions")},
            "loads": {"count": sum(d["loads"]["count"] for d in deltas), "sum": sum(d["loads"]["sum"] for d in deltas),
                      "buckets": buckets}}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket holding the q-th observation (None: empty);
    at most the largest finite bound."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = upper, cumulative
    return lower


def histogram_max(buckets: list[tuple[float, float]]) -> float | None:
    """The smallest bucket bound that holds every observation (an upper bound on the largest one)."""
    total = buckets[-1][1] if buckets else 0.0
    return next((upper for upper, cumulative in buckets if cumulative >= total), None) if total > 0 else None


def load_stats(loads: dict, limit_s: float = 0.01) -> dict:
    """A load-time histogram in ms: count, mean (exact), p50 and p99 (interpolated), the bucket bound holding the
    largest load, and the share of loads within `limit_s` (exact when it is a bucket bound; None: no loads)."""
    count, buckets = loads["count"], loads["buckets"]
    if count <= 0:
        return {"count": 0, "mean_ms": None, "p50_ms": None, "p99_ms": None, "max_le_ms": None, "share_within": None}
    within = max((n for le, n in buckets if le <= limit_s + 1e-12), default=0.0)
    return {"count": count, "mean_ms": 1e3 * loads["sum"] / count, "p50_ms": 1e3 * histogram_quantile(0.5, buckets),
            "p99_ms": 1e3 * histogram_quantile(0.99, buckets), "max_le_ms": 1e3 * histogram_max(buckets),
            "share_within": within / count}
