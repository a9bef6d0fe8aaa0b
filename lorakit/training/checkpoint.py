"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

A checkpoint is a folder `checkpoints/step-N/` built under a temporary name and renamed into
place; `checkpoints/latest` names the newest complete one and is replaced atomically after it,
so a run killed at any moment (even by SIGKILL mid-write) leaves the previous checkpoint intact.
Only JSON and safetensors are written and read: no pickle.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LoraError
from ..io.files import write_text_atomically

CHECKPOINTS = "checkpoints"
LATEST = "latest"


@dataclass
class TrainingState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    weights: dict[str, torch.Tensor]  # trainable parameters by name
    optimizer: dict  # torch optimizer state_dict
    scheduler: dict
    rng: list[torch.Tensor]  # torch CPU RNG state of each process, by rank
    data: dict  # BatchStream.state_dict()
    extra: dict  # JSON-serialisable trainer bookkeeping (best metric, bad-step count, ...)


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (a tied parameter once, under its first name)."""
    seen, found = set(), {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            found[name] = p.detach().cpu().contiguous()
    return found


def save_checkpoint(run_dir: Path, state: TrainingState, keep: int = 2, write_extra=None) -> Path:
    """Write `state` as checkpoints/step-N, point `latest` at it, and keep the newest `keep`.

    `write_extra(folder)` may add files (e.g. the adapter in PEFT's layout) before the rename.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step}"
    tmp = root / f".{name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        save_file(state.weights, tmp / "weights.safetensors")
        tensors, groups = _flatten_optimizer(state.optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        save_file({f"rank{i}": r for i, r in enumerate(state.rng)}, tmp / "rng.safetensors")
        meta = {"step": state.step, "optimizer_param_groups": groups, "scheduler": state.scheduler,
                "data": state.data, "extra": state.extra}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        if write_extra is not None:
            write_extra(tmp)
        _fsync_tree(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomically(root / LATEST, name + "\n")
    _prune(root, keep)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a run folder, its checkpoints folder, or the checkpoint itself."""
    path = Path(path)
    for root in (path / CHECKPOINTS, path):
        if (root / LATEST).is_file():
            return root / (root / LATEST).read_text().strip()
    if (path / "state.json").is_file():
        return path
    raise LoraError(f"resume={str(path)!r}: no checkpoint there; pass the --out folder of an earlier run "
                    f"(it holds {CHECKPOINTS}/{LATEST}) or a {CHECKPOINTS}/step-N folder")


def load_checkpoint(path: str | os.PathLike) -> TrainingState:
    folder = find_checkpoint(path)
    try:
        meta = json.loads((folder / "state.json").read_text())
        weights = load_file(folder / "weights.safetensors")
        optimizer = _unflatten_optimizer(load_file(folder / "optimizer.safetensors"), meta["optimizer_param_groups"])
        rng_file = load_file(folder / "rng.safetensors")
    except (OSError, ValueError, KeyError) as err:
        raise LoraError(f"{folder}: unreadable checkpoint ({err}); resume from an earlier one") from None
    rng = [rng_file[f"rank{i}"] for i in range(len(rng_file))]
    return TrainingState(meta["step"], weights, optimizer, meta["scheduler"], rng, meta["data"], meta["extra"])


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, slots in state_dict["state"].items():
        for key, value in slots.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{key}"] = tensor.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = tensor
    return {"state": state, "param_groups": groups}


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints, and leftovers of interrupted writes."""
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
