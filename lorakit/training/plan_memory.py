"""Peak training memory per process: one process, DDP replicas, or FSDP2 shards.

Each of N = world_size processes runs batch / N examples. Bytes at the step's peak, per process:

  single  weights + states + max(step, gradients + adamw)
  ddp     weights + states + buckets + max(step, gradients + adamw)
  fsdp    shard(weights) + shard(states)
            + max(step_no_grads + shard(gradients) + gathered + reduce_scatter,
                  shard(gradients) + shard(adamw))
          (the gradients' shards counted as all alive at the step's peak: at most shard(gradients) high)

  weights         every parameter and buffer as stored, tied ones once                     counted
  gradients       the trainable parameters' bytes                                          counted
  states          AdamW's exp_avg and exp_avg_sq (2 x gradients) and a float32 step each   counted
  adamw           2 x the largest trainable tensor: AdamW's per-tensor temporaries         modelled
  step            the peak of what forward and backward create on batch / N examples:
                  activations, transients, gradients as they appear (plan_trace)           traced
  step_no_grads   the same peak without the parameters' gradients                          traced
  buckets         DDP's Reducer: a flat copy of every trainable gradient, made when the
                  model is wrapped (bucket_cap_mb, 25 MiB, sets how many buckets, not
                  their total; none with gradient_as_bucket_view=True)                     modelled, checked
  shard(x)        FSDP2 splits each parameter along dim 0 into N chunks of ceil(rows / N)
                  rows (the last ones smaller or empty) and each process allocates the
                  first's size: x / N plus padding under one row per parameter; buffers
                  are not sharded                                                          modelled, checked
  gathered        the full (padded) parameters of the root unit (embeddings, final norm,
                  output head: used first and last, gathered for the whole step) and of
                  two decoder-layer units (reshard_after_forward=True: the one computing
                  and the next, whose all-gather is prefetched)                            modelled
  reduce_scatter  the largest unit's trainable gradients, unsharded and as the
                  reduce-scatter's input (2 x) before each process keeps its shard         modelled

FSDP's units are each decoder layer (`fully_shard(layer)`) and the root (`fully_shard(model)`, with
FSDP2's default for a root: kept gathered after forward, as lorakit's loss applies the output head after
the model's forward). Checked: on two gloo processes with torch's fully_shard and DistributedDataParallel
(tests/test_plan_memory.py), the shards' and buckets' bytes exactly, and the peak within 10%.
Not counted: the communication library's own buffers, the CUDA context and allocator slack, DDP's one-off
broadcast of the weights when the model is wrapped (up to 250 MiB), FSDP2 mixed precision (parameters are
gathered as stored).
"""
from __future__ import annotations

import math

from torch import nn

from ..errors import LoraError
from .plan_trace import Trace, decoder_layers

STRATEGIES = ("single", "ddp", "fsdp")


def default_strategy(world_size: int) -> str:
    return "ddp" if world_size > 1 else "single"


def strategy_problems(world_size, strategy, batch, quantized: bool) -> list[str]:
    """What is wrong with running `batch` examples per step on `world_size` processes by `strategy`
    (None: default_strategy), each problem naming its field."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        return [f"world_size={world_size!r}: must be a positive integer (processes, e.g. 8 for one node of 8 GPUs)"]
    if strategy is not None and strategy not in STRATEGIES:
        return [f"strategy={strategy!r}: must be one of {', '.join(STRATEGIES)}"]
    problems = []
    if strategy == "single" and world_size > 1:
        problems.append(f"strategy='single' with world_size={world_size}: one process is world size 1; "
                        "give strategy ddp or fsdp")
    if strategy == "fsdp" and quantized:
        problems.append("strategy='fsdp': the planner models FSDP2 over float32/bfloat16/float16 bases, not "
                        "bitsandbytes' int8/nf4 layers; give a float base_dtype, or strategy ddp")
    if isinstance(batch, int) and batch % world_size:
        problems.append(f"batch={batch}: must be a multiple of world_size={world_size} (each process takes "
                        "batch / world_size examples)")
    return problems


def process_memory(model: nn.Module, trace: Trace, strategy: str, world_size: int) -> dict:
    """Bytes one of `world_size` processes holds, by term, when it trains `model` (its trainable
    parameters marked) by `strategy`; `trace` is the step on that process's share of the batch."""
    tensors = list({id(t): t for t in [*model.parameters(), *model.buffers()]}.values())  # tied ones once
    params = [t for t in tensors if isinstance(t, nn.Parameter)]
    buffers = [t for t in tensors if not isinstance(t, nn.Parameter)]
    trainable = [p for p in params if p.requires_grad]
    shards = world_size if strategy == "fsdp" else 1
    weights = sum(shard_bytes(p, shards) for p in params) + sum(nbytes(b) for b in buffers)
    gradients = sum(shard_bytes(p, shards) for p in trainable)
    states = 2 * gradients + 4 * len(trainable)
    adamw = 2 * max((shard_bytes(p, shards) for p in trainable), default=0)
    terms = {"gradient_bucket_bytes": gradients if strategy == "ddp" else 0, "gathered_parameter_bytes": 0,
             "reduce_scatter_bytes": 0}
    step = trace.peak
    if strategy == "fsdp":
        terms.update(_fsdp_transients(model, world_size))
        step = trace.peak_without_gradients + gradients + terms["gathered_parameter_bytes"] + \
            terms["reduce_scatter_bytes"]
    peak = weights + states + terms["gradient_bucket_bytes"] + max(step, gradients + adamw)
    return {"trainable_parameters": sum(p.numel() for p in trainable), "weights_bytes": weights,
            "gradient_bytes": gradients, "optimizer_state_bytes": states, "activation_bytes": trace.activations,
            **terms, "peak_bytes": peak}


def _fsdp_transients(model: nn.Module, world_size: int) -> dict:
    """FSDP2's gathered parameters and reduce-scatter buffers at the step's peak (see the module's notes)."""
    found = decoder_layers(model)
    if found is None:
        raise LoraError(f"strategy='fsdp': {type(model).__name__} has no list of its decoder layers to shard as units; "
                        "give strategy ddp")
    layers = [list(layer.parameters()) for layer in found]
    in_layers = {id(p) for layer in layers for p in layer}
    root = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_layers]
    units = [root, *layers]

    def full(params):  # the unsharded, padded bytes of `params`
        return world_size * sum(shard_bytes(p, world_size) for p in params)

    largest_layer = max((full(layer) for layer in layers), default=0)
    largest_gradients = max(full([p for p in unit if p.requires_grad]) for unit in units)
    return {"gathered_parameter_bytes": full(root) + 2 * largest_layer, "reduce_scatter_bytes": 2 * largest_gradients}


def shard_bytes(t, shards: int) -> int:
    """Bytes of the largest of `shards` dim-0 chunks of `t` (torch.chunk's, as FSDP2 allocates them)."""
    if shards == 1 or t.dim() == 0:
        return nbytes(t)
    return math.ceil(t.shape[0] / shards) * math.prod(t.shape[1:]) * t.element_size()


def nbytes(t) -> int:
    return t.numel() * t.element_size()
