"""What each `lorakit` command does with its parsed options, and what it prints."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..analysis.measures import by_group
from ..analysis.report import AnalyzeConfig
from ..core.combine import CombineConfig
from ..core.precision import BasePrecision
from ..core.lowrank import lora_scale
from ..errors import LoraError
from ..io.adapter_files import adapter_info
from ..io.export import VLLM_MAX_LORA_RANKS, Reason, export_adapter, servability, vllm_max_lora_rank
from ..serving.cache import AdapterCache
from ..serving.inference import adapter_task, combine_to_folder, generate, load_for_inference, merge_to_folder
from ..serving.prompts import load_prompts
from ..serving.server import ServeConfig, serve
from ..training.batches import padding_id
from ..training.config import TrainConfig
from ..training.datasets import load_dataset
from ..training.plan import PlanConfig
from ..training.train import TrainResult, evaluate, train
from ..zoo import load_tokenizer
from .options import config_from_args


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- train -----------------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(TrainConfig, args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        print_train_summary(cfg, result)
    return 0


def print_train_summary(cfg: TrainConfig, result: TrainResult) -> None:
    what = "model" if cfg.full else "adapter"
    seconds = f"{result.seconds:.2f}" if result.seconds < 10 else f"{result.seconds:.0f}"
    print(f"trained {result.steps} steps in {seconds} s ({result.skipped_steps} skipped)")
    print(f"trainable parameters: {result.trainable:,} of {result.total:,} "
          f"({100 * result.trainable / max(1, result.total):.2f}%)")
    print(f"{what}: {_size(result.saved_bytes)} in {Path(result.out) / what}")
    if result.first_eval.get("eval_loss") is None:
        print("eval: none (--eval-fraction 0)")
    else:
        best = result.best_eval
        print(f"eval: first {_metrics(result.first_eval)} | best {_metrics(best)} at step {best['step']} "
              f"| last {_metrics(result.last_eval)}")
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(result.out).iterdir())
    print(f"files in {result.out}: {', '.join(files)}")


def _metrics(record: dict) -> str:
    parts = [f"loss {record['eval_loss']:.4f}"]
    if "eval_perplexity" in record:
        parts.append(f"perplexity {record['eval_perplexity']:.2f}")
    if "eval_accuracy" in record:
        parts.append(f"accuracy {100 * record['eval_accuracy']:.1f}%")
    return ", ".join(parts)


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"


# --- eval ------------------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    task, labels = adapter_task(args.adapter, args.task)
    data = load_dataset(args.data, task, load_tokenizer(args.model), args.max_length, labels)
    loaded = load_for_inference(args.model, args.adapter, task, data.label_names, config_from_args(BasePrecision, args))
    device = _device()
    record = evaluate(loaded.model.to(device), data.examples, task, padding_id(loaded.tokenizer),
                      args.batch_size, device)
    result = {"model": args.model, "adapter": args.adapter, "data": args.data, "task": task,
              "examples": len(data.examples), **{k.removeprefix("eval_"): v for k, v in record.items()}}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.data}: {len(data.examples)} examples, {task}, "
              f"{args.adapter or 'no adapter'} on {args.model}")
        print(_metrics(record))
    return 0


# --- generate --------------------------------------------------------------------------------------------
def run_generate(args: argparse.Namespace) -> int:
    single, named = _adapter_options(args.adapter)
    if named:
        return _generate_per_row(args, named)
    # No adapter or one for every prompt: rows of --prompts may not name adapters.
    prompts = [args.prompt] if args.prompts is None else [r["prompt"] for r in load_prompts(args.prompts, ())]
    loaded = load_for_inference(args.model, single, base=config_from_args(BasePrecision, args))
    if loaded.task != "causal-lm":
        raise LoraError(f"adapter={single!r} was trained for {loaded.task!r}, which does not generate "
                        "text; use lorakit eval for a classifier")
    completions = generate(loaded.model.to(_device()), loaded.tokenizer, prompts, args.max_new_tokens,
                           args.temperature, args.seed, args.chat)
    _print_completions(args, prompts, [single] * len(prompts), completions, labelled=False)
    return 0


def _adapter_options(values: list[tuple[str | None, str]] | None) -> tuple[str | None, dict[str, str]]:
    """(the one adapter for every prompt, or None; name -> folder of the named ones) from --adapter options."""
    values = values or []
    single = [directory for name, directory in values if name is None]
    named: dict[str, str] = {}
    for name, directory in values:
        if name in named:
            raise LoraError(f"--adapter: the name {name!r} is given twice ({named[name]}, {directory}); "
                            "give each adapter its own name")
        if name is not None:
            named[name] = directory
    if len(single) > 1 or (single and named):
        raise LoraError(f"--adapter {single[0]}: a folder without a name applies to every prompt, so it must be the "
                        "only --adapter; to give prompts different adapters, name each: --adapter NAME=DIR")
    return (single[0] if single else None), named


def _generate_per_row(args: argparse.Namespace, named: dict[str, str]) -> int:
    """Every row of --prompts through the adapter it names, all in one batch (AdapterCache + mixed_batch)."""
    if args.prompts is None:
        raise LoraError('--prompt: named adapters (--adapter NAME=DIR) are for the rows of --prompts FILE.jsonl, '
                        'each naming its own in an "adapter" field; for one prompt give --adapter DIR')
    for name, directory in named.items():  # reads each adapter's header only
        task, _ = adapter_task(directory)
        if task != "causal-lm":
            raise LoraError(f"--adapter {name!r} ({directory}) was trained for {task!r}, which does not generate "
                            "text; use lorakit eval for a classifier")
    records = load_prompts(args.prompts, named)
    prompts, names = [r["prompt"] for r in records], [r["adapter"] for r in records]
    loaded = load_for_inference(args.model, task="causal-lm", base=config_from_args(BasePrecision, args))
    model = loaded.model.to(_device())
    cache = AdapterCache(model, capacity=max(1, len({n for n in names if n is not None})))
    cache.register_many(named)  # loads nothing: the batch loads the adapters the rows use
    with cache.batch(names):
        completions = generate(model, loaded.tokenizer, prompts, args.max_new_tokens, args.temperature,
                               args.seed, args.chat)
    _print_completions(args, prompts, names, completions, labelled=True)
    return 0


def _print_completions(args, prompts: list[str], adapters: list[str | None], completions: list[str],
                       labelled: bool) -> None:
    """Each prompt (quoted with '> '), its completion and, if `labelled`, first its adapter's name."""
    for prompt, adapter, completion in zip(prompts, adapters, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "adapter": adapter, "completion": completion}))
            continue
        if labelled:
            print(f"[{adapter or 'base model'}]")
        print("\n".join("> " + line for line in prompt.splitlines() or [""]))
        print(completion + "\n")


# --- merge -----------------------------------------------------------------------------------------------
def run_merge(args: argparse.Namespace) -> int:
    base = config_from_args(BasePrecision, args)
    out, report = merge_to_folder(args.model, args.adapter, args.out, getattr(torch, args.dtype), args.force, base,
                                  args.requantize)
    print(f"merged {args.adapter} into {args.model} ({base.base_dtype} base): {out} "
          f"({_size(_folder_bytes(out))}, {args.dtype})")
    if report is not None:
        print(f"re-quantized to {report['base_dtype']}: {report['layers']} layers, relative weight error "
              f"{report['mean_relative_error']:.2%} mean, {report['max_relative_error']:.2%} max")
    architecture = (json.loads((out / "config.json").read_text()).get("architectures") or ["AutoModel"])[0]
    print(f"load it without lorakit: transformers.{architecture}.from_pretrained({str(out)!r})")
    return 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- combine ---------------------------------------------------------------------------------------------
def run_combine(args: argparse.Namespace) -> int:
    config = config_from_args(CombineConfig, args)
    weights: dict[str, float] = {}
    for directory, weight in args.adapters:
        if directory in weights:
            raise LoraError(f"adapters: {directory} is given twice; give each adapter once, with its weight")
        weights[directory] = weight
    out = combine_to_folder(args.model, weights, args.out, config, args.name, args.force)
    info = adapter_info(out)
    print(f"combined {len(weights)} adapters by {config.method}: {out} (rank {info['config']['rank']}, "
          f"{info['modules']} modules, {_size(_folder_bytes(out))})")
    return 0


# --- inspect ---------------------------------------------------------------------------------------------
def run_inspect(args: argparse.Namespace) -> int:
    info = adapter_info(args.adapter)
    c = info["config"]
    info["scale"] = lora_scale(c["rank"], c["alpha"], c["rslora"])
    info["servable"], servable_line = _servable(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    targets = c["targets"] if isinstance(c["targets"], str) else ", ".join(c["targets"])
    labels = info["label_names"]
    made_by = f"lorakit format {info['format_version']}" if info["format_version"] else "PEFT (no lorakit metadata)"
    lines = [
        f"adapter:      {info['directory']} ({made_by}, name {info['adapter'] or '-'})",
        f"task:         {info['task'] or '-'}" + (f"; labels: {', '.join(labels)}" if labels else ""),
        f"base model:   {info['base_model'] or '-'} (fingerprint {info['base_fingerprint'] or '-'})",
        f"lora:         rank {c['rank']}, alpha {c['alpha']:g}, scale {info['scale']:g}{' (rslora)' if c['rslora'] else ''}"
        f"{', DoRA (trained magnitude per output feature)' if c['dora'] else ''}, "
        f"dropout {c['dropout']:g}, bias {c['bias']}",
        f"targets:      {targets}",
    ]
    for name in ("rank_pattern", "alpha_pattern"):
        if c[name]:
            lines.append(f"{name.replace('_', ' ') + ':':13} " + ", ".join(f"{k}={v}" for k, v in c[name].items()))
    lines.append(f"modules:      {info['modules']} adapted, {info['parameters']:,} parameters "
                 f"({', '.join(info['dtypes'])})")
    lines.append("files:        " + ", ".join(f"{name} {_size(size)}" for name, size in info["files"].items()))
    lines.append(f"vLLM/LoRAX:   {servable_line}")
    print("\n".join(lines))
    return 0


def _servable(adapter: str) -> tuple[dict, str]:
    """inspect's "servable" entry and line: whether vLLM and LoRAX serve the adapter as is, and if not, why."""
    try:
        reasons = servability(adapter)
    except LoraError as err:  # the header reads but the tensors do not (damaged, or an A without its B)
        return {"server": "vllm", "error": str(err)}, f"cannot tell: {err}"
    entry = {"server": "vllm", "as_is": not reasons, "after_export": all(r.fixable for r in reasons),
             "reasons": [{"field": r.field, "text": r.text, "export_fixes": r.fixable} for r in reasons]}
    return entry, _servable_text(reasons)


def _servable_text(reasons: list[Reason]) -> str:
    """'servable as is', or why not and what `lorakit export` can do about it."""
    if not reasons:
        return "servable as is"
    fixes = sorted({r.field for r in reasons if r.fixable})
    stays = sorted({r.field for r in reasons if not r.fixable})
    verdict = ("can fix all of this" if not stays else "cannot fix this" if not fixes
               else f"can fix {', '.join(fixes)} but not {', '.join(stays)}")
    return f"not servable as is: {'; '.join(r.text for r in reasons)}; `lorakit export --for vllm` {verdict}"


# --- export ----------------------------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    fixed = servability(args.adapter, args.server)  # export refuses, naming them, if any is not fixable
    out = export_adapter(args.adapter, args.out, args.server, args.force)
    info = adapter_info(out)
    rank = info["config"]["rank"]
    print(f"exported {args.adapter} for vLLM/LoRAX: {out} (rank {rank}, lora_alpha {rank}, {info['modules']} "
          f"modules, {_size(_folder_bytes(out))})" + (f"; fixed: {', '.join(r.field for r in fixed)}" if fixed else ""))
    max_rank = vllm_max_lora_rank(rank)
    if max_rank is None:
        print(f"vLLM accepts --max-lora-rank up to {VLLM_MAX_LORA_RANKS[-1]}, below this adapter's rank {rank}")
    else:
        print(f"serve it: vllm serve {info['base_model'] or 'BASE_MODEL'} --enable-lora --max-lora-rank {max_rank} "
              f"--lora-modules {out.name}={out}")
    return 0


# --- analyze ---------------------------------------------------------------------------------------------
def run_analyze(args: argparse.Namespace) -> int:
    cfg = config_from_args(AnalyzeConfig, args)
    result = cfg.run()
    for group, members in by_group(result["modules"]).items():
        line = (f"{group}: {len(members)} modules, energy rank (90%) "
                f"{sum(m['energy_rank'] for m in members) / len(members):.1f}")
        phis = [m["similarity"]["phi"][0][0] for m in members if "similarity" in m]
        if phis:
            line += f", phi(1, 1) {sum(phis) / len(phis):.3f}"
        factors = [m["amplification"]["factor"] for m in members if "amplification" in m]
        if factors:
            line += f", amplification {sum(factors) / len(factors):.2f}"
        print(line)
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


# --- plan ------------------------------------------------------------------------------------------------
def run_plan(args: argparse.Namespace) -> int:
    cfg = config_from_args(PlanConfig, args)
    result = cfg.run()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    lora, full = result["lora"], result["full"]
    precision = _base_text(cfg.base) + (", bf16 autocast" if cfg.bf16 else "") + (
        ", grad checkpointing" if cfg.grad_checkpointing else "")
    print(f"{cfg.model}: {result['total_parameters']:,} parameters; batch {cfg.batch} x {cfg.seq} tokens, {precision}")
    if cfg.strategy != "single":
        each = cfg.batch // cfg.world_size
        print(f"{cfg.world_size} processes, {cfg.strategy}: {each} example{'s' if each > 1 else ''} each; "
              "memory per process")
    print(f"LoRA rank {cfg.lora.rank} on {', '.join(lora['targets'])}: {lora['trainable_parameters']:,} trainable "
          f"({100 * lora['trainable_parameters'] / result['total_parameters']:.2f}%), "
          f"adapter file {_size(lora['adapter_file_bytes'])}")
    print(f"{'peak training memory (predicted)':34} {'LoRA':>10} {'full fp32':>10}")
    for label, key in PLAN_ROWS:
        if key in ("weights_bytes", "peak_bytes") or lora[key] or full[key]:
            print(f"  {label:32} {_size(lora[key]):>10} {_size(full[key]):>10}")
    return 0


PLAN_ROWS = (("weights", "weights_bytes"), ("gradients", "gradient_bytes"), ("AdamW states", "optimizer_state_bytes"),
             ("activations (end of forward)", "activation_bytes"), ("DDP gradient buckets", "gradient_bucket_bytes"),
             ("FSDP gathered parameters", "gathered_parameter_bytes"), ("FSDP reduce-scatter", "reduce_scatter_bytes"),
             ("peak", "peak_bytes"))


def _base_text(base) -> str:
    """How the base is stored, e.g. 'bfloat16', 'nf4 (64-weight blocks, double quant, bfloat16 compute)'."""
    if not base.quantized:
        return base.base_dtype
    blocks = f"{base.block_size}-weight blocks, " + ("double quant, " if base.double_quant else "")
    return f"{base.base_dtype} ({blocks if base.base_dtype == 'nf4' else ''}{base.compute_dtype} compute)"


# --- serve ---------------------------------------------------------------------------------------------
def run_serve(args: argparse.Namespace) -> int:
    serve(config_from_args(ServeConfig, args))
    return 0
