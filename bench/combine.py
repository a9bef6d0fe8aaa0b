"""Benchmark: how long lk.combine_adapters takes on SmolLM2-135M, per method.

    .venv/bin/python bench/combine.py            # q_proj,v_proj and all-linear, 3 repeats
    .venv/bin/python bench/combine.py --quick    # q_proj,v_proj, 1 repeat

Two rank-8 adapters with random A and B (seeded; the values do not change the work) are combined
into a new one, which is deleted before the next repeat. The median wall time per method is printed as a
Markdown table and appended, with the machine, to bench/results/combine.jsonl.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import lorakit as lk
from common import machine, torch_threads

RESULTS = Path(__file__).resolve().parent / "results" / "combine.jsonl"
METHODS = {"cat": {}, "linear": {}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5, "seed": 0},
           "svd": {"rank": 16}, "svd (full_matrices)": {"rank": 16, "full_matrices": True},
           "ties_svd": {"rank": 16, "density": 0.5}}


def adapted(targets: str) -> torch.nn.Module:
    model = lk.load_bundled("smollm2-135m")[0]
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        lk.inject_(model, lk.LoraConfig(rank=8, alpha=16, targets=tuple(targets.split(","))), adapter=name)
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                layer.adapters[name].B.normal_(std=0.01)
    return model


def timed(model: torch.nn.Module, method: str, options: dict, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        lk.combine_adapters(model, {"a": 0.7, "b": 0.3}, method.split(" ")[0], adapter="mix", **options)
        seconds.append(time.perf_counter() - began)
        lk.delete_adapter(model, "mix")
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    repeats, target_sets = (1, ["q_proj,v_proj"]) if args.quick else (3, ["q_proj,v_proj", "all-linear"])
    with torch_threads(args.threads):
        rows = [row for targets in target_sets for row in measure(targets, repeats)]
    if not args.quick:
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"machine": machine(), "threads": args.threads, "rows": rows}) + "\n")


def measure(targets: str, repeats: int) -> list[dict]:
    model = adapted(targets)
    modules = len(lk.adapter_paths(model, "a"))
    rows = []
    for method, options in METHODS.items():
        rows.append({"targets": targets, "modules": modules, "method": method, "options": options,
                     "seconds": timed(model, method, options, repeats), "repeats": repeats})
        print(f"| {targets} ({modules} modules) | {method} | {rows[-1]['seconds']:.2f} s |", flush=True)
    return rows


if __name__ == "__main__":
    main()
