"""The main job (`make demo`): LoRA fine-tuning on real models and real data, end to end.

1. SmolLM2-135M learns King James English with a rank-8 adapter on q_proj/v_proj: held-out
   loss and sample generations before and after; the adapter's size next to the model's.
2. all-MiniLM-L6-v2 learns to classify WordNet definitions into 6 supersenses, from chance to
   high accuracy, with well under 1% of its parameters trainable.
3. The adapter is merged: logits match the unmerged model and forward latency equals the base's.
Every stage runs through `lorakit.train`, exactly as `lorakit train` does.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import lorakit as lk
from lorakit.training.config import TrainConfig
from lorakit.training.train import train
from lorakit.zoo import cache_root, load_task_model, load_tokenizer

DATA = Path(__file__).resolve().parent.parent / "data"
PROMPTS = ("And the LORD said unto Moses,", "In the beginning")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: we train it
    lm = causal_lm_stage(args)
    classify_stage(args)
    merge_stage(lm, args)
    print(f"\ndemo finished in {time.perf_counter() - began:.0f} s; files under {args.out}/")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lorakit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--lm-steps", type=int, default=40, help="SmolLM2 optimiser steps (default: %(default)s)")
    parser.add_argument("--cls-steps", type=int, default=150, help="MiniLM optimiser steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="timed forwards per model (default: %(default)s)")
    parser.add_argument("--base-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                        help="SmolLM2's frozen base: bfloat16 halves the step and keeps the held-out perplexity "
                             "within 0.5%% of float32's (bench/RESULTS.md) (default: %(default)s)")
    return parser.parse_args(argv)


def header(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 74 - len(title)), flush=True)


# --- 1. a causal LM learns a text domain -------------------------------------------------------------
def causal_lm_stage(args) -> tuple[nn.Module, object, Path]:
    header(f"1. SmolLM2-135M ({args.base_dtype} base) learns King James English (LoRA r=8 on q_proj, v_proj)")
    print(f"(the first run converts the packaged GGUF model once into {cache_root()}: about 20 s)")
    cfg = TrainConfig(model="smollm2-135m", data=str(DATA / "kjv_sample.txt"), task="causal-lm",
                      out=str(args.out / "kjv"), lora=lk.LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")),
                      base=lk.BasePrecision(base_dtype=args.base_dtype), steps=args.lm_steps, lr=2e-3, warmup=4, batch_size=8, max_length=64,
                      eval_fraction=0.1, eval_every=20, seed=0)
    tokenizer = load_tokenizer(cfg.model)
    result = train(cfg)
    model = result.model
    report_run(result, metric="eval_perplexity", label="held-out perplexity")
    print("\nsample generations (greedy, 24 new tokens):")
    for prompt in PROMPTS:
        with lk.disabled(model):
            before = generate(model, tokenizer, prompt)
        after = generate(model, tokenizer, prompt)
        print(f"  prompt: {prompt!r}\n    base:    {before!r}\n    adapted: {after!r}")
    return model, tokenizer, result.out / "adapter"


def generate(model: nn.Module, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def report_run(result, metric: str, label: str) -> None:
    first, last = result.first_eval, result.last_eval
    print(f"trainable parameters: {result.trainable:,} of {result.total:,} "
          f"({100 * result.trainable / result.total:.2f}%)")
    print(f"{label}: {first[metric]:.3f} before -> {last[metric]:.3f} after {result.steps} steps "
          f"({result.seconds:.0f} s); held-out loss {first['eval_loss']:.3f} -> {last['eval_loss']:.3f}")
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in result.model.parameters()}.values())
    print(f"adapter on disk: {result.saved_bytes / 1e6:.2f} MB, next to the model's {model_bytes / 1e6:.0f} MB "
          f"({100 * result.saved_bytes / model_bytes:.2f}%): {result.out / 'adapter'}")
    print(f"log: {result.out / 'log.jsonl'}; loss curve: {result.out / 'loss.png'}")


# --- 2. an encoder learns a classification task ----------------------------------------------------------
def classify_stage(args) -> None:
    header("2. all-MiniLM-L6-v2 classifies WordNet definitions into 6 supersenses")
    cfg = TrainConfig(model="minilm-l6", data=str(DATA / "wordnet_supersenses.jsonl"), task="classify",
                      out=str(args.out / "supersenses"),
                      lora=lk.LoraConfig(rank=8, alpha=16, targets=("query", "value")),
                      steps=args.cls_steps, lr=3e-3, warmup=10, batch_size=32, max_length=48,
                      eval_fraction=0.2, eval_every=50, seed=0)
    result = train(cfg)
    print("(the classifier head is new, so it trains in full and is saved with the adapter)")
    report_run(result, metric="eval_accuracy", label="held-out accuracy")
    print(f"chance is {1 / 6:.3f}; best held-out accuracy {result.best_eval['eval_accuracy']:.3f} "
          f"at step {result.best_eval['step']}")


# --- 3. merging costs nothing at inference ----------------------------------------------------------
def merge_stage(lm, args) -> None:
    header("3. Merge the SmolLM2 adapter: base latency, logits up to the base dtype's rounding")
    trained, tokenizer, adapter_dir = lm
    precision = lk.BasePrecision(base_dtype=args.base_dtype)
    base = load_task_model("smollm2-135m", "causal-lm", base=precision)
    merged = load_task_model("smollm2-135m", "causal-lm", base=precision)
    lk.load_adapter(merged, adapter_dir)
    batch = tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        unmerged_logits = merged(**batch).logits
        lk.merge_(merged)
        merged_logits = merged(**batch).logits
    print(f"reloaded from {adapter_dir} and merged: max |merged - unmerged| logits = "
          f"{(merged_logits - unmerged_logits).abs().max():.2e} ({args.base_dtype} rounding of W0 + dW, "
          f"logits up to {unmerged_logits.abs().max():.0f})")
    text = [open(DATA / "kjv_sample.txt").read()[:2000]]
    timing = time_forwards({"base": base, "unmerged": trained, "merged": merged},
                           tokenizer(text, return_tensors="pt", truncation=True, max_length=256), args.repeats)
    for name, seconds in timing.items():
        print(f"  {name:<9} {1000 * seconds:7.1f} ms   {seconds / timing['base']:.2f}x base")


def time_forwards(models: dict[str, nn.Module], batch, repeats: int) -> dict[str, float]:
    """Median forward time per model, interleaved so CPU contention hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()(**batch)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    print(f"forward of 1 x {batch['input_ids'].shape[1]} tokens, median of {repeats} runs each:")
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
