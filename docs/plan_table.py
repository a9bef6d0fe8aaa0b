"""The README's table of which Llama fits where: lorakit's planner on published Llama configs, for each base
dtype, printed as markdown. No weights are loaded or allocated (the planner's dry run is on fake tensors).

    python docs/plan_table.py            # about two minutes on two CPU cores

The configs are the published config.json values (hidden size, layers, heads, key-value heads, MLP size,
vocabulary, tied embeddings) written out as transformers LlamaConfigs; the run is LoRA rank 8 on q_proj
and v_proj, batch 1 x 2048 tokens, gradient checkpointing on, no autocast (the base's dtype computes).
"""
from __future__ import annotations

import time

from transformers import LlamaConfig

from lorakit import BASE_DTYPES, LoraConfig
from lorakit.training.plan import plan

LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072)
MODELS = {  # name: published config
    "Llama-3.2-1B": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                head_dim=64, tie_word_embeddings=True, **LLAMA3),
    "Llama-3.2-3B": LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                                head_dim=128, tie_word_embeddings=True, **LLAMA3),
    "Llama-3.1-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                tie_word_embeddings=False, **LLAMA3),
    "Llama-2-13B": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                               num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
                               tie_word_embeddings=False),
    "Llama-3.1-70B": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                                 tie_word_embeddings=False, **LLAMA3),
}
LORA = LoraConfig(rank=8, targets=("q_proj", "v_proj"))
STEP = dict(batch=1, seq=2048, grad_checkpointing=True, full=False)
MEMORY_GIB = (8, 24, 80)
GIB = 2 ** 30


def peaks() -> dict[str, dict[str, int]]:
    """model -> base dtype -> predicted peak training bytes."""
    return {name: {dtype: plan(config, LORA, base=dtype, **STEP)["lora"]["peak_bytes"] for dtype in BASE_DTYPES}
            for name, config in MODELS.items()}


def peak_table(found: dict[str, dict[str, int]]) -> str:
    rows = ["| model | " + " | ".join(BASE_DTYPES) + " |", "|---|" + "---:|" * len(BASE_DTYPES)]
    rows += [f"| {name} | " + " | ".join(f"{found[name][d] / GIB:.1f}" for d in BASE_DTYPES) + " |" for name in found]
    return "\n".join(rows)


def fits_table(found: dict[str, dict[str, int]]) -> str:
    """The largest model (of MODELS, in order of size) whose predicted peak is at most each memory size."""
    rows = ["| base dtype | " + " | ".join(f"{gib} GiB" for gib in MEMORY_GIB) + " |", "|---|" + "---|" * len(MEMORY_GIB)]
    for dtype in BASE_DTYPES:
        cells = []
        for gib in MEMORY_GIB:
            fitting = [name for name in found if found[name][dtype] <= gib * GIB]
            cells.append(f"{fitting[-1]} ({found[fitting[-1]][dtype] / GIB:.1f})" if fitting else "none")
        rows.append(f"| {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    start = time.perf_counter()
    found = peaks()
    print("Largest model that fits (its predicted peak, GiB):\n")
    print(fits_table(found))
    print("\nPredicted peak training memory, GiB:\n")
    print(peak_table(found))
    print(f"\n(planned in {time.perf_counter() - start:.0f} s)")
