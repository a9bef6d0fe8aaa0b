"""The runs behind docs/analysis.md: `make analysis` (about 10 minutes on 2 CPU cores).

MiniLM-L6 (real, pretrained) learns the 6-way WordNet supersense task of data/ with LoRA on the
attention query and value projections, as in the LoRA paper: rank 8 (seeds 0 and 1), rank 64
(seed 0), and full fine-tuning for comparison. `lorakit analyze` then compares them; its reports
and figures go to docs/analysis/ (committed), the training runs to out/analysis-runs/ (not).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from lorakit.analysis_report import AnalyzeConfig
from lorakit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
LORA = TrainConfig(model="minilm-l6", data=str(ROOT / "data" / "wordnet_supersenses.jsonl"), task="classify",
                   rank=8, alpha=16, targets=("query", "value"), steps=300, lr=3e-3, warmup=10, batch_size=32,
                   max_length=48, eval_fraction=0.2, eval_every=100, seed=0)
RUNS = {
    "r8-seed0": LORA,
    "r8-seed1": replace(LORA, seed=1),
    "r64-seed0": replace(LORA, rank=64, alpha=128),  # the same scale alpha / r = 2
    "full-seed0": replace(LORA, full=True, lr=5e-5),
    # r8-seed0 as initialised: one step at a negligible learning rate keeps A at its random start (B = 0),
    # to see how far training moved A's subspace from where it began
    "r8-seed0-init": replace(LORA, steps=1, lr=1e-12, warmup=0),
}
# (report folder, analysed run, compared run)
REPORTS = (("ranks", "r8-seed0", "r64-seed0"), ("seeds", "r8-seed0", "r8-seed1"), ("full", "full-seed0", "r8-seed0"),
           ("drift", "r8-seed0", "r8-seed0-init"))


def folder_of(runs: Path, name: str) -> Path:
    return runs / name / ("model" if RUNS[name].full else "adapter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "out" / "analysis-runs", help="training runs go here")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "analysis", help="reports and figures go here")
    parser.add_argument("--retrain", action="store_true", help="train again even if a run's output exists")
    args = parser.parse_args(argv)
    summary = {}
    for name, cfg in RUNS.items():
        if args.retrain or not folder_of(args.runs, name).is_dir():
            print(f"== training {name}", flush=True)
            train(replace(cfg, out=str(args.runs / name)))
        summary[name] = json.loads((args.runs / name / "summary.json").read_text())
    for report, first, second in REPORTS:
        print(f"== analyze {first} vs {second} -> {args.docs / report}", flush=True)
        AnalyzeConfig(adapter=str(folder_of(args.runs, first)), compare=str(folder_of(args.runs, second)),
                      base=LORA.model, out=str(args.docs / report)).run()
    accuracy = {name: (s.get("last_eval") or {}).get("eval_accuracy") for name, s in summary.items()}
    (args.docs / "runs.json").write_text(json.dumps({"accuracy": accuracy, "summaries": summary}, indent=2) + "\n")
    print(json.dumps(accuracy, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
