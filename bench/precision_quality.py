"""Does a low-precision base keep the demo's quality? The demo's SmolLM2 run (rank 8 on q_proj/v_proj, 40
steps on data/kjv_sample.txt, seed 0) on a float32, bfloat16 and nf4 base; held-out perplexity of each.

    .venv/bin/python bench/precision_quality.py            # about 6 minutes on 2 CPU cores
    .venv/bin/python bench/precision_quality.py --steps 4  # smoke run

Writes bench/results/precision_quality.json and prints a markdown table (for bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lorakit as lk
from lorakit.training.config import TrainConfig
from lorakit.training.train import train

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"bfloat16": 0.03, "nf4": 0.08}
DTYPES = ("float32", "bfloat16", "nf4")
RESULTS = ROOT / "bench" / "results"  # allowed relative rise of held-out perplexity over the float32 base


def run(base_dtype: str, steps: int, out: Path) -> dict:
    cfg = TrainConfig(model="smollm2-135m", data=str(ROOT / "data" / "kjv_sample.txt"), task="causal-lm",
                      out=str(out / base_dtype), lora=lk.LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")),
                      base=lk.BasePrecision(base_dtype=base_dtype), steps=steps, lr=2e-3, warmup=min(4, steps),
                      batch_size=8, max_length=64, eval_fraction=0.1, eval_every=20, seed=0, progress=False)
    started = time.perf_counter()
    result = train(cfg)
    return {"base_dtype": base_dtype, "steps": steps, "seconds": round(time.perf_counter() - started, 1),
            "perplexity_before": math.exp(result.first_eval["eval_loss"]),
            "perplexity_after": math.exp(result.last_eval["eval_loss"])}


def table(rows: list[dict]) -> str:
    reference = next(r for r in rows if r["base_dtype"] == "float32")["perplexity_after"]
    lines = ["| base | held-out perplexity before -> after | vs float32 base | target | run time |",
             "|---|---|---|---|---|"]
    for r in rows:
        rise = r["perplexity_after"] / reference - 1
        target = TARGETS.get(r["base_dtype"])
        verdict = "" if target is None else f"<= +{target:.0%}: {'met' if rise <= target else 'NOT met'}"
        lines.append(f"| {r['base_dtype']} | {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f} | "
                     f"{rise:+.2%} | {verdict} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps, as the demo (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/precision_quality"), help="run folders")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES,
                        help="base dtypes to (re)run; the others' last results are kept (default: all)")
    args = parser.parse_args(argv)
    saved = RESULTS / "precision_quality.json"
    rows = {r["base_dtype"]: r for r in json.loads(saved.read_text())} if saved.is_file() and args.steps == 40 else {}
    for dtype in args.dtypes:
        rows[dtype] = run(dtype, args.steps, args.out)
        if args.steps == 40:  # each run is kept as soon as it ends
            RESULTS.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps([rows[d] for d in DTYPES if d in rows], indent=2) + "\n")
    print(table([rows[d] for d in DTYPES if d in rows]))


if __name__ == "__main__":
    main()
