"""A study's report: report.json (every run's numbers, the cells, the sweep, W0 spectra, the suggestion) and
report.md with its figures, all recomputed from the runs' own summary.json files each time it is written."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from ..io.files import write_text_atomically
from . import figures
from .grid import config_hash
from .results import (Metric, cells, failed_runs, interval, largest_size, metric_for, paired_differences, plan_runs,
                      rank_series, read_records)
from .spec import StudySpec
from .spectra import model_spectra
from .suggest import Suggestion, suggest

SPECTRA_CACHE = "w0_spectra.json"
FIGURES = {"data": "quality_vs_data.png", "gap": "gap_vs_data.png", "params": "quality_vs_params.png",
           "rank": "quality_vs_rank.png", "cost": "cost.png", "spectra": "w0_spectra.png"}


def build_report(spec: StudySpec, out: Path, report_dir: Path | None = None, margin: float | None = None,
                 with_spectra: bool = True, with_figures: bool = True) -> dict:
    """Read every finished run, write report.json, report.md and (unless with_figures=False) the figures to
    `report_dir` (default: `out`); returns report.json's content."""
    out, report_dir = Path(out), Path(report_dir or out)
    report_dir.mkdir(parents=True, exist_ok=True)
    metric = metric_for(spec.train.task)
    runs = plan_runs(spec, out)
    records, sweep = read_records(runs.grid, metric), read_records(runs.sweep, metric)
    grid_cells = cells(records)
    margin = spec.margin if margin is None else margin
    report = {"study": spec.name, "spec": spec.source, "model": spec.train.model, "data": spec.train.data,
              "task": spec.train.task, "metric": metric.name, "higher_is_better": metric.higher_is_better,
              "steps": spec.train.steps, "batch_size": spec.train.batch_size, "lrs": runs.lrs,
              "planned_runs": len({r.key for r in runs.grid + runs.sweep}),
              "finished_runs": len({r["run"] for r in records + sweep}),
              "failed_runs": failed_runs(runs.grid + runs.sweep), "sweep": sweep, "records": records, "cells": grid_cells,
              "spectra": _spectra(spec, out) if with_spectra else None}
    found = suggest(grid_cells, metric, margin)
    reference = spec.arms[0].name
    report["paired"] = {"reference": reference, "differences": paired_differences(records, reference)}
    report["suggestion"] = None if found is None else {"chosen": found.chosen, "best": found.best, "margin": margin}
    written = _figures(report, metric, report_dir) if with_figures else {}
    write_text_atomically(report_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(report_dir / "report.md", markdown(report, metric, found, written))
    return report


def _spectra(spec: StudySpec, out: Path) -> dict:
    """W0 spectra of the study's model over every LoRA arm's targets (cached in `out`, keyed by both)."""
    arms = {a.name: a.targets for a in spec.arms if not a.full}
    key = config_hash({"model": spec.train.model, "arms": arms})
    cache = out / SPECTRA_CACHE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["spectra"]
    found = model_spectra(spec.train.model, arms)
    write_text_atomically(cache, json.dumps({"key": key, "spectra": found}) + "\n")
    return found


def _figures(report: dict, metric: Metric, folder: Path) -> dict[str, str]:
    cs, written = report["cells"], {}
    if not cs:
        return written
    plots = {"params": lambda p: figures.quality_vs_parameters(cs, metric, p), "cost": lambda p: figures.costs(cs, p)}
    if len({c["data_size"] for c in cs}) > 1:
        plots["data"] = lambda p: figures.quality_vs_data(cs, metric, p)
        plots["gap"] = lambda p: figures.quality_vs_data(cs, metric, p, key="gap")
    if rank_series(cs):
        plots["rank"] = lambda p: figures.quality_vs_rank(cs, metric, p)
    if report["spectra"]:
        plots["spectra"] = lambda p: figures.spectra(report["spectra"]["types"], alone_cells(report), metric, p)
    for name, plot in plots.items():
        plot(folder / FIGURES[name])
        written[name] = FIGURES[name]
    return written


# --- markdown ------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]) + "\n"


def _value(cell: dict | None, key: str = "metric", digits: int = 3) -> str:
    if cell is None:
        return "-"
    return f"{cell[key]:.{digits}f} ± {cell[f'{key}_std']:.{digits}f} (n={cell['n']})"


def _setting(cell: dict) -> str:
    return f"{cell['arm']} (full fine-tuning)" if cell["full"] else f"{cell['arm']} r={cell['rank']}"


def _size(size: int) -> str:
    return "all" if size == 0 else str(size)


def markdown(report: dict, metric: Metric, found: Suggestion | None, written: dict[str, str]) -> str:
    """report.md: setup, one section per question, W0 spectra, costs, the suggestion."""
    parts = [_setup(report, metric), _by_data_size(report, metric), _paired(report, metric), _targets(report, metric),
             _ranks(report),
             _spectra_section(report, metric), _costs(report), _suggestion(found)]
    figure_lines = "".join(f"![{name}]({file})\n\n" for name, file in written.items())
    return "\n".join(p for p in parts if p) + ("\n## Figures\n\n" + figure_lines if figure_lines else "")


def _setup(report: dict, metric: Metric) -> str:
    loads = [r["loadavg"][0] for r in report["records"] if r.get("loadavg")]
    load = (f"1-minute load average at the end of each run: median {statistics.median(loads):.1f}, "
            f"max {max(loads):.1f} (on {os.cpu_count()} cores)" if loads else "no load recorded")
    sweep_rows = [[s["arm"], s["rank"] or "-", _size(s["data_size"]), s["seed"], f"{s['lr']:g}",
                   f"{s['metric']:.4f}", "**chosen**" if report["lrs"].get(s["arm"]) == s["lr"] else ""]
                  for s in report["sweep"]]
    before = [r["first_metric"] for r in report["records"] if r.get("first_metric") is not None]
    before_text = f" (before training: {statistics.mean(before):.3f}, mean over runs)" if before else ""
    failed = f"; {len(report['failed_runs'])} failed (diverged)" if report["failed_runs"] else ""
    text = (f"# Study `{report['study']}`: {report['model']} on {report['data']} ({report['task']})\n\n"
            f"Held-out metric: **{metric.name}** ({'higher' if metric.higher_is_better else 'lower'} is better), "
            f"at the end of training{before_text}. Every run gets the same budget of **{report['steps']} optimiser "
            f"steps** of {report['batch_size']} examples (steps, not epochs: a smaller data set is seen more times). "
            f"Means ± sample std (ddof=1) over seeds; n = seeds. Runs finished: {report['finished_runs']} of "
            f"{report['planned_runs']}{failed}.\n\nTimes were measured on a shared machine ({load}): read them as "
            f"indicative.\n\nLearning rates, chosen by held-out {metric.name} in each swept arm's sweep (the others "
            "take a swept arm's rate: `lr_from` in the spec): "
            + ", ".join(f"{arm} {lr:g}" for arm, lr in report["lrs"].items()) + ".\n\n")
    if sweep_rows:
        text += _table(["arm", "rank", "examples", "seed", "lr", metric.name, ""], sweep_rows)
    return text


def _grid(cells: list[dict], key: str, digits: int) -> str:
    sizes = sorted({c["data_size"] for c in cells}, key=lambda s: (s == 0, s))
    settings = {}
    for c in sorted(cells, key=lambda c: (c["full"], c["arm"], c["rank"])):
        settings.setdefault(_setting(c), {})[c["data_size"]] = c
    examples = {c["data_size"]: c["train_examples"] for c in cells}
    header = ["setting"] + [f"{_size(s)} ({examples[s]} ex.)" for s in sizes]
    return _table(header, [[name] + [_value(row.get(s), key, digits) for s in sizes] for name, row in settings.items()])


def _by_data_size(report: dict, metric: Metric) -> str:
    cs = report["cells"]
    if not cs:
        return "## Results\n\nNo finished runs yet.\n"
    return (f"## Q1: LoRA and full fine-tuning by data size\n\nHeld-out {metric.name}:\n\n{_grid(cs, 'metric', 3)}\n"
            f"Train minus held-out {metric.name} (on as many training examples as the held-out set has; "
            f"{'positive' if metric.higher_is_better else 'negative'} = better on the training data){_sample_note(report)}:\n\n"
            f"{_grid(cs, 'gap', 3)}")


def _sample_note(report: dict) -> str:
    first = sum(r["train_sample"] == "first" for r in report["records"])
    if not first:
        return ", a seeded random sample of the run's training examples"
    return (f". In {first} of {len(report['records'])} runs these were the *first* training examples in file order "
            "(as lorakit study measured them then), which is a fair sample of a shuffled file but not of an ordered "
            "one such as a book")


def _targets(report: dict, metric: Metric) -> str:
    cs = [c for c in report["cells"] if c["data_size"] == largest_size(report["cells"])] if report["cells"] else []
    if not cs:
        return ""
    rows = [[_setting(c), ",".join(c["targets"]) or "every weight", f"{c['trainable']:,}", _value(c),
             f"± {interval(c):.3f}"] for c in sorted(cs, key=lambda c: c["trainable"])]
    return (f"## Q2: target sets and trainable parameters (largest data size)\n\n"
            + _table(["setting", "targets", "trainable", f"held-out {metric.name}", "95% CI (1.96 std/sqrt n)"], rows))


def _paired(report: dict, metric: Metric) -> str:
    """Each setting minus the reference arm on the same seed, by data size."""
    diffs = report["paired"]["differences"]
    if not diffs:
        return ""
    sizes = sorted({d["data_size"] for d in diffs}, key=lambda s: (s == 0, s))
    rows: dict[str, dict] = {}
    for d in sorted(diffs, key=lambda d: (d["full"], d["arm"], d["rank"])):
        rows.setdefault(_setting(d), {})[d["data_size"]] = d
    return (f"### Paired by seed: minus `{report['paired']['reference']}` on the same seed\n\nThe same seed means "
            f"the same held-out split and training subset, so this difference of held-out {metric.name} is free of "
            "the split's own variation, which can be much of the spread between seeds above:\n\n"
            + _table(["setting"] + [f"{_size(s)} examples" for s in sizes],
                     [[name] + [_difference(row.get(s)) for s in sizes] for name, row in rows.items()]))


def _difference(d: dict | None) -> str:
    return "-" if d is None else f"{d['difference']:+.3f} ± {d['difference_std']:.3f} (n={d['n']})"


def _ranks(report: dict) -> str:
    series = rank_series(report["cells"])
    sets = sorted({targets for targets, _ in series})
    sections = []
    for targets in sets:
        sizes = sorted((size for t, size in series if t == targets), key=lambda s: (s == 0, s))
        at = {(c["rank"], size): c for size in sizes for c in series[(targets, size)]}
        ranks = sorted({rank for rank, _ in at})
        arms = sorted({c["arm"] for c in at.values()})
        rows = [[r] + [_value(at.get((r, s))) for s in sizes] + [f"{at[(r, sizes[-1])]['trainable']:,}"
                                                                 if (r, sizes[-1]) in at else "-"] for r in ranks]
        sections.append(f"### {targets} (arms {', '.join(arms)})\n\n"
                        + _table(["rank"] + [f"{_size(s)} examples" for s in sizes] + ["trainable"], rows))
    return "## Q3: rank by data size\n\n" + "\n".join(sections) if sections else ""


def alone_cells(report: dict) -> dict[str, dict]:
    """layer type -> the cell (largest data size) of an arm that adapts that type and nothing else."""
    found = report.get("spectra")
    if not found or not report["cells"]:
        return {}
    at_most = {c["arm"]: c for c in report["cells"] if c["data_size"] == largest_size(report["cells"])}
    return {types[0]: at_most[arm] for arm, types in found["arms"].items() if len(types) == 1 and arm in at_most}


def _spectra_section(report: dict, metric: Metric) -> str:
    found = report.get("spectra")
    if not found:
        return ""
    alone = alone_cells(report)
    rows = [[kind, "x".join(map(str, s["shape"])), f"{s['effective_rank']:.0f} ({s['effective_rank_share']:.2f})",
             f"{s['energy_rank_90']:.0f} ({s['energy_rank_share']:.2f})",
             f"{alone[kind]['arm']} r={alone[kind]['rank']}: {_value(alone[kind])}" if kind in alone else "-"]
            for kind, s in found["types"].items()]
    return ("## W0: the pretrained weights' own rank, by layer type\n\nEffective rank (exp of the entropy of the "
            "normalised singular values) and the 90%-energy rank of W0, mean over blocks (share of min(d_out, d_in) "
            f"in brackets), beside the held-out {metric.name} of arms that adapt only that type (largest data size):\n\n"
            + _table(["layer type", "shape", "effective rank", "90%-energy rank", f"adapting only it: {metric.name}"], rows))


def _costs(report: dict) -> str:
    cs = [c for c in report["cells"] if c["data_size"] == largest_size(report["cells"])] if report["cells"] else []
    if not cs:
        return ""
    rows = [[_setting(c), f"{c['seconds']:.1f} ± {c['seconds_std']:.1f}", f"{c['peak_rss_bytes_min'] / 2 ** 20:.0f}",
             f"{c['peak_rss_bytes'] / 2 ** 20:.0f}", f"{c['saved_bytes'] / 1e6:.3f}"]
            for c in sorted(cs, key=lambda c: c["trainable"])]
    return ("## Cost per run (largest data size; shared machine)\n\nPeak RSS is the worker process's during the run "
            "(its mark reset at the start); a worker runs one run after another, so it includes what earlier runs "
            "left allocated: the lowest over seeds is the better estimate.\n\n"
            + _table(["setting", "seconds (training)", "peak RSS, lowest (MiB)", "peak RSS, mean (MiB)",
                      "saved adapter / model (MB)"], rows))


def _suggestion(found: Suggestion | None) -> str:
    if found is None:
        return ""
    rows = [[_setting(c), f"{c['trainable']:,}", _value(c, digits=4), "yes" if found.within(c) else "no",
             "**chosen**" if c is found.chosen else ("best" if c is found.best else "")] for c in found.candidates]
    return (f"## Suggestion\n\nThe smallest setting (fewest trainable parameters) whose mean held-out "
            f"{found.metric.name} is within {found.margin:g} of the best: **{_setting(found.chosen)}** "
            f"(targets {','.join(found.chosen['targets'])}, {found.chosen['trainable']:,} trainable parameters; "
            f"best: {_setting(found.best)}).\n\n"
            + _table(["setting", "trainable", f"held-out {found.metric.name}", "within margin", ""], rows))
