"""`lorakit study`: its options (a spec file, or flags that make one) and what it runs and prints."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.targets import split_names
from ..errors import LoraError
from ..study.report import build_report
from ..study.runner import run_study
from ..study.spec import load_spec, spec_from_dict
from ..training.datasets import TASKS
from .options import existing_file

EXAMPLE = "lorakit study docs/study/minilm.toml --out out/study/minilm --jobs 2"


def add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", type=existing_file, metavar="SPEC",
                        help="study spec (.toml, .yaml or .json; see docs/study.md); without it, the flags below")
    parser.add_argument("--out", required=True, help="folder for the runs (runs/), the study log and the report")
    parser.add_argument("--report-dir", help="where report.md, report.json and the figures go (default: --out)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="runs in parallel, each in its own process with cores/N threads (default: the cores)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads per run (default: cores / --jobs); 1 is best on a busy machine")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps, two of each list, one seed")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    parser.add_argument("--suggest", action="store_true",
                        help="print the smallest rank and target set within --margin of the best held-out result")
    parser.add_argument("--margin", type=float, default=None, metavar="X",
                        help="--suggest's margin in the metric's units, e.g. 0.01 accuracy (default: the spec's, 0.01)")
    flags = parser.add_argument_group("a study from flags (without SPEC)")
    flags.add_argument("--model", help="bundled model name or transformers model directory")
    flags.add_argument("--data", type=existing_file, help="training data, as lorakit train reads it")
    flags.add_argument("--task", choices=TASKS, default="causal-lm")
    flags.add_argument("--target-set", action="append", default=[], metavar="NAME=T1,T2",
                       help="a LoRA arm adapting these modules (repeatable; default: the model's attention "
                            "defaults and all-linear)")
    flags.add_argument("--ranks", default="1,2,4,8,16", metavar="R,...", help="ranks (default: %(default)s)")
    flags.add_argument("--lrs", default="3e-4,1e-3,3e-3", metavar="LR,...", help="learning rates each set tries")
    flags.add_argument("--seeds", default="0,1,2", metavar="S,...", help="seeds (default: %(default)s)")
    flags.add_argument("--steps", type=int, default=100, metavar="N", help="optimiser steps per run")


def flag_spec(args: argparse.Namespace) -> dict:
    """The spec dict the flags describe."""
    if not args.model or not args.data:
        raise LoraError("spec: give a spec file, or --model and --data (with --task) for a study from flags")
    sets = [text.partition("=") for text in args.target_set] or [("default", "=", ""), ("all-linear", "=", "all-linear")]
    numbers = {name: [kind(v) for v in split_names(getattr(args, name))] for name, kind in
               (("ranks", int), ("lrs", float), ("seeds", int))}
    arms = [{"name": name, "targets": list(split_names(targets)), "ranks": numbers["ranks"], "lrs": numbers["lrs"],
             **({"sweep_rank": 8} if 8 in numbers["ranks"] else {})} for name, _, targets in sets]
    return {"name": Path(args.out).name, "seeds": numbers["seeds"], "arms": arms,
            "train": {"model": args.model, "data": args.data, "task": args.task, "steps": args.steps}}


def run_study_command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec) if args.spec else spec_from_dict(flag_spec(args), source="flags")
    if args.quick:
        spec = spec.quick()
    if not args.report_only:
        run_study(spec, Path(args.out), args.jobs, threads=args.threads)
    report = build_report(spec, Path(args.out), Path(args.report_dir or args.out), args.margin)
    where = Path(args.report_dir or args.out)
    print(f"{report['finished_runs']} of {report['planned_runs']} runs finished; report: {where / 'report.md'}")
    if args.suggest:
        print(suggestion_text(report))
    return 0


def suggestion_text(report: dict) -> str:
    found = report["suggestion"]
    if found is None:
        return "suggest: no finished LoRA runs"
    chosen, best = found["chosen"], found["best"]
    lines = [f"suggest: {chosen['arm']} r={chosen['rank']} (targets {','.join(chosen['targets']) or 'default'}, "
             f"{chosen['trainable']:,} trainable): held-out {report['metric']} {chosen['metric']:.4f}, within "
             f"{found['margin']:g} of the best, {best['arm']} r={best['rank']} at {best['metric']:.4f}",
             "evidence (also in report.md):"]
    for c in sorted((c for c in report["cells"] if not c["full"] and c["data_size"] == chosen["data_size"]),
                    key=lambda c: (c["trainable"], c["rank"])):
        lines.append(f"  {c['arm']:>12} r={c['rank']:<3} {c['trainable']:>10,}  {c['metric']:.4f} ± "
                     f"{c['metric_std']:.4f} (n={c['n']})")
    return "\n".join(lines)
