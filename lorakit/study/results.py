"""A study's results, read back from its runs' own files: which runs are finished, the learning rates their
sweep chose, one record per finished run (summary.json and the study's run record), and cells: the mean and
spread over seeds of runs that differ only in their seed."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..training.train import SUMMARY_FILE
from .grid import Run, choose_lrs, config_hash, grid_runs, sweep_runs
from .spec import StudySpec

RUN_RECORD = "study_run.json"  # written by the runner after summary.json: the training-set metric, load


@dataclass(frozen=True)
class Metric:
    """The held-out number a study compares runs by."""

    key: str  # in summary.json's evals: eval_accuracy or eval_perplexity
    name: str
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


METRICS = {"classify": Metric("eval_accuracy", "accuracy", True),
           "causal-lm": Metric("eval_perplexity", "perplexity", False)}


def metric_for(task: str) -> Metric:
    return METRICS[task]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_finished(run: Run) -> bool:
    """Whether the run's folder holds a whole run of this very config: the study's record naming the config's
    hash, and summary.json of the same config (or, for a run that failed, e.g. diverged, the error)."""
    record = _json(run.folder / RUN_RECORD)
    if record is None or record.get("config_hash") != run.key:
        return False
    summary = _json(run.folder / SUMMARY_FILE)
    return bool(record.get("error")) or (summary is not None and config_hash(summary.get("config", {})) == run.key)


def failed(run: Run) -> str | None:
    """A finished run's error, if it failed."""
    record = _json(run.folder / RUN_RECORD) or {}
    return record.get("error") if record.get("config_hash") == run.key else None


@dataclass(frozen=True)
class StudyRuns:
    """The runs of a study as the spec and its sweep's results define them."""

    sweep: list[Run]
    grid: list[Run]
    lrs: dict[str, float]


def plan_runs(spec: StudySpec, out: Path) -> StudyRuns:
    """The sweep, the learning rates its finished runs choose, and the grid at those rates (an arm whose sweep
    has no finished run yet keeps its first rate: a partial study's report says so)."""
    metric = metric_for(spec.train.task)
    sweep = sweep_runs(spec, out)
    scores: dict[str, dict[float, float]] = {}
    for run in sweep:
        score = sweep_score(run, metric)
        if score is not None:
            scores.setdefault(run.arm, {})[run.lr] = score
    for arm in spec.arms:
        scores.setdefault(arm.name, {arm.lrs[0]: 0.0})
    lrs = choose_lrs(spec, scores, metric.higher_is_better)
    return StudyRuns(sweep, grid_runs(spec, lrs, out), lrs)


def sweep_score(run: Run, metric: Metric) -> float | None:
    """The run's held-out metric; a run that failed (diverged) scores worst; None if not finished."""
    if not is_finished(run):
        return None
    if failed(run):
        return -float("inf") if metric.higher_is_better else float("inf")
    return _json(run.folder / SUMMARY_FILE)["last_eval"][metric.key]


def failed_runs(runs: list[Run]) -> list[dict]:
    """The finished runs that ended in an error (e.g. diverged), with it."""
    return [{"run": run.name, "error": failed(run)} for run in runs if is_finished(run) and failed(run)]


def read_record(run: Run, metric: Metric) -> dict:
    """One flat record of a finished run, every number from its own files."""
    summary = json.loads((run.folder / SUMMARY_FILE).read_text())
    extra = json.loads((run.folder / RUN_RECORD).read_text())
    value = summary["last_eval"][metric.key]
    train_value = extra["train_eval"][metric.key]
    return {"run": run.name, "arm": run.arm, "full": run.config.full, "rank": run.rank,
            "targets": list(run.config.lora.targets) if not run.config.full else [],
            "data_size": run.data_size, "train_examples": extra["train_examples"], "lr": run.lr, "seed": run.seed,
            "metric": value, "train_metric": train_value, "gap": train_value - value,
            "first_metric": summary["first_eval"].get(metric.key),
            "trainable": summary["trainable_parameters"], "seconds": summary["seconds"],
            "peak_rss_bytes": summary["peak_memory_bytes"], "saved_bytes": summary["saved_bytes"],
            "loadavg": extra.get("loadavg"),
            "train_sample": extra.get("train_eval_sample", "first")}  # "first": lorakit before 781e38f


def read_records(runs: list[Run], metric: Metric) -> list[dict]:
    """A record of each finished run that did not fail."""
    return [read_record(run, metric) for run in runs if is_finished(run) and not failed(run)]


CELL_KEYS = ("arm", "rank", "data_size", "lr")
SPREAD_OF = ("metric", "train_metric", "gap", "seconds", "peak_rss_bytes")


def cells(records: list[dict]) -> list[dict]:
    """Records grouped by everything but the seed: n, seeds, and mean / std (sample, ddof=1; 0 for one seed)
    of the metric, train metric, gap, time and memory (and the lowest peak RSS: a worker's peak includes what
    its earlier runs left allocated); trainable parameters and adapter size are the same for every seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in CELL_KEYS), []).append(r)
    out = []
    for key, members in groups.items():
        cell = dict(zip(CELL_KEYS, key), full=members[0]["full"], targets=members[0]["targets"],
                    n=len(members), seeds=sorted(m["seed"] for m in members),
                    trainable=members[0]["trainable"], saved_bytes=members[0]["saved_bytes"],
                    train_examples=members[0]["train_examples"])
        for name in SPREAD_OF:
            values = np.array([m[name] for m in members], dtype=float)
            cell[name] = float(values.mean())
            cell[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        cell["peak_rss_bytes_min"] = min(m["peak_rss_bytes"] for m in members)
        out.append(cell)
    return out


def interval(cell: dict, name: str = "metric") -> float:
    """Half-width of a rough 95% interval of the mean: 1.96 std / sqrt(n) (normal, not t: say so)."""
    return 1.96 * cell[f"{name}_std"] / math.sqrt(cell["n"]) if cell["n"] > 1 else 0.0


def largest_size(cells: list[dict]) -> int:
    """The largest data size among the cells (0, meaning all examples, is the largest)."""
    sizes = {c["data_size"] for c in cells}
    return 0 if 0 in sizes else max(sizes)


def rank_series(cells: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """(target set, data size) -> its LoRA cells by rank at one learning rate, for target sets run at more than
    one rank (arms with the same targets and learning rate, e.g. "qv" and "qv-ranks", are one series; a cell
    at another rate, e.g. a rank with its own sweep, is left out of it)."""
    groups: dict[tuple[str, int, float], list[dict]] = {}
    for c in cells:
        if not c["full"]:
            groups.setdefault((",".join(c["targets"]), c["data_size"], c["lr"]), []).append(c)
    series: dict[tuple[str, int], list[dict]] = {}
    for (targets, size, _), members in sorted(groups.items(), key=lambda kv: -len(kv[1])):  # the longest
        if len({c["rank"] for c in members}) > 1 and (targets, size) not in series:
            series[(targets, size)] = sorted(members, key=lambda c: c["rank"])
    return series


def paired_differences(records: list[dict], reference: str) -> list[dict]:
    """Per setting and data size: its metric minus the `reference` arm's on the same seed and data size (the
    same held-out split and training subset), mean and std (ddof=1) over the seeds both have. Paired, the
    split's own variation (often most of the spread between seeds) cancels."""
    base = {(r["data_size"], r["seed"]): r["metric"] for r in records if r["arm"] == reference}
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r["arm"] != reference and (r["data_size"], r["seed"]) in base:
            key = (r["arm"], r["rank"], r["full"], r["data_size"])
            groups.setdefault(key, []).append(r["metric"] - base[(r["data_size"], r["seed"])])
    out = []
    for (arm, rank, full, size), values in groups.items():
        values = np.array(values)
        out.append({"arm": arm, "rank": rank, "full": full, "data_size": size, "n": len(values),
                    "difference": float(values.mean()),
                    "difference_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0})
    return out
