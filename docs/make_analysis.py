"""The runs behind docs/analysis.md: `make analysis` (about 30 minutes on 2 CPU cores).

Two real pretrained models, LoRA on the attention query and value projections as in the LoRA paper:
- minilm: MiniLM-L6 learns the 6-way WordNet supersense task of data/ (classification);
- smollm2: SmolLM2-135M learns King James English from data/kjv_sample.txt (language modelling).
Each: rank 8 (seeds 0 and 1), rank 64 (seed 0, the same alpha / r), full fine-tuning, and rank 8
seed 0 as initialised. `lorakit analyze` then compares them; reports and figures go to
docs/analysis/<experiment>/ (committed), the training runs to out/analysis-runs/ (not).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from lorakit.analysis.report import AnalyzeConfig
from lorakit.core.config import LoraConfig
from lorakit.core.targets import split_names
from lorakit.training.config import TrainConfig
from lorakit.training.train import train

ROOT = Path(__file__).resolve().parent.parent
BASES = {
    "minilm": TrainConfig(model="minilm-l6", data=str(ROOT / "data" / "wordnet_supersenses.jsonl"), task="classify",
                          lora=LoraConfig(rank=8, alpha=16, targets=("query", "value")), steps=300, lr=3e-3,
                          warmup=10, batch_size=32, max_length=48, eval_fraction=0.2, eval_every=100, seed=0),
    "smollm2": TrainConfig(model="smollm2-135m", data=str(ROOT / "data" / "kjv_sample.txt"), task="causal-lm",
                           lora=LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")), steps=120, lr=2e-3,
                           warmup=6, batch_size=8, max_length=64, eval_fraction=0.1, eval_every=40, seed=0),
}
FULL_LR = {"minilm": 5e-5, "smollm2": 5e-5}
# (report folder, analysed run, compared run, input directions compared: A as in the paper, or dW's own)
REPORTS = (("ranks", "r8-seed0", "r64-seed0", "A"), ("seeds", "r8-seed0", "r8-seed1", "A"),
           ("full", "full-seed0", "r8-seed0", "A"), ("drift", "r8-seed0", "r8-seed0-init", "A"),
           ("ranks-delta", "r8-seed0", "r64-seed0", "delta"), ("seeds-delta", "r8-seed0", "r8-seed1", "delta"))


def runs_of(experiment: str) -> dict[str, TrainConfig]:
    r8 = BASES[experiment]
    return {
        "r8-seed0": r8,
        "r8-seed1": replace(r8, seed=1),
        "r64-seed0": replace(r8, lora=r8.lora.replace(rank=64, alpha=8 * r8.lora.alpha)),  # the same alpha / r = 2
        "full-seed0": replace(r8, full=True, lr=FULL_LR[experiment]),
        # r8-seed0 as initialised: one step at a negligible learning rate keeps A at its random start
        # (B ~ 0), to see how far training moved A's subspace from where it began
        "r8-seed0-init": replace(r8, steps=1, lr=1e-12, warmup=0),
    }


def folder_of(runs: Path, name: str, cfg: TrainConfig) -> Path:
    """The run's adapter (or full model) folder, relative to the working folder where it can be (the
    reports name it)."""
    folder = (runs / name / ("model" if cfg.full else "adapter")).resolve()
    return folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder


def run_experiment(experiment: str, runs: Path, docs: Path, retrain: bool) -> dict:
    configs, results = runs_of(experiment), {}
    for name, cfg in configs.items():
        if retrain or not folder_of(runs, name, cfg).is_dir():
            print(f"== {experiment}: training {name}", flush=True)
            train(replace(cfg, out=str(runs / name)))
        results[name] = json.loads((runs / name / "summary.json").read_text())
    for report, first, second, basis in REPORTS:
        print(f"== {experiment}: analyze {first} vs {second} (basis {basis}) -> {docs / report}", flush=True)
        AnalyzeConfig(adapter=str(folder_of(runs, first, configs[first])),
                      compare=str(folder_of(runs, second, configs[second])),
                      base=configs[first].model, out=str(docs / report), basis=basis).run()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default=",".join(BASES), help="comma-separated: " + ", ".join(BASES))
    parser.add_argument("--runs", type=Path, default=ROOT / "out" / "analysis-runs", help="training runs go here")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "analysis", help="reports and figures go here")
    parser.add_argument("--retrain", action="store_true", help="train again even if a run's output exists")
    args = parser.parse_args(argv)
    for experiment in split_names(args.experiments):
        summaries = run_experiment(experiment, args.runs / experiment, args.docs / experiment, args.retrain)
        evals = {name: s.get("last_eval") for name, s in summaries.items()}
        (args.docs / experiment / "runs.json").write_text(json.dumps({"last_eval": evals, "summaries": summaries},
                                                                     indent=2) + "\n")
        print(json.dumps(evals, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
