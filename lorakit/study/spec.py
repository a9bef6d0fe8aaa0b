"""StudySpec: what a study trains, as a spec file (TOML or YAML) or a dict states it, parsed and validated once.

    name = "minilm"
    seeds = [0, 1, 2]
    data_sizes = [50, 200, 0]          # training examples per run (0: all); an arm may give its own
    [train]                            # TrainConfig's and LoraConfig's fields, shared by every run
    model = "minilm-l6"
    steps = 80                         # every run gets the same number of optimiser steps
    [sweep]                            # each arm's learning rates are tried here; the best is used everywhere
    data_size = 200
    seed = 0
    [[arms]]
    name = "qv"
    targets = ["query", "value"]
    ranks = [8]
    lrs = [1e-3, 3e-3]
    [[arms]]
    name = "full"
    full = true
    lrs = [3e-5, 1e-4]

Every problem is reported together, each naming its field (`arms[1].ranks`), the bad value and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import LoraConfig
from ..errors import LoraError, problems_error
from ..training.config import TrainConfig

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"lora", "base", "out", "full", "lr", "seed",
                                                                       "train_examples", "resume", "progress"}
LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)} - {"rank", "targets"}
ARM_KEYS = {"name", "targets", "full", "ranks", "data_sizes", "lrs", "lr_from", "sweep_rank", "seeds"}
TOP_KEYS = {"name", "seeds", "data_sizes", "train", "sweep", "arms", "margin"}
QUICK_STEPS = 4


@dataclass(frozen=True)
class Arm:
    """One way to fine-tune: LoRA on a target set (at one or more ranks), or full fine-tuning."""

    name: str
    targets: tuple[str, ...] = ()  # none: the model's default targets (its attention projections)
    full: bool = False
    ranks: tuple[int, ...] = (0,)  # full fine-tuning has no rank: (0,)
    data_sizes: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0,)
    lrs: tuple[float, ...] = (2e-4,)
    lr_from: str | None = None  # use the learning rate chosen for that arm
    sweep_rank: int = 0  # the rank its learning rates are tried at (default: its first)


@dataclass(frozen=True)
class StudySpec:
    """A study: shared training options, the arms, and where learning rates are chosen."""

    name: str
    train: TrainConfig
    arms: tuple[Arm, ...]
    sweep_data_size: int = 0
    sweep_seed: int = 0
    margin: float = 0.01  # --suggest: how far below the best held-out result still counts
    source: str = field(default="", compare=False)
    runs_dir: str = "runs"  # the runs' folder inside the study's; quick() keeps its own


    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def quick(self) -> "StudySpec":
        """A smoke version: a few steps, the first two of every list, one seed."""
        arms = tuple(dataclasses.replace(a, ranks=a.ranks[:2], data_sizes=a.data_sizes[:2], seeds=a.seeds[:1],
                                         lrs=a.lrs[:2]) for a in self.arms)
        train = dataclasses.replace(self.train, steps=min(self.train.steps, QUICK_STEPS))
        return dataclasses.replace(self, train=train, arms=arms, runs_dir="runs-quick")


def load_spec(path: str | Path) -> StudySpec:
    """The spec in a .toml, .yaml/.yml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"spec={str(path)!r}: no such file; give a study spec (.toml, .yaml or .json)")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml  # only for YAML specs

            raw = yaml.safe_load(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise LoraError(f"spec={str(path)!r}: unknown format {path.suffix!r}; use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        raise LoraError(f"spec={str(path)!r}: not valid {path.suffix[1:].upper()}: {e}") from None
    return spec_from_dict(raw, source=str(path))


def spec_from_dict(raw: dict, source: str = "<dict>") -> StudySpec:
    """The spec a parsed file (or the command line's flags) describes; every problem in one LoraError."""
    if not isinstance(raw, dict):
        raise LoraError(f"{source}: the spec must be a table/mapping of fields, not {type(raw).__name__}")
    problems = [f"{k}: unknown field; known: {', '.join(sorted(TOP_KEYS))}" for k in raw if k not in TOP_KEYS]
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        problems.append(f"name={name!r}: must be a non-empty string, e.g. name = \"minilm\"")
    seeds = _int_list(raw, "seeds", (0,), problems, minimum=0)
    sizes = _int_list(raw, "data_sizes", (0,), problems, minimum=0)
    train = _train_config(raw.get("train", {}), problems)
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict) or set(sweep) - {"data_size", "seed"}:
        problems.append(f"sweep={sweep!r}: must be a table with data_size and/or seed, e.g. "
                        "[sweep] data_size = 200, seed = 0")
        sweep = {}
    sweep_size = _integer(sweep, "data_size", sizes[0] if sizes else 0, problems, "sweep.data_size", 0)
    sweep_seed = _integer(sweep, "seed", seeds[0] if seeds else 0, problems, "sweep.seed", 0)
    margin = raw.get("margin", 0.01)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
        problems.append(f"margin={margin!r}: must be a number >= 0 in the metric's units, e.g. 0.01")
    arms = _arms(raw.get("arms"), seeds, sizes, problems)
    if problems:
        raise problems_error(f"study spec {source}", problems)
    return StudySpec(name, train, arms, sweep_size, sweep_seed, float(margin), source)


# --- parts ---------------------------------------------------------------------------------------------
def _train_config(table, problems: list[str]) -> TrainConfig:
    if not isinstance(table, dict):
        problems.append(f"train={table!r}: must be a table of lorakit train options, e.g. [train] steps = 80")
        return TrainConfig()
    unknown = [k for k in table if k not in TRAIN_FIELDS | LORA_FIELDS]
    problems += [f"train.{k}: not a training option a study shares (run-specific ones come from the arms: rank, "
                 "targets, full, lr, seed, train_examples)" for k in unknown]
    lora = {k: _tuple(v) for k, v in table.items() if k in LORA_FIELDS}
    shared = {k: v for k, v in table.items() if k in TRAIN_FIELDS}
    try:
        return TrainConfig(lora=LoraConfig(**lora), progress=False, **shared)
    except LoraError as e:  # each of its problems, as `train.<field>...`
        lines = [line.strip().removeprefix("- ") for line in str(e).splitlines()[1:]] or [str(e)]
        problems += [f"train.{line}" for line in lines]
        return TrainConfig()


def _arms(raw, seeds: tuple, sizes: tuple, problems: list[str]) -> tuple[Arm, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"arms={raw!r}: give at least one arm, e.g. [[arms]] name = \"qv\", targets = "
                        "[\"q_proj\", \"v_proj\"], ranks = [8]")
        return ()
    arms = tuple(_arm(table, i, seeds, sizes, problems) for i, table in enumerate(raw))
    names = [a.name for a in arms if a is not None]
    problems += [f"arms[{i}].name={n!r}: given twice; each arm needs its own name" for i, n in enumerate(names)
                 if n in names[:i]]
    own = [a.name for a in arms if a is not None and a.lr_from is None]
    for i, a in enumerate(arms):
        if a is not None and a.lr_from is not None and a.lr_from not in own:
            problems.append(f"arms[{i}].lr_from={a.lr_from!r}: must name an arm with learning rates of its own: "
                            f"one of {', '.join(own)}")
    return tuple(a for a in arms if a is not None)


def _arm(table, i: int, seeds: tuple, sizes: tuple, problems: list[str]) -> Arm | None:
    where = f"arms[{i}]"
    if not isinstance(table, dict):
        problems.append(f"{where}={table!r}: must be a table with name, targets, ranks, lrs")
        return None
    before = len(problems)
    problems += [f"{where}.{k}: unknown field; known: {', '.join(sorted(ARM_KEYS))}" for k in table
                 if k not in ARM_KEYS]
    name, full = table.get("name"), table.get("full", False)
    if not isinstance(name, str) or not name or "/" in name:
        problems.append(f"{where}.name={name!r}: must be a non-empty string without '/', e.g. \"qv\"")
    if not isinstance(full, bool):
        problems.append(f"{where}.full={full!r}: must be true or false")
    targets = _tuple(table.get("targets", ()))
    if not isinstance(targets, tuple) or not all(isinstance(t, str) and t for t in targets):
        problems.append(f"{where}.targets={table.get('targets')!r}: must be a list of module names or globs, e.g. "
                        "[\"q_proj\", \"v_proj\"] (none: the model's default attention targets)")
    if full and targets:
        problems.append(f"{where}.targets: a full fine-tuning arm trains every weight; drop targets")
    ranks = (0,) if full else _int_list(table, "ranks", (8,), problems, 1, f"{where}.ranks")
    lrs = _float_list(table, "lrs", (TrainConfig().lr,), problems, f"{where}.lrs")
    lr_from = table.get("lr_from")
    if lr_from is not None and (not isinstance(lr_from, str) or "lrs" in table):
        problems.append(f"{where}.lr_from={lr_from!r}: the name of another arm, and then no lrs of its own")
    sweep_rank = _integer(table, "sweep_rank", ranks[0] if ranks else 0, problems, f"{where}.sweep_rank", 0)
    arm_sizes = _int_list(table, "data_sizes", sizes, problems, 0, f"{where}.data_sizes")
    arm_seeds = _int_list(table, "seeds", seeds, problems, 0, f"{where}.seeds")
    if len(problems) > before:
        return None
    return Arm(name, targets, full, ranks, arm_sizes, arm_seeds, lrs, lr_from, sweep_rank)


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def _int_list(table: dict, key: str, default: tuple, problems: list[str], minimum: int, where: str | None = None
              ) -> tuple[int, ...]:
    value = table.get(key, list(default))
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        problems.append(f"{where or key}={value!r}: must be a non-empty list of integers >= {minimum}, e.g. [1, 4, 16]")
        return default
    return tuple(value)


def _float_list(table: dict, key: str, default: tuple, problems: list[str], where: str) -> tuple[float, ...]:
    value = table.get(key, list(default))
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        problems.append(f"{where}={value!r}: must be a non-empty list of positive numbers, e.g. [1e-3, 3e-3]")
        return default
    return tuple(float(v) for v in value)


def _integer(table: dict, key: str, default: int, problems: list[str], where: str, minimum: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        problems.append(f"{where}={value!r}: must be an integer >= {minimum}")
        return default
    return value
