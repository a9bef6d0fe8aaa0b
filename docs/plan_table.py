"""The README's tables of which Llama fits where, and of per-GPU memory under FSDP: lorakit's planner on
published Llama configs (lorakit.training.plan_models.PUBLISHED), printed as markdown. No weights are loaded
or allocated (the planner's dry run is on fake tensors).

    python docs/plan_table.py            # about six minutes on two CPU cores

Which fits where: LoRA rank 8 on q_proj and v_proj, batch 1 x 2048 tokens, gradient checkpointing on, no
autocast (the base's dtype computes), for each base dtype. Per GPU: LoRA rank 16 on q_proj, k_proj, v_proj
and o_proj, bfloat16 autocast, the 8B and 70B on FSDP over 8 and 16 processes with a bfloat16 base, or on one
GPU with a bfloat16 or nf4 base, at 1 and 4 examples per GPU of 4096 and 8192 tokens.
"""
from __future__ import annotations

import time

from lorakit import BASE_DTYPES, LoraConfig
from lorakit.training.plan import plan
from lorakit.training.plan_models import PUBLISHED, published_config

LORA = LoraConfig(rank=8, targets=("q_proj", "v_proj"))
STEP = dict(batch=1, seq=2048, grad_checkpointing=True, full=False)
MEMORY_GIB = (8, 24, 80)
GIB = 2 ** 30

PER_GPU_LORA = LoraConfig(rank=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
PER_GPU_MODELS = ("llama-3.1-8b", "llama-3.1-70b")
LAYOUTS = {  # column: (processes, strategy, base dtype)
    "FSDP, 8 GPUs": (8, "fsdp", "bfloat16"), "FSDP, 16 GPUs (2 x 8)": (16, "fsdp", "bfloat16"),
    "1 GPU, bf16 base": (1, "single", "bfloat16"), "1 GPU, nf4 base": (1, "single", "nf4")}


def peaks() -> dict[str, dict[str, int]]:
    """model -> base dtype -> predicted peak training bytes."""
    return {name: {dtype: plan(published_config(name), LORA, base=dtype, **STEP)["lora"]["peak_bytes"]
                   for dtype in BASE_DTYPES} for name in PUBLISHED}


def peak_table(found: dict[str, dict[str, int]]) -> str:
    rows = ["| model | " + " | ".join(BASE_DTYPES) + " |", "|---|" + "---:|" * len(BASE_DTYPES)]
    rows += [f"| {name} | " + " | ".join(f"{found[name][d] / GIB:.1f}" for d in BASE_DTYPES) + " |" for name in found]
    return "\n".join(rows)


def fits_table(found: dict[str, dict[str, int]]) -> str:
    """The largest model (of PUBLISHED, in order of size) whose predicted peak is at most each memory size."""
    rows = ["| base dtype | " + " | ".join(f"{gib} GiB" for gib in MEMORY_GIB) + " |", "|---|" + "---|" * len(MEMORY_GIB)]
    for dtype in BASE_DTYPES:
        cells = []
        for gib in MEMORY_GIB:
            fitting = [name for name in found if found[name][dtype] <= gib * GIB]
            cells.append(f"{fitting[-1]} ({found[fitting[-1]][dtype] / GIB:.1f})" if fitting else "none")
        rows.append(f"| {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_gpu_table() -> str:
    """Predicted peak GiB per GPU for each model, sequence, examples per GPU and gradient checkpointing."""
    rows = ["| model | tokens | per GPU | grad ckpt | " + " | ".join(LAYOUTS) + " |", "|---|---:|---:|---|" +
            "---:|" * len(LAYOUTS)]
    for name in PER_GPU_MODELS:
        for seq in (4096, 8192):
            for each in (1, 4):
                for checkpointing in (False, True):
                    cells = [plan(name, PER_GPU_LORA, batch=each * processes, seq=seq, base=dtype, bf16=True,
                                  grad_checkpointing=checkpointing, world_size=processes, strategy=strategy,
                                  full=False)["lora"]["peak_bytes"] / GIB
                             for processes, strategy, dtype in LAYOUTS.values()]
                    rows.append(f"| {name} | {seq} | {each} | {'on' if checkpointing else 'off'} | " +
                                " | ".join(f"{cell:.1f}" for cell in cells) + " |")
    return "\n".join(rows)


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NOT_K = LoraConfig(rank=8, alpha=16, targets=tuple(t for t in ALL_LINEAR if t != "k_proj"), adapter_dtype="bfloat16")
# Published peak memory per GPU, with the settings their sources give, and the planner on the same settings.
# (source and settings, what it reports, the planner's arguments)
PUBLISHED_PEAKS = [
    ("torchtune README @0031bfb, Llama 3.1 70B LoRA, 8x A100 (70B_lora.yaml @2bd6906: r16 q,k,v, bf16, act. ckpt, "
     "batch 2 x 2048 packed, compiled)", "27.6 GiB",
     dict(model="llama-3.1-70b", lora=LoraConfig(rank=16, alpha=32, targets=("q_proj", "k_proj", "v_proj"),
                                                 adapter_dtype="bfloat16"),
          batch=16, seq=2048, base="bfloat16", bf16=True, grad_checkpointing=True, world_size=8, strategy="fsdp")),
    ("torchtune README @0031bfb, Llama 3.1 8B QLoRA, 1x 4090 (8B_qlora_single_device.yaml @0b3e04a: r8 all linear, "
     "act. ckpt, batch 2 x 2048 packed, compiled)", "7.4 GiB",
     dict(model="llama-3.1-8b", lora=LoraConfig(rank=8, alpha=16, targets=ALL_LINEAR, adapter_dtype="bfloat16"),
          batch=2, seq=2048, base="nf4", bf16=True, grad_checkpointing=True)),
    ("torchtune README @0031bfb, Llama 3.1 8B LoRA, 1x 4090 / 1x A6000 (8B_lora_single_device.yaml @2943c61: r8 "
     "q,v,o + MLP, act. ckpt on in the config, batch 2 x 2048 packed, compiled); planner: ckpt on",
     "16.2 GiB / 30.3 GiB", dict(model="llama-3.1-8b", lora=NOT_K, batch=2, seq=2048, base="bfloat16", bf16=True,
                                 grad_checkpointing=True)),
    ("the same; planner: ckpt off", "16.2 GiB / 30.3 GiB",
     dict(model="llama-3.1-8b", lora=NOT_K, batch=2, seq=2048, base="bfloat16", bf16=True, grad_checkpointing=False)),
    ("PEFT docs accelerate/fsdp.md @018ca9d, Llama-2-70B LoRA r8 all linear, FSDP 8x H100, batch 8 x 2048 per GPU, "
     "grad ckpt, flash attention, bf16 mixed precision over float32 weights; planner: float32 base",
     "72-80 GB (67-75 GiB) in nvidia-smi",
     dict(model="llama-2-70b", lora=LoraConfig(rank=8, alpha=16, targets=ALL_LINEAR), batch=64, seq=2048,
          base="float32", bf16=True, grad_checkpointing=True, world_size=8, strategy="fsdp")),
    ("the same; planner: bfloat16 base (what FSDP's bf16 mixed precision gathers and computes in)",
     "72-80 GB (67-75 GiB) in nvidia-smi",
     dict(model="llama-2-70b", lora=LoraConfig(rank=8, alpha=16, targets=ALL_LINEAR), batch=64, seq=2048,
          base="bfloat16", bf16=True, grad_checkpointing=True, world_size=8, strategy="fsdp")),
]


def published_table() -> str:
    rows = ["| source and settings | published peak per GPU | planner, GiB |", "|---|---:|---:|"]
    for source, reported, settings in PUBLISHED_PEAKS:
        settings = dict(settings)
        predicted = plan(settings.pop("model"), settings.pop("lora"), full=False, **settings)["lora"]["peak_bytes"]
        rows.append(f"| {source} | {reported} | {predicted / GIB:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    start = time.perf_counter()
    found = peaks()
    print("Largest model that fits (its predicted peak, GiB):\n")
    print(fits_table(found))
    print("\nPredicted peak training memory, GiB:\n")
    print(peak_table(found))
    print("\nPredicted peak training memory per GPU, GiB:\n")
    print(per_gpu_table())
    print("\nAgainst published peaks:\n")
    print(published_table())
    print(f"\n(planned in {time.perf_counter() - start:.0f} s)")
