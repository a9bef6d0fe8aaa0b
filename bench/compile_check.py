"""Does torch.compile pay for a LoRA training step on this machine? Eager vs compiled (default and
reduce-overhead are CUDA-only gains; on CPU the inductor C++ backend) forward+backward of a rank-8 LoRA on
GPT-2 small shapes (random init), float32 and bfloat16 bases, interleaved rounds; plus whether switching
the active adapter or reloading one of the same shapes recompiles.

    .venv/bin/python bench/compile_check.py [--layers 12] [--rounds 6]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import lorakit as lk


def build(dtype: str, layers: int):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers))
    lk.load_base(model, dtype)
    lk.inject_(model, lk.LoraConfig(rank=8, alpha=16, targets=("c_attn",)))
    lk.inject_(model, lk.LoraConfig(rank=8, alpha=16, targets=("c_attn",)), "other")
    return model.train()


def step(model, ids):
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    ids = torch.randint(0, 50257, (4, 128), generator=torch.Generator().manual_seed(1))
    for dtype in ("float32", "bfloat16"):
        eager = build(dtype, args.layers)
        compiled = build(dtype, args.layers)
        started = time.perf_counter()
        compiled_step = torch.compile(lambda ids: step(compiled, ids))
        compiled_step(ids)
        compile_s = time.perf_counter() - started
        times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for name, fn in (("eager", lambda: step(eager, ids)), ("compiled", lambda: compiled_step(ids))):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        ratio = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"]))
        counters = torch._dynamo.utils.counters["stats"]
        before = counters["unique_graphs"]
        lk.set_active(compiled, "other")
        compiled_step(ids)
        after_switch = counters["unique_graphs"]
        print(f"{dtype}: compile {compile_s:.0f} s; step eager {statistics.median(times['eager']) * 1e3:.0f} ms, "
              f"compiled {statistics.median(times['compiled']) * 1e3:.0f} ms, compiled/eager {ratio:.3f}; "
              f"graphs added by an adapter switch: {after_switch - before}")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
