"""A study's runs: each arm's learning-rate sweep, then its grid of ranks x data sizes x seeds at the chosen
learning rate; each run's TrainConfig, folder and config hash (what makes a finished run recognisable)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..training.config import TrainConfig
from .spec import Arm, StudySpec

# Fields that do not change what a run computes: left out of its hash.
UNHASHED = ("out", "progress", "resume", "report_to")


@dataclass(frozen=True)
class Run:
    """One `lorakit train` run of a study."""

    arm: str
    rank: int  # 0 for full fine-tuning
    data_size: int  # training examples (0: all)
    lr: float
    seed: int
    config: TrainConfig

    @property
    def name(self) -> str:
        size = "all" if self.data_size == 0 else self.data_size
        rank = "" if self.config.full else f"-r{self.rank}"
        return f"{self.arm}{rank}-n{size}-lr{self.lr:g}-s{self.seed}"

    @property
    def folder(self) -> Path:
        return Path(self.config.out)

    @property
    def key(self) -> str:
        return config_hash(self.config)


def config_hash(config: TrainConfig | dict) -> str:
    """sha256 of the config's fields that change results (not its folder or progress bar), as JSON."""
    fields = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
    for name in UNHASHED:
        fields.pop(name, None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_run(spec: StudySpec, arm: Arm, rank: int, data_size: int, lr: float, seed: int, out: Path) -> Run:
    train = spec.train
    lora = train.lora if arm.full else train.lora.replace(rank=rank, targets=arm.targets or None)
    config = dataclasses.replace(train, lora=lora, full=arm.full, lr=lr, seed=seed, train_examples=data_size)
    run = Run(arm.name, rank, data_size, lr, seed, config)
    return dataclasses.replace(run, config=dataclasses.replace(config, out=str(Path(out) / spec.runs_dir / run.name)))


def swept(arm: Arm) -> bool:
    """Whether the arm chooses among learning rates itself."""
    return arm.lr_from is None and len(arm.lrs) > 1


def sweep_runs(spec: StudySpec, out: Path) -> list[Run]:
    """Every arm's learning rates, at its sweep rank, the sweep's data size and seed."""
    return [make_run(spec, arm, arm.sweep_rank, spec.sweep_data_size, lr, spec.sweep_seed, out)
            for arm in spec.arms if swept(arm) for lr in arm.lrs]


def grid_runs(spec: StudySpec, lrs: dict[str, float], out: Path) -> list[Run]:
    """Each arm's ranks x data sizes x seeds at its chosen learning rate (`lrs`, by arm name); seed by seed, so
    that a study stopped early has every cell at fewer seeds rather than some cells at none."""
    runs = [make_run(spec, arm, rank, size, lrs[arm.name], seed, out)
            for arm in spec.arms for size in arm.data_sizes for rank in arm.ranks for seed in arm.seeds]
    return sorted(runs, key=lambda run: run.seed)  # stable: arms, sizes and ranks keep their order


def choose_lrs(spec: StudySpec, sweep_scores: dict[str, dict[float, float]], higher_is_better: bool
               ) -> dict[str, float]:
    """Each arm's learning rate: its only one, the best of its sweep by held-out metric, or lr_from's."""
    chosen: dict[str, float] = {}
    for arm in spec.arms:
        if swept(arm):
            scores = sweep_scores[arm.name]
            chosen[arm.name] = (max if higher_is_better else min)(scores, key=scores.get)
        elif arm.lr_from is None:
            chosen[arm.name] = arm.lrs[0]
    for arm in spec.arms:
        if arm.lr_from is not None:
            chosen[arm.name] = chosen[arm.lr_from]
    return chosen
