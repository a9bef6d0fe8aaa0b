"""What PiSSA/OLoRA cost at injection: lk.inject_ time on a real model for init default, pissa (exact SVD),
pissa with a randomized SVD (init_niter) and olora (QR), per target set; the median of a few rounds.

    python bench/init_svd.py --model smollm2-135m --threads 1 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import lorakit as lk

INITS = {"default": {}, "pissa": {"init": "pissa"}, "pissa-niter4": {"init": "pissa", "init_niter": 4},
         "pissa-niter16": {"init": "pissa", "init_niter": 16}, "olora": {"init": "olora"}}
TARGETS = {"q_proj,v_proj": ("q_proj", "v_proj"), "all-linear": ("all-linear",)}


def inject_seconds(base: torch.nn.Module, config: lk.LoraConfig, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        model = copy.deepcopy(base)
        began = time.perf_counter()
        lk.inject_(model, config)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "init_svd.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = lk.load_model(args.model)
    rows = []
    for target_name, targets in TARGETS.items():
        for init_name, fields in INITS.items():
            seconds = inject_seconds(base, lk.LoraConfig(rank=args.rank, targets=targets, **fields), args.rounds)
            rows.append({"model": args.model, "rank": args.rank, "targets": target_name, "init": init_name,
                         "threads": args.threads, "inject_seconds": round(seconds, 4)})
            print(f"{target_name:>14}  {init_name:>13}  {seconds:8.3f} s")
    with open(args.out, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
