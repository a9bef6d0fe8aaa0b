"""Figures a person would rather look at than read: the loss curve of a training run."""
from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curve(log_file: Path, png: Path) -> Path:
    """Training loss per step and held-out loss at each evaluation, from a run's JSON-lines log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_file).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and not r.get("skipped")]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss (per step)", color="tab:blue", alpha=0.8)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", color="tab:orange")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(Path(log_file).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png
