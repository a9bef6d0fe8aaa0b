"""The training processes torchrun starts: joining them, and the collectives lorakit runs itself.

NCCL moves CUDA tensors only and gloo CPU ones, so every collective here goes through
`World.collective_device`: a tensor is copied there, reduced or gathered, and copied back. Also
here: each process's random-number state (the CPU generator and, on a GPU, that device's CUDA
generator), which a checkpoint saves per rank.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import torch
import torch.distributed as dist

# What torchrun sets in every process it starts (and a plain `python` run does not).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; backend None: one process, no process group."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" (CUDA) or "gloo" (CPU) once the process group is joined

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def collective_device(self) -> torch.device:
        """Where this backend's collectives take their tensors: the process's GPU for NCCL, else the CPU."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_world() -> World:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); one process otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not launched_by_torchrun():
        return World(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device, dist.get_backend())


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(world: World, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes, in place (returned for convenience), wherever it lives."""
    if world.distributed:
        moved = values.to(world.collective_device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not values:
            values.copy_(moved)
    return values


def all_gather(world: World, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `tensor` (the same shape and dtype on all), by rank, on the CPU."""
    if not world.distributed:
        return [tensor.cpu()]
    moved = tensor.to(world.collective_device)
    gathered = [torch.empty_like(moved) for _ in range(world.size)]
    dist.all_gather(gathered, moved)
    return [t.cpu() for t in gathered]


def shared_token(world: World) -> str:
    """A random name part, the same on every process (rank 0's); drawn without torch's RNG, which stays untouched."""
    token = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
    if world.distributed:
        moved = token.to(world.collective_device)
        dist.broadcast(moved, src=0)
        token = moved.cpu()
    return f"{int(token):016x}"


def barrier(world: World) -> None:
    if world.backend == "nccl":
        dist.barrier(device_ids=[world.device.index])  # NCCL's barrier runs on this process's own GPU
    elif world.distributed:
        dist.barrier()


# --- random-number state ------------------------------------------------------------------------
def rng_state(world: World) -> dict[str, torch.Tensor]:
    """This process's generators: "cpu", and "cuda" (its own device's) on a GPU; uint8 CPU tensors."""
    state = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(world.device)
    return state


def set_rng_state(world: World, state: dict[str, torch.Tensor]) -> None:
    """Put back what rng_state returned (a CUDA state is skipped on a CPU run, and the other way round)."""
    torch.set_rng_state(state["cpu"])
    if world.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], world.device)


def gather_rng(world: World) -> list[dict[str, torch.Tensor]]:
    """Every process's rng_state, by rank."""
    own = rng_state(world)
    by_kind = {kind: all_gather(world, tensor) for kind, tensor in own.items()}
    return [{kind: states[rank] for kind, states in by_kind.items()} for rank in range(world.size)]
