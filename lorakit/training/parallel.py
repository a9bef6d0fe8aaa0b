"""How a model trains on several processes: torch's DDP or FSDP2, behind one small object the loop drives.

    ddp   every process holds the whole model; after backward the trainable gradients (the adapters';
          frozen weights have none) are all-reduced in buckets, overlapped with the backward pass.
    fsdp  FSDP2 (torch.distributed.fsdp.fully_shard): every parameter, frozen base included, is split
          across the processes in its own dtype, one unit per transformer block and one for the rest;
          a block's weights are all-gathered just before its forward and its backward and freed after,
          and the trainable gradients are reduce-scattered, so each process updates its own shard.

Both reduce gradients by summing, not averaging: the loss of each process is already its share of
the global batch's mean (train.py divides by the global count of targets).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..core.precision import quantized_kind
from ..errors import LoraError
from .distributed import World

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Parallel:
    """A model spread over the processes of `world` by `strategy` (None: one process, nothing spread).

    `model` is the model itself (FSDP shards it in place); `module` is what a training forward calls
    (DDP's wrapper, else the model).
    """

    model: nn.Module
    module: nn.Module
    strategy: str | None = None

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients accumulate locally and are reduced
        across processes only in the backward of the `last` micro-batch of a step."""
        if self.strategy == "ddp" and not last:
            with self.module.no_sync():
                yield
            return
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        yield

    @contextlib.contextmanager
    def gathered(self, world: World) -> Iterator[None]:
        """Every trainable parameter whole on rank 0 (on the CPU) for the block, so that the adapter can be
        written as one process would; the other ranks take part in the gathering and keep their shards.
        One parameter is gathered at a time. Nothing to do unless FSDP."""
        if self.strategy != "fsdp":
            yield
            return
        # A unit left whole (the root, after a forward without backward) would be re-sharded by FSDP's
        # state_dict hook as the adapter is written, undoing the swap below: shard every unit first.
        for unit in self.model.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()
        swapped, whole = [], {}
        for owner, name, param in trainable_slots(self.model):
            if id(param) not in whole:
                full = param.full_tensor() if isinstance(param, DTensor) else param.detach()  # collective
                whole[id(param)] = nn.Parameter(full.cpu(), param.requires_grad) if world.is_main else None
            if world.is_main:
                swapped.append((owner, name, param))
                owner._parameters[name] = whole[id(param)]
        try:
            yield
        finally:
            for owner, name, param in swapped:
                owner._parameters[name] = param


def strategy_for(requested: str | None, world: World) -> str | None:
    """The strategy a run uses: the one asked for; else ddp under torchrun, and none for one process alone."""
    if requested is not None and requested not in STRATEGIES:
        raise LoraError(f"strategy={requested!r}: must be one of {', '.join(STRATEGIES)}")
    if requested is not None and not world.distributed:
        raise LoraError(f"strategy={requested!r} needs processes started by torchrun, e.g. torchrun "
                        "--nproc_per_node 2 -m lorakit train ...; alone, leave the strategy out")
    return requested or ("ddp" if world.distributed else None)


def parallelize(model: nn.Module, strategy: str | None, world: World, unused_parameters: bool = False) -> Parallel:
    """Spread `model` (adapters injected, base frozen) over the processes of `world` by `strategy` (None: put
    it on this process's device, nothing more); build the optimizer afterwards, from the model's parameters
    then (FSDP replaces them by sharded ones).

    unused_parameters: some trainable parameters may get no gradient on some process in a step (a
    mixed-adapter batch in which one adapter is absent from a process's examples); DDP then looks for
    them after every forward, and FSDP reduces zeros for them.
    """
    if strategy is None:
        return Parallel(model.to(world.device), model)
    strategy_for(strategy, world)  # checked
    if strategy == "ddp":
        model.to(world.device)
        ddp = DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True, find_unused_parameters=unused_parameters)
        ddp.register_comm_hook(None, summed_all_reduce)
        return Parallel(model, ddp, strategy)
    shard_(model, world, unused_parameters)
    return Parallel(model, model, strategy)


def summed_all_reduce(group, bucket):  # no annotations: DDP checks them, and `from __future__` makes them strings
    """DDP's communication hook: its bucketed all-reduce, without the division by the number of processes
    ((process group or None, dist.GradBucket) -> Future of the bucket's summed tensor)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def shard_(model: nn.Module, world: World, unused_parameters: bool = False) -> nn.Module:
    """FSDP2 on `model`, in place: each transformer block a unit of its own, then the root (embeddings,
    final norm, output head, anything outside the blocks); gradients summed over processes."""
    kinds = {quantized_kind(m) for m in model.modules()} - {None}
    if "int8" in kinds:
        raise LoraError(f"base_dtype='int8' with strategy='fsdp': {INT8_UNSHARDABLE}")
    if kinds:
        # bitsandbytes moves a 4-bit weight's quantization state with the weight only through its own .to()
        model.to(world.device)
    mesh = init_device_mesh(world.device.type, (world.size,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)  # a plain sum, as DDP's hook above (no PREMUL_SUM:
            unit.set_force_sum_reduction_for_comms(True)  # gloo has none)
            unit.set_reduce_scatter_unused_params(unused_parameters, recurse=False)
    return model


INT8_UNSHARDABLE = (
    "bitsandbytes' Int8Params keeps the weight's scales (CB, SCB) on the parameter object, which FSDP replaces by "
    "a plain sharded Parameter, and Linear8bitLt's forward then fails ('Parameter' object has no attribute 'CB'); "
    "use strategy='ddp', or base_dtype='nf4' or 'bfloat16'")


def blocks(model: nn.Module) -> list[nn.Module]:
    """A transformer's blocks: the elements of its outermost nn.ModuleLists (Llama's model.layers, BERT's
    encoder.layer, GPT-2's transformer.h)."""
    found, inside = [], set()
    for module in model.modules():  # pre-order: a list comes before anything it holds
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            found += list(module)
            inside.update(id(m) for m in module.modules())
    return found


def trainable_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owning module, attribute name, parameter) for every place a trainable parameter is held."""
    return [(module, name, p) for module in model.modules()
            for name, p in module._parameters.items() if p is not None and p.requires_grad]


def gradient_norm(params: list[nn.Parameter], clip: float) -> float:
    """The global gradient norm over all processes, the gradients clipped to `clip` first (0: not clipped)."""
    total = nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    return float(total.full_tensor() if isinstance(total, DTensor) else total)
