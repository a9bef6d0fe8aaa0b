"""The README's table of which Llama fits where: lorakit's planner on published Llama configs
(lorakit.training.plan_models.PUBLISHED), for each base dtype, printed as markdown. No weights are loaded or
allocated (the planner's dry run is on fake tensors).

    python docs/plan_table.py            # about two minutes on two CPU cores

The run is LoRA rank 8 on q_proj and v_proj, batch 1 x 2048 tokens, gradient checkpointing on, no autocast
(the base's dtype computes).
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


if __name__ == "__main__":
    start = time.perf_counter()
    found = peaks()
    print("Largest model that fits (its predicted peak, GiB):\n")
    print(fits_table(found))
    print("\nPredicted peak training memory, GiB:\n")
    print(peak_table(found))
    print(f"\n(planned in {time.perf_counter() - start:.0f} s)")
