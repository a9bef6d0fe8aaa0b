"""lorakit.training.parallel: DDP and FSDP2 against one process, for mixed-adapter batches with gradient
accumulation, in two gloo processes on the CPU (torch.multiprocessing); the transformer blocks FSDP shards."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import lorakit as lk
import tiny
from lorakit.training.distributed import World, close_world, init_world
from lorakit.training.parallel import blocks, parallelize, shard_, strategy_for

NAMES = ["a", "a", "a", "b"]  # the global batch's adapters: rank 0 gets a, a; rank 1 gets a, b
STEPS, LR = 2, 0.5


def two_adapter_model(model_dir: Path) -> torch.nn.Module:
    """A tiny Llama with adapters a (rank 4) and b (rank 2) on q_proj and v_proj, B non-zero; seeded alike everywhere."""
    model = lk.load_model(model_dir)[0]
    torch.manual_seed(0)
    lk.inject_(model, lk.LoraConfig(rank=4, targets=("q_proj", "v_proj")), adapter="a")
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("q_proj", "v_proj")), adapter="b")
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.B.normal_(std=0.1)
    return model.train()


def batch_rows(step: int) -> torch.Tensor:
    """The global batch of step `step`: (4, 8) token ids."""
    return torch.randint(4, 60, (len(NAMES), 8), generator=torch.Generator().manual_seed(step))


def loss_of(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed over the rows given, divided by the global batch's row count (so processes' shares add up)."""
    return module(input_ids=ids).logits.float().square().mean(dim=(1, 2)).sum() / len(NAMES)


def trained_alone(model_dir: Path) -> dict[str, torch.Tensor]:
    """The reference: one process, the whole global batch in one forward."""
    model = two_adapter_model(model_dir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        with lk.mixed_batch(model, NAMES):
            loss_of(model, batch_rows(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def worker(rank: int, port: int, model_dir: Path, out: Path) -> None:
    """One of two processes: each strategy in turn, 2 rows per process as 2 micro-batches of 1 row."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = init_world()
    try:
        for strategy in ("ddp", "fsdp"):
            model = two_adapter_model(model_dir)
            parallel = parallelize(model, strategy, world, unused_parameters=True)  # rank 0 never runs b
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
            for step in range(STEPS):
                mine = range(2 * rank, 2 * rank + 2)
                for i, row in enumerate(mine):
                    with parallel.micro_batch(last=i == 1), lk.mixed_batch(model, [NAMES[row]]):
                        loss_of(parallel.module, batch_rows(step)[row:row + 1]).backward()
                optimizer.step()
                optimizer.zero_grad()
            with parallel.gathered(world):
                if world.is_main:
                    save_file({name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad},
                              out / f"{strategy}.safetensors")
    finally:
        close_world(world)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp_train_mixed_batches_with_accumulation_as_one_process_does(tmp_path):
    model_dir = tiny.causal_lm_dir(tmp_path / "lm")
    mp.spawn(worker, args=(free_port(), model_dir, tmp_path), nprocs=2)
    expected = trained_alone(model_dir)
    assert any("adapters.b" in name for name in expected)
    for strategy in ("ddp", "fsdp"):
        got = load_file(tmp_path / f"{strategy}.safetensors")
        assert got.keys() == expected.keys()
        for name in expected:  # float32 sums in another order; a lost or doubled share is off by ~1e-2
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=f"{strategy}: {name}")


def test_blocks_are_the_repeated_layers(tmp_path):
    llama = lk.load_model(tiny.causal_lm_dir(tmp_path / "lm"))[0]
    assert blocks(llama) == list(llama.model.layers)
    bert = lk.load_model(tiny.encoder_dir(tmp_path / "bert"))[0]
    assert blocks(bert) == list(bert.encoder.layer)


def test_strategies_are_checked_before_anything_is_spread():
    alone, launched = World(), World(backend="gloo")
    assert strategy_for(None, alone) is None and strategy_for(None, launched) == "ddp"
    assert strategy_for("fsdp", launched) == "fsdp"
    with pytest.raises(lk.LoraError, match="strategy='fsdp' needs processes started by torchrun"):
        strategy_for("fsdp", alone)
    with pytest.raises(lk.LoraError, match="strategy='zero3': must be one of ddp, fsdp"):
        strategy_for("zero3", launched)


def test_an_int8_base_is_refused_by_fsdp_with_the_reason(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = lk.load_base(str(tiny.causal_lm_dir(tmp_path / "lm")), "int8")
    with pytest.raises(lk.LoraError, match="int8.*Int8Params keeps the weight's scales.*strategy='ddp'"):
        shard_(model, World(backend="gloo"))
