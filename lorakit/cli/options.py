"""Command-line options made from config dataclasses, and back: one option per field, its value
parsed and typed; a config built from the parsed options; the library's messages in options' names.

A field's metadata gives its help and choices (core.config.option); its type hint, looked up in
OPTION_TYPES, how the command line spells its value; a field holding a config dataclass (TrainConfig's
`lora`) contributes that dataclass's options, in a group of their own.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
import typing
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from ..core.identity import ADAPTER_NAME
from ..core.targets import split_names
from ..errors import LoraError

Config = TypeVar("Config")


# --- values --------------------------------------------------------------------------------------------
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
    name, equals, directory = text.partition("=")
    if not equals or not ADAPTER_NAME.fullmatch(name) or Path(text).is_dir():
        return None, existing_directory(text)
    if not Path(directory).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {directory!r} (adapter {name!r})")
    return name, directory


def named_adapter(text: str) -> tuple[str, str]:
    """serve's --adapter: NAME=DIR, an adapter that requests name as their `model`."""
    name, equals, directory = text.partition("=")
    if not equals or not ADAPTER_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=DIR, e.g. kjv=out/demo/kjv/adapter (NAME: letters, "
                                         "digits, '_' or '-')")
    return name, existing_directory(directory)


def weighted_adapter(text: str) -> tuple[str, float]:
    """combine's DIR=WEIGHT: an adapter folder and its weight."""
    directory, equals, weight = text.rpartition("=")
    try:
        value = float(weight)
    except ValueError:
        value = None
    if not equals or value is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give DIR=WEIGHT, e.g. out/a/adapter=0.7")
    return existing_directory(directory), value


def names(text: str) -> tuple[str, ...]:
    """'q_proj,v_proj' -> ('q_proj', 'v_proj')."""
    items = split_names(text)
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more comma-separated names, e.g. q_proj,v_proj")
    return items


def patterns(value_type: type, example: str) -> Callable[[str], dict]:
    """A parser of 'PATTERN=VALUE,...' (e.g. 'q_proj=16,v_proj=4') into {pattern: value_type(value)}."""
    kind = "an integer" if value_type is int else "a number"

    def parse(text: str) -> dict:
        found: dict = {}
        for item in split_names(text) or [text]:
            pattern, equals, value = (part.strip() for part in item.partition("="))
            if not (equals and pattern and _parses(value_type, value)):
                raise argparse.ArgumentTypeError(f"{item!r}: give comma-separated PATTERN=VALUE pairs, each value "
                                                 f"{kind}, e.g. {example}")
            if pattern in found:
                raise argparse.ArgumentTypeError(f"{pattern!r} is given twice in {text!r}; give each pattern once")
            found[pattern] = value_type(value)
        return found

    return parse


def _parses(value_type: type, text: str) -> bool:
    try:
        value_type(text)
    except ValueError:
        return False
    return True


class _Flag(argparse.BooleanOptionalAction):
    """--x / --no-x, with our own help text (Python < 3.14 would append the default a second time)."""

    def __init__(self, *args, help: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help = help


# --- options from dataclass fields ---------------------------------------------------------------------
# type hint -> (how a value is parsed, its metavar; None: the field's name in capitals)
OPTION_TYPES: dict[object, tuple[Callable[[str], object], str | None]] = {
    int: (int, "N"),
    float: (float, "X"),
    float | None: (float, "X"),
    int | None: (int, "N"),
    str: (str, None),
    str | None: (str, None),
    tuple[str, ...]: (names, "NAME,..."),
    tuple[str, ...] | str | None: (names, "NAME,..."),
    Mapping[str, int]: (patterns(int, "q_proj=16,v_proj=4"), "PATTERN=N,..."),
    Mapping[str, float]: (patterns(float, "'*.layers.0.*=32'"), "PATTERN=X,..."),
}
# Options whose value must name something on disk: checked while parsing, so the error names the option.
PATH_TYPES = {"data": existing_file, "resume": existing_directory, "compare": existing_directory}


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                          group: argparse._ArgumentGroup | None = None) -> None:
    """One option per field of the dataclass `cls` (but `skip`): --field-name, typed, with its metadata's
    help, choices and default; a field holding a dataclass adds that one's options, as a group."""
    group = group or parser
    for f, kind in _fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(kind):
            about = f.metadata.get("help")  # the parsers keep descriptions as written: wrap it here
            nested = parser.add_argument_group(f"{kind.__name__} options", about and textwrap.fill(about, 76))
            add_dataclass_options(parser, kind, group=nested)
            continue
        if any(f.name == action.dest for action in parser._actions):
            raise TypeError(f"{cls.__name__}.{f.name}: another field already has the option {_option(f.name)}")
        group.add_argument(_option(f.name), **_option_settings(cls, f, kind))


def _option_settings(cls: type, f: dataclasses.Field, kind) -> dict:
    """add_argument's keywords for the field `f` of type `kind`."""
    default = _default(f)
    shown = _shown(default)
    help = f.metadata.get("help", "") + ("" if shown is None else f" (default: {shown})")
    settings = {"dest": f.name, "default": default, "help": help.replace("%", "%%")}
    if kind is bool:
        return {**settings, "action": _Flag}
    if kind not in OPTION_TYPES:
        raise TypeError(f"{cls.__name__}.{f.name}: type {kind} has no command-line form; add it to OPTION_TYPES")
    parse, metavar = OPTION_TYPES[kind]
    settings.update(type=PATH_TYPES.get(f.name, parse), metavar=metavar or f.name.upper())
    if "choices" in f.metadata:
        settings.update(choices=f.metadata["choices"], metavar=None)
    return settings


def config_from_args(cls: type[Config], args: argparse.Namespace) -> Config:
    """The dataclass `cls` from the options add_dataclass_options made for it; the problems of it and
    of the configs it holds are reported together, in one LoraError."""
    values, errors = {}, []
    for f, kind in _fields(cls):
        if not dataclasses.is_dataclass(kind):
            values[f.name] = getattr(args, f.name)
            continue
        try:
            values[f.name] = config_from_args(kind, args)
        except LoraError as err:
            errors.append(str(err))
            values[f.name] = kind()  # stands in, so that the problems of `cls`'s own fields are found too
    try:
        config = cls(**values)
    except LoraError as err:
        errors.append(str(err))
    if errors:
        raise LoraError("\n".join(errors))
    return config


def _fields(cls: type) -> list[tuple[dataclasses.Field, object]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown(value) -> str | None:
    """A default as the command line would spell it; None where there is none to show."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    return str(value)


# --- messages ------------------------------------------------------------------------------------------
def name_options(message: str, parser: argparse.ArgumentParser) -> str:
    """The library's messages name fields (`batch_size=0`, `rank_pattern['q_proj']=0`, `targets: ...`);
    say the option instead (`--batch-size=0`, `--rank-pattern['q_proj']=0`, `--targets: ...`)."""
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if not long or action.dest in ("help", argparse.SUPPRESS):
            continue
        if action.nargs == 0 and action.const is True:  # a store_true flag: `force=True` is `--force`
            message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}=True\b", long[0], message)
        message = re.sub(rf"(?<![\w-]){re.escape(action.dest)}(?=[=\[])", long[0], message)
        message = re.sub(rf"(?m)^(\s*- )?{re.escape(action.dest)}:", rf"\g<1>{long[0]}:", message)  # `targets: ...`
    return message
