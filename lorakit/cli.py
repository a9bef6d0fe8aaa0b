"""The `lorakit` command line: train, eval, generate, merge, inspect, plan.

`lorakit train`'s options are generated from TrainConfig's fields (help, choices and defaults
included), so the command line and the library cannot drift apart. Errors a user can cause
print one line-per-problem message naming the option, and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import typing
from pathlib import Path

from . import __version__
from .errors import LoraError

EXAMPLES = {
    "train": "lorakit train --model smollm2-135m --data data/kjv_sample.txt --steps 100 --out out/run",
    "eval": "lorakit eval --model smollm2-135m --adapter out/run/adapter --data data/kjv_sample.txt",
    "generate": 'lorakit generate --model smollm2-135m --adapter out/run/adapter --prompt "Who made the heaven?"',
    "merge": "lorakit merge --model smollm2-135m --adapter out/run/adapter --out out/merged",
    "inspect": "lorakit inspect out/run/adapter",
    "analyze": "lorakit analyze out/r8/adapter --compare out/r64/adapter --base minilm-l6 --out out/analysis",
    "plan": "lorakit plan --model smollm2-135m --rank 8 --targets q_proj,v_proj --batch 8 --seq 128",
}


# --- arguments ---------------------------------------------------------------------------------------
def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def existing_directory(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def adapter_option(text: str) -> tuple[str | None, str]:
    """generate's --adapter: (None, DIR), one adapter for every prompt, or (NAME, DIR), one the prompts name."""
    from .core.identity import ADAPTER_NAME

    name, equals, directory = text.partition("=")
    if not equals or not ADAPTER_NAME.fullmatch(name) or Path(text).is_dir():
        return None, existing_directory(text)
    if not Path(directory).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {directory!r} (adapter {name!r})")
    return name, directory


def comma_list(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more comma-separated names, e.g. q_proj,v_proj")
    return items


class _Flag(argparse.BooleanOptionalAction):
    """--x / --no-x, with our own help text (Python < 3.14 would append the default a second time)."""

    def __init__(self, *args, help: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = help


# Options whose value must name something on disk: checked while parsing, so the error names the option.
PATH_TYPES = {"data": existing_file, "resume": existing_directory, "compare": existing_directory}


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass `cls` (but `skip`): --field-name, typed, with its metadata's
    help and choices."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, option = hints[f.name], "--" + f.name.replace("_", "-")
        shown = {True: "on", False: "off"}.get(f.default, f.default) if kind is bool else f.default
        shown = ",".join(shown) if isinstance(shown, tuple) else shown
        help = f.metadata.get("help", "") + ("" if f.default is None else f" (default: {shown})")
        kw = {"dest": f.name, "default": f.default, "help": help.replace("%", "%%")}
        if kind is bool:
            parser.add_argument(option, action=_Flag, **kw)
            continue
        if kind == tuple[str, ...]:
            kw.update(type=comma_list, metavar="NAME,...")
        elif kind in (int, float, str, str | None):
            metavar = {int: "N", float: "X"}.get(kind, f.name.upper())
            kw.update(type=PATH_TYPES.get(f.name, str if kind == str | None else kind), metavar=metavar)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: type {kind} has no command-line form; "
                            "add it to add_dataclass_options")
        if "choices" in f.metadata:
            kw.update(choices=f.metadata["choices"], metavar=None)
        parser.add_argument(option, **kw)


def train_default(name: str):
    """TrainConfig's default for `name`: eval and generate share the training run's defaults."""
    from .training.train import TrainConfig

    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    from .training.data import TASKS
    from .training.plan import PlanConfig
    from .training.train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="lorakit", description="Low-Rank Adaptation (LoRA): train adapters, evaluate, generate, merge, inspect, plan.",
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run, parser=sub)
        return sub

    train = command("train", "fine-tune a LoRA adapter (or, with --full, every weight) on a data file", _train)
    add_dataclass_options(train, TrainConfig)

    evaluate = command("eval", "held-out loss and perplexity (causal-lm) or accuracy (classify) over a whole data file",
                       _eval)
    _model_options(evaluate)
    evaluate.add_argument("--data", required=True, type=existing_file,
                          help="data file, in the formats lorakit train reads")
    evaluate.add_argument("--task", choices=TASKS,
                          help="default: the adapter's task, else causal-lm")
    evaluate.add_argument("--max-length", type=int, default=train_default("max_length"), metavar="N",
                          help="tokens per example (default: %(default)s, as in training)")
    evaluate.add_argument("--batch-size", type=int, default=train_default("batch_size"), metavar="N",
                          help="examples per forward pass (default: %(default)s)")
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON object")

    generate = command("generate", "complete prompts with the base model and, if given, an adapter "
                                   "(or each prompt with its own adapter)", _generate)
    _model_options(generate, named_adapters=True)
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", type=existing_file, metavar="FILE.jsonl",
                         help='many prompts, one JSON object {"prompt": ..., "adapter": NAME or null} per line, '
                              'generated as one batch, each row through its adapter (null or absent: the base)')
    generate.add_argument("--max-new-tokens", type=int, default=40, metavar="N",
                          help="tokens to generate per prompt (default: %(default)s)")
    generate.add_argument("--temperature", type=float, default=0.0, metavar="T",
                          help="sampling temperature; 0 is greedy (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=train_default("seed"), metavar="N",
                          help="sampling seed (default: %(default)s)")
    generate.add_argument("--no-chat", dest="chat", action="store_false",
                          help="feed prompts as they are, not through the tokenizer's chat template")
    generate.add_argument("--json", action="store_true",
                          help='print one JSON object {"prompt", "adapter", "completion"} per line')

    merge = command("merge", "fold an adapter into the base weights and save a plain transformers model folder", _merge)
    _model_options(merge, adapter_required=True)
    merge.add_argument("--out", required=True, help="folder to write (from_pretrained loads it without lorakit)")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype of the saved weights; the merge itself runs in float32 (default: %(default)s)")
    merge.add_argument("--force", action="store_true", help="replace --out if it already holds files")

    inspect = command("inspect", "describe an adapter folder: config, size, lorakit metadata (reads no pickle)",
                      _inspect)
    inspect.add_argument("adapter", type=existing_directory, metavar="ADAPTER",
                         help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print the result as one JSON object")

    from .analysis.report import AnalyzeConfig

    analyzer = command("analyze", "what an update learned (the LoRA paper's section 7): spectra and effective rank, "
                                  "subspace similarity with --compare, amplification of W with --base; writes "
                                  "report.md, report.json and PNG figures", _analyze)
    analyzer.add_argument("adapter", type=existing_directory, metavar="ADAPTER",
                          help="adapter folder, or a fully fine-tuned model folder (with --base)")
    add_dataclass_options(analyzer, AnalyzeConfig, skip=("adapter",))

    planner = command("plan", "predict trainable parameters, adapter file size and peak training memory, LoRA "
                              "and full fine-tuning (builds the model without its weights)", _plan)
    add_dataclass_options(planner, PlanConfig)
    planner.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def _model_options(parser: argparse.ArgumentParser, adapter_required: bool = False,
                   named_adapters: bool = False) -> None:
    parser.add_argument("--model", required=True,
                        help="bundled model name (smollm2-135m, minilm-l6) or a transformers model directory")
    if named_adapters:
        parser.add_argument("--adapter", action="append", type=adapter_option, metavar="DIR|NAME=DIR",
                            help="DIR: one adapter folder for every prompt; NAME=DIR (repeatable): an adapter "
                                 "the rows of --prompts name in their \"adapter\" field; default: the base model")
        return
    parser.add_argument("--adapter", required=adapter_required, type=existing_directory, metavar="DIR",
                        help="adapter folder written by lorakit train (or PEFT)"
                             + ("" if adapter_required else "; default: the base model alone"))


# --- entry point ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 itself on bad syntax)."""
    args = build_parser().parse_args(argv)
    try:
        _quiet_transformers()
        return args.run(args) or 0
    except LoraError as err:
        print(f"lorakit {args.command}: error: {name_options(str(err), args.parser)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


def name_options(message: str, parser: argparse.ArgumentParser) -> str:
    """The library's messages name fields (`batch_size=0`); say the option instead (`--batch-size=0`)."""
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if not long or action.dest in ("help", argparse.SUPPRESS):
            continue
        if action.nargs == 0 and action.const is True:  # a store_true flag: `force=True` is `--force`
            message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}=True\b", long[0], message)
        message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}=", f"{long[0]}=", message)
        message = re.sub(rf"(?m)^(\s*- )?{re.escape(action.dest)}:", rf"\g<1>{long[0]}:", message)  # `targets: ...`
    return message


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bars on every model load


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- train -----------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, train

    from_args = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**from_args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        print_train_summary(cfg, result)
    return 0


def print_train_summary(cfg, result) -> None:
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
def _eval(args: argparse.Namespace) -> int:
    from .training.data import load_dataset, padding_id
    from .serving.inference import adapter_task, load_for_inference
    from .training.train import evaluate
    from .zoo import load_tokenizer

    task, labels = adapter_task(args.adapter, args.task)
    data = load_dataset(args.data, task, load_tokenizer(args.model), args.max_length, labels)
    loaded = load_for_inference(args.model, args.adapter, task, data.label_names)
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
def _generate(args: argparse.Namespace) -> int:
    from .training.data import load_prompts
    from .serving.inference import generate, load_for_inference

    single, named = _adapter_options(args.adapter)
    if named:
        return _generate_per_row(args, named)
    # No adapter or one for every prompt: rows of --prompts may not name adapters.
    prompts = [args.prompt] if args.prompts is None else [r["prompt"] for r in load_prompts(args.prompts, ())]
    loaded = load_for_inference(args.model, single)
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
    from .serving.cache import AdapterCache
    from .training.data import load_prompts
    from .serving.inference import adapter_task, generate, load_for_inference

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
    loaded = load_for_inference(args.model, task="causal-lm")
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
def _merge(args: argparse.Namespace) -> int:
    import torch

    from .serving.inference import merge_to_folder

    out = merge_to_folder(args.model, args.adapter, args.out, getattr(torch, args.dtype), args.force)
    print(f"merged {args.adapter} into {args.model}: {out} ({_size(_folder_bytes(out))}, {args.dtype})")
    architecture = (json.loads((out / "config.json").read_text()).get("architectures") or ["AutoModel"])[0]
    print(f"load it without lorakit: transformers.{architecture}.from_pretrained({str(out)!r})")
    return 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- inspect ---------------------------------------------------------------------------------------------
def _inspect(args: argparse.Namespace) -> int:
    from .io.adapter_files import adapter_info
    from .core.lowrank import lora_scale

    info = adapter_info(args.adapter)
    c = info["config"]
    info["scale"] = lora_scale(c["rank"], c["alpha"], c["rslora"])
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
        f"lora:         rank {c['rank']}, alpha {c['alpha']:g}, scale {info['scale']:g}{' (rslora)' if c['rslora'] else ''}, "
        f"dropout {c['dropout']:g}, bias {c['bias']}",
        f"targets:      {targets}",
    ]
    for name in ("rank_pattern", "alpha_pattern"):
        if c[name]:
            lines.append(f"{name.replace('_', ' ') + ':':13} " + ", ".join(f"{k}={v}" for k, v in c[name].items()))
    lines.append(f"modules:      {info['modules']} adapted, {info['parameters']:,} parameters "
                 f"({', '.join(info['dtypes'])})")
    lines.append("files:        " + ", ".join(f"{name} {_size(size)}" for name, size in info["files"].items()))
    print("\n".join(lines))
    return 0


# --- plan ------------------------------------------------------------------------------------------------
def _analyze(args: argparse.Namespace) -> int:
    from .analysis.measures import by_group
    from .analysis.report import AnalyzeConfig

    cfg = AnalyzeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AnalyzeConfig)})
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


def _plan(args: argparse.Namespace) -> int:
    from .training.plan import PlanConfig

    cfg = PlanConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PlanConfig)})
    result = cfg.run()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    lora, full = result["lora"], result["full"]
    precision = cfg.dtype + (", bf16 autocast" if cfg.bf16 else "") + (", grad checkpointing" if cfg.grad_checkpointing else "")
    print(f"{cfg.model}: {result['total_parameters']:,} parameters; batch {cfg.batch} x {cfg.seq} tokens, {precision}")
    print(f"LoRA rank {cfg.rank} on {', '.join(cfg.targets)}: {lora['trainable_parameters']:,} trainable "
          f"({100 * lora['trainable_parameters'] / result['total_parameters']:.2f}%), "
          f"adapter file {_size(lora['adapter_file_bytes'])}")
    print(f"{'peak training memory (predicted)':34} {'LoRA':>10} {'full':>10}")
    rows = (("weights", "weights_bytes"), ("gradients", "gradient_bytes"), ("AdamW states", "optimizer_state_bytes"),
            ("activations (end of forward)", "activation_bytes"), ("peak", "peak_bytes"))
    for label, key in rows:
        print(f"  {label:32} {_size(lora[key]):>10} {_size(full[key]):>10}")
    return 0
