"""Training checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

    checkpoints/step-N/
        state.json         step, scheduler, data position, bookkeeping, the optimizer's param groups
        rng.safetensors    every process's generators: rank{i}.cpu, and rank{i}.cuda on GPUs
        trainable/         trainable weights and optimizer state, written by torch.distributed.checkpoint
                           (DCP): each process writes the shards it holds (FSDP), or rank 0 all (one
                           process, DDP); a file's JSON header says where in the whole tensor its shards lie
        adapter/           the adapter, in PEFT's layout (written by the caller, rank 0)

The folder is built under a temporary name and renamed into place; `checkpoints/latest` names the
newest complete one and is replaced atomically after it, so a run killed at any moment (even by
SIGKILL mid-write, on any rank) leaves the previous checkpoint intact. DCP reshards on load: a
checkpoint resumes on another number of processes or another strategy. Under several processes the
run folder must be one filesystem they all see (a shared one across nodes).

Only JSON and safetensors are written and read: no pickle. (DCP's default layout keeps its metadata in
a pickle file, `.metadata`; its safetensors layout, HuggingFaceStorageWriter/Reader, is used instead.
While saving and loading, DCP's processes agree on a plan through torch.distributed's object
collectives, which pickle in memory between the run's own processes; nothing pickled touches disk.)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter

from ..errors import LoraError
from ..io.files import write_text_atomically
from .distributed import World, barrier, shared_token

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINABLE = "trainable"
FORMAT = 2  # 2: the DCP folder `trainable/`; 1 (no "format" in state.json): weights/optimizer.safetensors


@dataclass
class TrainingState:
    """Everything besides the trainable tensors needed to continue a run exactly where it stopped."""

    step: int
    scheduler: dict
    data: dict  # BatchStream.state_dict()
    extra: dict  # JSON-serialisable trainer bookkeeping (best metric, bad-step count, ...)
    optimizer_groups: list[dict]  # the optimizer's hyperparameters, by param group (optimizer_groups)
    rng: list[dict[str, torch.Tensor]]  # each process's generators (distributed.rng_state), by rank


# --- the trainable tensors ----------------------------------------------------------------------
def trainable_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"weights": {name: tensor}, "optimizer": {name: {slot: tensor}}}: the live trainable parameters (sharded
    DTensors under FSDP) and the optimizer's state of each, by parameter name (the unwrapped model's)."""
    named = _trainable(model)
    return {"weights": {name: p.detach() for name, p in named},
            "optimizer": {name: dict(optimizer.state[p]) for name, p in named if p in optimizer.state}}


def restore_trainable_(world: World, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                       groups: list[dict]) -> None:
    """Load a checkpoint's trainable weights and optimizer state into `model` and `optimizer`, each process
    its own shards, whatever number of processes wrote them; `groups`: the optimizer's hyperparameters
    (TrainingState.optimizer_groups). Every process calls it."""
    if len(groups) != len(optimizer.param_groups):
        raise LoraError(f"resume={str(path)!r}: the checkpoint's optimizer has {len(groups)} parameter group(s), this "
                        f"run's {len(optimizer.param_groups)}; resume with the same options (e.g. --lora-plus-ratio)")
    folder = find_checkpoint(path)
    named = dict(_trainable(model))
    stored = HuggingFaceStorageReader(str(folder / TRAINABLE)).read_metadata().state_dict_metadata
    saved_names = {key.removeprefix("weights.") for key in stored if key.startswith("weights.")}
    if saved_names != named.keys():
        different = sorted(saved_names ^ named.keys())[:3]
        raise LoraError(f"resume={str(path)!r}: the checkpoint's trainable weights do not match this run's (e.g. "
                        f"{different}); resume with the same model, task and LoRA options")
    state = {name: {slot: _like(p, stored[f"optimizer.{name}.{slot}"]) for slot in _slots(stored, name)}
             for name, p in named.items()}
    tensors = {"weights": {name: p.detach() for name, p in named.items()},
               "optimizer": {name: slots for name, slots in state.items() if slots}}
    load_tensors_(world, folder, tensors)
    for name, slots in tensors["optimizer"].items():
        optimizer.state[named[name]] = slots
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(saved)


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's hyperparameters (lr, betas, ...) of each param group, JSON-ready."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters by name (a tied parameter once, under its first name)."""
    seen, found = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            found.append((name, p))
    return found


def _slots(stored: dict, name: str) -> list[str]:
    """The optimizer state slots (exp_avg, step, ...) stored for parameter `name`."""
    prefix = f"optimizer.{name}."
    return [key[len(prefix):] for key in stored if key.startswith(prefix) and "." not in key[len(prefix):]]


def _like(param: torch.Tensor, meta) -> torch.Tensor:
    """An empty slot to load into: shaped (and sharded) like `param` where the stored slot is, else a plain
    CPU tensor (a scalar such as AdamW's step)."""
    if tuple(meta.size) == tuple(param.shape):
        return torch.zeros_like(param, dtype=meta.properties.dtype)
    return torch.zeros(meta.size, dtype=meta.properties.dtype)


# --- writing ------------------------------------------------------------------------------------
def save_checkpoint(world: World, run_dir: Path, state: TrainingState, tensors: dict, keep: int = 2,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoints/step-N, point `latest` at it, and keep the newest `keep`. Every process calls it.

    `tensors` (trainable_tensors) go through DCP, each process writing what it holds; rank 0 writes the
    rest. `write_extra(folder)` runs on every process before the rename (e.g. rank 0 writes the adapter
    in PEFT's layout there, the others help gather it).
    """
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{state.step}"
    tmp, final = root / f".{name}.{shared_token(world)}.tmp", root / name
    try:
        if world.is_main:
            (tmp / TRAINABLE).mkdir(parents=True)
        barrier(world)
        _save_tensors(world, tensors, tmp / TRAINABLE)
        if write_extra is not None:
            write_extra(tmp)
        if world.is_main:
            _write_state(tmp, state)
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if world.is_main:
        write_text_atomically(root / LATEST, name + "\n")
        _prune(root, keep)
    barrier(world)  # nobody goes on (or resumes, or exits) before the checkpoint is complete
    return final


def _save_tensors(world: World, tensors: dict, folder: Path) -> None:
    writer = HuggingFaceStorageWriter(str(folder), save_distributed=True)  # one file per writing process
    planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)  # a tensor every process holds: rank 0 writes it
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=writer, planner=planner, no_dist=not world.distributed)


def _write_state(folder: Path, state: TrainingState) -> None:
    rng = {f"rank{rank}.{kind}": tensor.contiguous() for rank, states in enumerate(state.rng)
           for kind, tensor in states.items()}
    save_file(rng, folder / "rng.safetensors")
    meta = {"format": FORMAT, "step": state.step, "scheduler": state.scheduler, "data": state.data,
            "extra": state.extra, "optimizer_groups": state.optimizer_groups}
    (folder / "state.json").write_text(json.dumps(meta, indent=2))


# --- reading ------------------------------------------------------------------------------------
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
    """The state (not the trainable tensors: load_tensors_) of the checkpoint find_checkpoint(path) finds."""
    folder = find_checkpoint(path)
    try:
        meta = json.loads((folder / "state.json").read_text())
        flat = load_file(folder / "rng.safetensors") if meta.get("format") == FORMAT else {}
    except (OSError, ValueError) as err:
        raise LoraError(f"{folder}: unreadable checkpoint ({err}); resume from an earlier one") from None
    if meta.get("format") != FORMAT:
        raise LoraError(f"{folder}: a checkpoint of an older lorakit (format {meta.get('format', 1)}; this "
                        f"one reads {FORMAT}); resume it with that version, or start the run again")
    rng: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        rank, kind = key.removeprefix("rank").split(".", 1)
        rng.setdefault(int(rank), {})[kind] = tensor
    return TrainingState(meta["step"], meta["scheduler"], meta["data"], meta["extra"], meta["optimizer_groups"],
                         [rng[rank] for rank in sorted(rng)])


def load_tensors_(world: World, folder: Path, tensors: dict) -> None:
    """Fill `tensors` (trainable_tensors' layout, sharded or not) in place from the checkpoint `folder`,
    written by any number of processes. Every process calls it."""
    reader = HuggingFaceStorageReader(str(folder / TRAINABLE))
    try:
        with _quiet_single_process():
            dcp.load(tensors, storage_reader=reader, no_dist=not world.distributed)
    except (OSError, RuntimeError, ValueError) as err:  # DCP wraps a missing key or bad file in a CheckpointException
        raise LoraError(f"{folder}: the checkpoint's trainable tensors do not fit this run ({_first_line(err)}); "
                        "resume with the same model, task and LoRA options") from None


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable tensors, whole, by their stored names ("weights.NAME", "optimizer.NAME.SLOT"),
    read in this one process whoever wrote them (for inspection and tests)."""
    folder = find_checkpoint(path)
    stored = HuggingFaceStorageReader(str(folder / TRAINABLE)).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()}
    load_tensors_(World(), folder, tensors)
    return tensors


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: here, as meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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
