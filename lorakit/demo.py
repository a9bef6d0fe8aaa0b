"""The end-to-end demo on a real model: inject, train, save, reload, merge, time (`python -m lorakit.demo`).

Runs SmolLM2-135M on 2 CPU cores in about two minutes: rank-8 LoRA on q_proj/v_proj, a few AdamW
steps on King James verses, then the adapter goes to disk, comes back into a fresh model and is
merged, with the logits and forward times of base, unmerged and merged models compared.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import lorakit as lk
from lorakit.zoo import BUNDLED, cache_root, load_bundled

MODEL = "smollm2-135m"
DATA = Path(__file__).resolve().parent.parent / "data" / "kjv_sample.txt"
LOG_FILE = "train_log.jsonl"
MAX_TOKENS = 48  # per sentence (KJV verses are 10-70 tokens); a CPU forward costs ~5 ms a token


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # keep the demo's own output readable

    header(f"1. Load {MODEL}")
    print(BUNDLED[MODEL].description)
    print(f"(the first run converts the packaged GGUF file, once, into a cache under {cache_root()}: about 20 s)")
    start = time.perf_counter()
    model, tokenizer = load_bundled(MODEL)
    print(f"loaded in {time.perf_counter() - start:.1f} s")
    train, held_out = split_sentences(args.data)
    held_out = held_out[:args.held_out]
    print(f"data: {len(train)} training and {len(held_out)} held-out verses from {args.data.name}")

    header("2. Inject LoRA: rank 8, alpha 16, targets q_proj + v_proj")
    config = lk.LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"))
    paths = lk.inject_(model, config)
    trainable, total = lk.parameter_counts(model)
    print(f"adapted {len(paths)} modules, e.g. {paths[0]}")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    header(f"3. Train: {args.steps} AdamW steps, batch {args.batch}, lr {args.lr}")
    args.out.mkdir(parents=True, exist_ok=True)
    before = mean_loss(model, tokenizer, held_out)
    print(f"held-out loss before: {before:.3f} (perplexity {torch.tensor(before).exp():.1f})")
    train_steps(model, tokenizer, train, args)
    after = mean_loss(model, tokenizer, held_out)
    print(f"held-out loss after:  {after:.3f} (perplexity {torch.tensor(after).exp():.1f})")
    print(f"step log: {args.out / LOG_FILE}")

    header("4. Save the adapter")
    lk.save_adapter(model, args.out)
    adapter_bytes = sum(f.stat().st_size for f in args.out.iterdir() if f.name.startswith("adapter_"))
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    print(f"{args.out}: adapter {adapter_bytes / 1e6:.2f} MB, "
          f"{100 * adapter_bytes / model_bytes:.2f}% of the model's {model_bytes / 1e6:.0f} MB")

    header("5. Reload into a fresh model, merge, compare logits")
    merged = compare_reloaded(model, args.out, tokenizer, held_out[:4])

    header("6. Forward time: base vs unmerged vs merged")
    base, _ = load_bundled(MODEL)
    time_forwards({"base": base, "unmerged": model, "merged": merged}, tokenizer, held_out[:2], args.repeats)
    print(f"\ndemo finished in {time.perf_counter() - began:.0f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lorakit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo-adapter"), help="adapter directory (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=DATA, help="text file, one sentence a line (default: data/kjv_sample.txt)")
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="sentences per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--held-out", type=int, default=16, help="held-out verses for the loss (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="timed forwards per model (default: %(default)s)")
    args = parser.parse_args(argv)
    small = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if isinstance(v, int) and v < 1]
    if small:
        parser.error(f"{', '.join(small)}: must be at least 1")
    return args


def header(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def split_sentences(path: Path) -> tuple[list[str], list[str]]:
    """Every 10th line is held out; the rest trains."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [s for i, s in enumerate(lines) if i % 10], [s for i, s in enumerate(lines) if not i % 10]


def batch_loss(model: nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean next-token cross-entropy over the real (non-pad) tokens of a padded batch."""
    batch = tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (B, T), pads ignored
    return model(**batch, labels=labels).loss


@torch.no_grad()
def mean_loss(model: nn.Module, tokenizer, sentences: list[str], batch: int = 16) -> float:
    losses = [batch_loss(model, tokenizer, sentences[i:i + batch]).item() for i in range(0, len(sentences), batch)]
    return statistics.fmean(losses)


def train_steps(model: nn.Module, tokenizer, sentences: list[str], args: argparse.Namespace) -> None:
    """AdamW on the trainable (LoRA) parameters only; one JSON line per step in the log."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = random.Random(0).sample(sentences, len(sentences))
    model.train()
    with open(args.out / LOG_FILE, "w") as log, tqdm(range(args.steps), desc="training", unit="step") as bar:
        for step in bar:
            start = (step * args.batch) % len(order)
            batch = (order + order)[start:start + args.batch]  # wrap around the shuffled data
            began = time.perf_counter()
            loss = batch_loss(model, tokenizer, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            record = {"step": step + 1, "loss": round(loss.item(), 5), "lr": args.lr,
                      "sentences": len(batch), "seconds": round(time.perf_counter() - began, 3)}
            log.write(json.dumps(record) + "\n")
            log.flush()
    model.eval()


@torch.no_grad()
def logits(model: nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS)
    return model(**batch).logits  # (B, T, vocab)


def compare_reloaded(trained: nn.Module, directory: Path, tokenizer, sentences: list[str]) -> nn.Module:
    """Load the saved adapter into a fresh model and check it against the trained one; returns it merged."""
    fresh, _ = load_bundled(MODEL)
    base = logits(fresh, tokenizer, sentences)
    lk.load_adapter(fresh, directory)
    originals = {path: layer.base_layer.weight.detach().clone() for path, layer in lk.lora_layers(fresh)}
    unmerged = logits(fresh, tokenizer, sentences)
    lk.merge_(fresh)
    merged = logits(fresh, tokenizer, sentences)
    reference = logits(trained, tokenizer, sentences)
    print(f"adapter's effect:  max |trained - base|                = {(reference - base).abs().max():.3e}")
    print(f"reloaded, unmerged: max |reloaded - trained|          = {(unmerged - reference).abs().max():.3e}")
    print(f"reloaded, merged:   max |merged - trained|            = {(merged - reference).abs().max():.3e}")
    lk.unmerge_(fresh)
    exact = sum(torch.equal(layer.base_layer.weight, originals[path]) for path, layer in lk.lora_layers(fresh))
    print(f"unmerge_ restores {exact} of {len(originals)} adapted base weights bit for bit")
    lk.merge_(fresh)
    return fresh


def time_forwards(models: dict[str, nn.Module], tokenizer, sentences: list[str], repeats: int) -> None:
    """Median forward time per model, interleaved so that CPU contention hits all of them alike."""
    batch = tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(**batch)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"batch: {len(sentences)} sentences, {tokens} tokens; median of {repeats} forwards each")
    for name, seconds in medians.items():
        print(f"  {name:<9} {1000 * seconds:7.1f} ms   {seconds / medians['base']:.2f}x base")


if __name__ == "__main__":
    main()
