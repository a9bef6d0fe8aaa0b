"""lorakit.training.plan_memory: per-process memory under DDP and FSDP2 against one process's plan and against
real runs: two gloo processes that shard a tiny Llama with torch's fully_shard (their shards' bytes, and their
peak over two training steps counted with LiveBytes) or wrap it in DistributedDataParallel (its buckets)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.training.loss import summed_causal_lm_loss
from lorakit.training.plan import plan
from lorakit.training.plan_trace import LiveBytes

# Odd widths and vocabulary: FSDP pads the shards of their rows.
TINY = dict(vocab_size=1001, hidden_size=40, intermediate_size=75, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)
LORA = lk.LoraConfig(rank=3, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
WORLD, BATCH, SEQ = 2, 4, 64
MODES = ("lora", "full")
TERMS = ("weights_bytes", "gradient_bytes", "optimizer_state_bytes", "activation_bytes")


def planned(mode: str, **step) -> dict:
    return plan(LlamaConfig(**TINY), LORA, **{"batch": BATCH, "seq": SEQ, **step})[mode]


def tiny_model(mode: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    if mode == "lora":
        lk.inject_(model, LORA)
    return model.train()


# --- against one process's plan -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_fsdp_holds_a_1_over_n_shard_of_every_parameter_within_one_row_of_padding(mode, world_size):
    model = tiny_model(mode)
    params = {id(p): p for p in model.parameters()}.values()
    row_bytes = sum(p[0].numel() * p.element_size() for p in params)  # one row of each: the most padding adds
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    sharded = planned(mode, batch=BATCH * world_size, world_size=world_size, strategy="fsdp")
    for term, tensors in (("weights_bytes", params), ("gradient_bytes", [p for p in params if p.requires_grad])):
        whole = sum(p.numel() * p.element_size() for p in tensors)
        unsharded = buffers if term == "weights_bytes" else 0
        assert whole / world_size <= sharded[term] - unsharded < whole / world_size + row_bytes, term
    steps = [p["optimizer_state_bytes"] - 2 * p["gradient_bytes"] for p in (sharded, planned(mode))]
    assert steps[0] == steps[1]  # AdamW's step counts: one per tensor, not sharded


@pytest.mark.parametrize("mode", MODES)
def test_ddp_holds_what_one_process_does_plus_a_copy_of_the_gradients(mode):
    each = planned(mode, batch=BATCH // WORLD)  # one process with its share of the batch
    ddp = planned(mode, world_size=WORLD, strategy="ddp")
    assert {t: ddp[t] for t in TERMS} == {t: each[t] for t in TERMS}
    assert ddp["gradient_bucket_bytes"] == ddp["gradient_bytes"]
    assert ddp["peak_bytes"] == each["peak_bytes"] + ddp["gradient_bucket_bytes"]


@pytest.mark.parametrize("mode", MODES)
def test_one_process_of_ddp_or_fsdp_is_one_process_plus_their_own_terms(mode):
    single, ddp, fsdp = (planned(mode, strategy=s) for s in ("single", "ddp", "fsdp"))
    assert {**ddp, "gradient_bucket_bytes": 0, "peak_bytes": single["peak_bytes"]} == single
    assert ddp["peak_bytes"] == single["peak_bytes"] + ddp["gradient_bucket_bytes"]
    own = fsdp["gathered_parameter_bytes"] + fsdp["reduce_scatter_bytes"]
    assert {**fsdp, "gathered_parameter_bytes": 0, "reduce_scatter_bytes": 0,
            "peak_bytes": single["peak_bytes"]} == single
    # FSDP counts every gradient shard as alive at the step's peak: at most all the gradients more.
    assert single["peak_bytes"] + own <= fsdp["peak_bytes"] <= single["peak_bytes"] + own + single["gradient_bytes"]


# --- against real runs on two processes ------------------------------------------------------------------
def run_sharded(rank: int, port: int, queue) -> None:
    """On each of WORLD gloo processes: the tiny Llama sharded by fully_shard (each decoder layer a unit, then
    the root) as plan_memory assumes, its shards' bytes and the peak of two training steps; and wrapped in
    DDP, the bytes that wrapping allocates."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    found = {}
    for mode in MODES:
        model = tiny_model(mode)
        for layer in model.model.layers:
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(model)  # the root keeps its default: gathered after forward, as the loss uses its head
        held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        found[mode] = {"parameters": held, "peak": held + sum(b.numel() * b.element_size() for b in model.buffers())
                       + _training_peak(model, rank)}
        replica = tiny_model(mode)
        with LiveBytes() as wrapping:
            wrapped = DistributedDataParallel(replica)
            found[mode]["ddp_wrapping"] = wrapping.live  # what wrapping allocated and keeps while `wrapped` lives
        del wrapped
    queue.put((rank, found))
    dist.destroy_process_group()


def _training_peak(model, rank: int) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, TINY["vocab_size"], (BATCH // WORLD, SEQ), generator=torch.Generator().manual_seed(rank))
    with LiveBytes() as counter:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            summed_causal_lm_loss(model, {"input_ids": ids, "attention_mask": None, "labels": ids}).backward()
            optimizer.step()
    return counter.peak


@pytest.fixture(scope="module")
def measured() -> dict[int, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(run_sharded, args=(port, queue), nprocs=WORLD, start_method="fork")  # about 3 s
    return dict(queue.get() for _ in range(WORLD))


@pytest.mark.parametrize("mode", MODES)
def test_fsdp_shards_are_the_planned_ones(measured, mode):
    predicted, model = planned(mode, world_size=WORLD, strategy="fsdp"), tiny_model(mode)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    shards = [measured[rank][mode]["parameters"] for rank in range(WORLD)]
    assert shards[0] == predicted["weights_bytes"] - buffers  # rank 0 holds the largest chunk of every parameter
    assert max(shards) == shards[0] and sum(shards) == whole


@pytest.mark.parametrize("mode", MODES)
def test_fsdp_peak_is_within_10_percent_of_two_real_training_steps(measured, mode):
    predicted = planned(mode, world_size=WORLD, strategy="fsdp")
    for rank in range(WORLD):  # the planner 2.6% below (LoRA) and 7.9% above (full)
        peak = measured[rank][mode]["peak"]
        assert abs(predicted["peak_bytes"] - peak) <= 0.1 * peak, (rank, predicted["peak_bytes"], peak)


@pytest.mark.parametrize("mode", MODES)
def test_ddp_buckets_are_the_planned_ones(measured, mode):
    predicted = planned(mode, world_size=WORLD, strategy="ddp")
    assert all(measured[rank][mode]["ddp_wrapping"] == predicted["gradient_bucket_bytes"] for rank in range(WORLD))
