"""The `lorakit` command line: train, eval, generate, merge, combine, inspect, export, analyze, plan, serve.

`main` parses (parser.py) and runs the chosen command (commands.py). The options of `lorakit train`,
`plan` and `analyze` are generated from TrainConfig's, PlanConfig's and AnalyzeConfig's fields, LoRA's
from LoraConfig's (help, choices and defaults included; options.py), so the command line and the
library cannot drift apart. Errors a user can cause print one line-per-problem message naming the
option, and exit with status 2.
"""
from __future__ import annotations

import sys

from transformers.utils import logging

from ..errors import LoraError
from .options import name_options
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 itself on bad syntax)."""
    args = build_parser().parse_args(argv)
    try:
        logging.disable_progress_bar()  # "Loading weights" bars on every model load
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
