"""Running a study: its runs in `jobs` worker processes (each imports torch and transformers once, and resets
its peak-RSS mark before every run, so each run's peak is its own), finished runs never redone, half-done ones
restarted cleanly, every event in the study's JSONL log."""
from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.utils import logging

from ..errors import LoraError
from ..io.files import write_text_atomically
from ..training.batches import padding_id
from ..training.checkpoint import CHECKPOINTS
from ..training.datasets import load_dataset, sample_dataset, split_dataset
from ..training.train import evaluate, train
from ..zoo import load_tokenizer
from .grid import Run
from .results import RUN_RECORD, StudyRuns, is_finished, plan_runs
from .spec import StudySpec

LOG_FILE = "study.jsonl"
LOCK_FILE = "study.lock"


class StudyLog:
    """The study's JSONL log: one object per event, with the time; appended, so a resumed study's log goes on."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")


def run_study(spec: StudySpec, out: Path, jobs: int | None = None, progress: bool = True,
              threads: int | None = None) -> StudyRuns:
    """Train every run of `spec` that is not finished: the learning-rate sweep, then the grid; `jobs` runs at
    a time (default: one per core), each with `threads` torch threads (default: cores / jobs)."""
    out = Path(out)
    jobs = jobs or os.cpu_count() or 1
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    log = StudyLog(out / LOG_FILE)
    with _only_study(out), _workers(jobs, threads) as pool:
        log.write("study_start", spec=spec.source, name=spec.name, jobs=jobs, threads=threads, pid=os.getpid())
        run_all(plan_runs(spec, out).sweep, pool, log, progress, "sweep")
        runs = plan_runs(spec, out)
        log.write("lrs_chosen", lrs=runs.lrs)
        run_all(runs.grid, pool, log, progress, "grid")
    log.write("study_done", runs=len(runs.sweep) + len(runs.grid))
    return runs


@contextmanager
def _only_study(out: Path):
    """Hold the study folder's lock: two studies on one folder would train the same runs at once."""
    with open(out / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoraError(f"out={str(out)!r}: another lorakit study is running on this folder; wait for it to "
                            "end (or stop it), then run again to resume") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _workers(jobs: int, threads: int):
    """A pool of `jobs` worker processes; for one job, None: the runs go in this process (its threads and
    transformers' verbosity restored after)."""
    if jobs > 1:
        context = multiprocessing.get_context("forkserver")  # workers start clean: no threads forked mid-use
        context.set_forkserver_preload(["lorakit.training.train"])
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                                 initargs=(threads,)) as pool:
            yield pool
        return
    before = torch.get_num_threads(), logging.get_verbosity()
    _start_worker(threads)
    try:
        yield None
    finally:
        torch.set_num_threads(before[0])
        logging.set_verbosity(before[1])


def run_all(runs: list[Run], pool: ProcessPoolExecutor | None, log: StudyLog, progress: bool, phase: str) -> None:
    """The unfinished ones of `runs` (each once, in order) on the pool's workers, or here without a pool."""
    pending = []
    for run in {run.key: run for run in runs}.values():  # the sweep's best run may be a grid run too: once
        if is_finished(run):
            log.write("run_skip", run=run.name, phase=phase, reason="finished")
        else:
            pending.append(run)
    if not pending:
        return
    bar = tqdm(total=len(pending), desc=f"study {phase}", disable=not progress, dynamic_ncols=True)
    running = {}
    for run in pending:
        log.write("run_queued", run=run.name, phase=phase)
        if pool is None:  # here and now: logged as soon as it ends
            _log_outcome(log, run, phase, _here(run))
            bar.update(1)
            continue
        running[pool.submit(execute, run)] = run
    broken = False
    while running:
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in done:
            _log_outcome(log, running.pop(future), phase, future)
            broken = broken or isinstance(future.exception(), BrokenProcessPool)
            bar.update(1)
    bar.close()
    if broken:  # a worker died (e.g. killed for memory): the pool runs nothing more
        log.write("study_stopped", reason="a worker process died")
        raise LoraError("a worker process of the study died (the system may have killed it for memory); the "
                        "runs it held are logged as run_crash. Run the study again to resume, with fewer --jobs "
                        "if memory is short")


def _here(run: Run) -> Future:
    future = Future()
    try:
        future.set_result(execute(run))
    except Exception as error:  # noqa: BLE001 - reported like a worker's: logged as run_crash, the study goes on
        future.set_exception(error)
    return future


def _log_outcome(log: StudyLog, run: Run, phase: str, future) -> None:
    error = future.exception()
    if error is not None:
        log.write("run_crash", run=run.name, phase=phase, error=f"{type(error).__name__}: {error}")
        return
    record = future.result()
    event = "run_failed" if record.get("error") else "run_done"
    log.write(event, run=run.name, phase=phase, **{k: record[k] for k in ("seconds", "loadavg", "error")
                                                   if k in record})


# --- in the worker process -------------------------------------------------------------------------------
def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.set_verbosity_error()  # no per-run load reports and bars from transformers
    logging.disable_progress_bar()


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM, and so getrusage's ru_maxrss) to its current RSS (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss() -> int | None:
    """This process's resident set size now (Linux), or None."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def execute(run: Run) -> dict:
    """Train `run` from scratch (a half-done folder is removed first), score its training examples, and write
    the study's record of it last: with summary.json, it marks the run finished."""
    if run.folder.exists():
        shutil.rmtree(run.folder)
    record = {"config_hash": run.key, "threads": torch.get_num_threads(), "peak_rss_reset": reset_peak_rss(),
              "rss_start_bytes": _rss(), "loadavg_start": os.getloadavg()}
    started = time.perf_counter()
    try:
        result = train(run.config)
        record.update(training_set_eval(run, result.model))
        shutil.rmtree(run.folder / CHECKPOINTS, ignore_errors=True)  # a study restarts a run, never resumes it
    except LoraError as error:  # e.g. diverged at a sweep's largest rate: a result, recorded and not retried
        record["error"] = str(error)
    record.update(seconds=time.perf_counter() - started, loadavg=os.getloadavg())
    run.folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run.folder / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    return record


def training_set_eval(run: Run, model) -> dict:
    """The metric on a seeded random sample of the run's own training examples (as many as the held-out set
    has, at most; a file in some order, e.g. a book, would bias its first ones): with the held-out metric, the
    train/held-out gap."""
    cfg = run.config
    tokenizer = load_tokenizer(cfg.model)
    data = load_dataset(cfg.data, cfg.task, tokenizer, cfg.max_length)
    train_data, eval_data = split_dataset(data, cfg.eval_fraction, cfg.seed)
    train_data = sample_dataset(train_data, cfg.train_examples, cfg.seed)
    scored_part = sample_dataset(train_data, min(len(train_data.examples), max(1, len(eval_data.examples))), cfg.seed)
    scored = evaluate(model, scored_part.examples, cfg.task, padding_id(tokenizer), cfg.batch_size)
    return {"train_eval": scored, "train_examples": len(train_data.examples),
            "train_eval_examples": len(scored_part.examples), "train_eval_sample": "random"}
