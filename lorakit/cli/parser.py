"""The `lorakit` argument parser: one subcommand per command, each with its help and an example.

train, plan, analyze and combine take their options from TrainConfig, PlanConfig (both with LoraConfig's
fields), AnalyzeConfig and CombineConfig; eval, generate, merge, inspect and export spell theirs out here.
"""
from __future__ import annotations

import argparse
import dataclasses

from .. import __version__
from ..analysis.report import AnalyzeConfig
from ..core.combine import CombineConfig
from ..core.precision import BasePrecision
from ..io.export import SERVERS
from ..training.config import TrainConfig
from ..training.datasets import TASKS
from ..training import plan_memory
from ..training.plan import PlanConfig
from . import commands, study
from ..serving.server import ServeConfig
from .options import (add_dataclass_options, adapter_option, existing_directory, existing_file, named_adapter,
                      weighted_adapter)

EXAMPLES = {
    "train": "lorakit train --model smollm2-135m --data data/kjv_sample.txt --steps 100 --out out/run",
    "eval": "lorakit eval --model smollm2-135m --adapter out/run/adapter --data data/kjv_sample.txt",
    "generate": 'lorakit generate --model smollm2-135m --adapter out/run/adapter --prompt "Who made the heaven?"',
    "merge": "lorakit merge --model smollm2-135m --adapter out/run/adapter --out out/merged",
    "combine": "lorakit combine --model smollm2-135m out/a/adapter=0.7 out/b/adapter=0.3 --method svd --rank 16 "
               "--out out/mix",
    "inspect": "lorakit inspect out/run/adapter",
    "export": "lorakit export out/run/adapter --for vllm --out out/run/adapter-vllm",
    "analyze": "lorakit analyze out/r8/adapter --compare out/r64/adapter --base minilm-l6 --out out/analysis",
    "serve": "lorakit serve --model smollm2-135m --adapter kjv=out/demo/kjv/adapter --port 8000",
    "study": study.EXAMPLE,
    "plan": "lorakit plan --model smollm2-135m --rank 8 --targets q_proj,v_proj --batch 8 --seq 128",
}
ADAPTER_HELP = "adapter folder (adapter_config.json + adapter_model.safetensors)"
DESCRIPTION = ("Low-Rank Adaptation (LoRA): train adapters, evaluate, generate, merge, combine, inspect, export for "
               "vLLM/LoRAX, analyze, plan, serve.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description=DESCRIPTION,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run, parser=sub)
        return sub

    train = command("train", "fine-tune a LoRA adapter (or, with --full, every weight) on a data file",
                    commands.run_train)
    add_dataclass_options(train, TrainConfig)
    _eval_options(command("eval", "held-out loss and perplexity (causal-lm) or accuracy (classify) over a whole "
                                  "data file", commands.run_eval))
    _generate_options(command("generate", "complete prompts with the base model and, if given, an adapter "
                                          "(or each prompt with its own adapter)", commands.run_generate))
    _merge_options(command("merge", "fold an adapter into the base weights and save a plain transformers model "
                                    "folder", commands.run_merge))
    combine = command("combine", "build one adapter from several (weighted): svd, cat, linear, ties, dare_linear, "
                                 "dare_ties (PEFT's add_weighted_adapter methods), and save it", commands.run_combine)
    combine.add_argument("adapters", nargs="+", type=weighted_adapter, metavar="DIR=WEIGHT",
                         help="an adapter folder and its weight, e.g. out/a/adapter=0.7 (a negative weight subtracts)")
    combine.add_argument("--model", required=True,
                         help="bundled model name (smollm2-135m, minilm-l6) or a transformers model directory")
    add_dataclass_options(combine, CombineConfig)
    combine.add_argument("--name", default="combined", help="the new adapter's name, in its file (default: %(default)s)")
    combine.add_argument("--out", required=True, help="folder to write (appears whole or not at all)")
    combine.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    inspect = command("inspect", "describe an adapter folder: config, size, lorakit metadata, whether vLLM and "
                                 "LoRAX can serve it as is (reads no pickle)", commands.run_inspect)
    inspect.add_argument("adapter", type=existing_directory, metavar="ADAPTER", help=ADAPTER_HELP)
    inspect.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _export_options(command("export", "write a copy of an adapter that vLLM and LoRAX serve as is: one rank and "
                                      "lora_alpha = rank, each module's scale folded into its B and smaller ranks "
                                      "zero-padded (the same outputs); refuses what has no such form",
                            commands.run_export))
    analyzer = command("analyze", "what an update learned (the LoRA paper's section 7): spectra and effective rank, "
                                  "subspace similarity with --compare, amplification of W with --base; writes "
                                  "report.md, report.json and PNG figures", commands.run_analyze)
    analyzer.add_argument("adapter", type=existing_directory, metavar="ADAPTER",
                          help="adapter folder, or a fully fine-tuned model folder (with --base)")
    add_dataclass_options(analyzer, AnalyzeConfig, skip=("adapter",))
    planner = command("plan", "predict trainable parameters, adapter file size and peak training memory, LoRA "
                              "and full fine-tuning (builds the model without its weights)", commands.run_plan)
    add_dataclass_options(planner, PlanConfig)
    planner.epilog = f"{plan_memory.__doc__.strip()}\n\n{planner.epilog}"  # the formulas, as the module states them
    planner.add_argument("--json", action="store_true", help="print the result as one JSON object")
    server = command("serve", "serve the base and many adapters behind the OpenAI API (completions and chat, "
                              "streaming), with continuous batching across adapters", commands.run_serve)
    server.add_argument("--adapter", dest="adapters", action="append", default=[], type=named_adapter,
                        metavar="NAME=DIR", help="an adapter requests name as their model (repeatable)")
    add_dataclass_options(server, ServeConfig, skip=("adapters",))
    study.add_study_options(command("study", "a grid of training runs (ranks, target sets, data sizes, learning "
                                             "rates, full fine-tuning, seeds) with mean and spread over seeds; "
                                             "resumable; writes report.md, report.json and figures",
                                    study.run_study_command))
    return parser


def _export_options(export: argparse.ArgumentParser) -> None:
    export.add_argument("adapter", type=existing_directory, metavar="ADAPTER", help=ADAPTER_HELP)
    export.add_argument("--for", dest="server", required=True, choices=SERVERS,
                        help="the server whose rules to meet: vllm (LoRAX reads the same subset of PEFT's format)")
    export.add_argument("--out", required=True, help="folder to write (appears whole or not at all)")
    export.add_argument("--force", action="store_true", help="replace --out if it already holds files")


def train_default(name: str):
    """TrainConfig's default for `name`: eval and generate share the training run's defaults."""
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


def _eval_options(evaluate: argparse.ArgumentParser) -> None:
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


def _generate_options(generate: argparse.ArgumentParser) -> None:
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


def _merge_options(merge: argparse.ArgumentParser) -> None:
    _model_options(merge, adapter_required=True)
    merge.add_argument("--out", required=True, help="folder to write (from_pretrained loads it without lorakit)")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype of the saved weights: round(W0 + dW), summed in float32 and rounded once; "
                            "W0 dequantized on an int8/nf4 base (default: %(default)s)")
    merge.add_argument("--requantize", action="store_true",
                       help="int8/nf4 base: round the merged weights to what --base-dtype stores (saved dense, "
                            "so they load back into it unchanged) and print the measured error that costs")
    merge.add_argument("--force", action="store_true", help="replace --out if it already holds files")


def _model_options(parser: argparse.ArgumentParser, adapter_required: bool = False,
                   named_adapters: bool = False) -> None:
    parser.add_argument("--model", required=True,
                        help="bundled model name (smollm2-135m, minilm-l6) or a transformers model directory")
    base = parser.add_argument_group("BasePrecision options", "how the frozen base is stored while it runs")
    add_dataclass_options(parser, BasePrecision, group=base)
    if named_adapters:
        parser.add_argument("--adapter", action="append", type=adapter_option, metavar="DIR|NAME=DIR",
                            help="DIR: one adapter folder for every prompt; NAME=DIR (repeatable): an adapter "
                                 "the rows of --prompts name in their \"adapter\" field; default: the base model")
        return
    parser.add_argument("--adapter", required=adapter_required, type=existing_directory, metavar="DIR",
                        help="adapter folder written by lorakit train (or PEFT)"
                             + ("" if adapter_required else "; default: the base model alone"))
