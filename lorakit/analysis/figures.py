"""Figures a person would rather look at than read: a training run's loss curve; an update's spectra and
subspace-similarity heatmaps (lorakit analyze). Every file is written atomically."""
from __future__ import annotations

import json
from pathlib import Path

from .measures import by_group
from ..io.files import write_atomically


def plot_loss_curve(log_file: Path, png: Path) -> Path:
    """Training loss per step and held-out loss at each evaluation, from a run's JSON-lines log."""
    plt = pyplot()
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
    return save_figure(fig, png)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png: Path) -> Path:
    plt = pyplot()
    try:
        return write_atomically(png, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def short_names(groups) -> dict[str, str]:
    """Each group's last path component (`query`), or the whole group where two would share it."""
    last = {g: g.rsplit(".", 1)[-1] for g in groups}
    return {g: name if list(last.values()).count(name) == 1 else g for g, name in last.items()}


def plot_spectra(result: dict, png: Path) -> Path:
    """Per kind of module, sigma_k / sigma_1 of each layer's update against k (log scale), coloured by depth."""
    plt = pyplot()
    groups = by_group(result["modules"])
    names = short_names(groups)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), dpi=110, squeeze=False,
                             layout="constrained")
    for ax, (group, members) in zip(axes[0], groups.items()):
        colours = plt.get_cmap("viridis")
        for n, m in enumerate(members):
            values = [v / m["spectrum"][0] for v in m["spectrum"]] if m["spectrum"] and m["spectrum"][0] > 0 else []
            label = f"layer {m['layer']}" if m["layer"] is not None else m["path"]
            ax.plot(range(1, len(values) + 1), values, ".-", color=colours(n / max(1, len(members) - 1)),
                    label=label, alpha=0.85)
        ax.set_yscale("log")
        ax.set_xlabel("direction k (by singular value)")
        ax.set_ylabel("sigma_k / sigma_1")
        ax.set_title(f"spectrum of dW, {names[group]}", fontsize=10)
        ax.grid(alpha=0.3)
        if len(members) <= 12:
            ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, png)


def _phi_image(ax, phi: list[list[float]], rows: int, cols: int, aspect: str):
    """phi(i, j) for i <= rows, j <= cols as an image on 0..1, i down and j across, cells centred on 1, 2, ..."""
    return ax.imshow([line[:cols] for line in phi[:rows]], vmin=0, vmax=1, cmap="inferno", aspect=aspect,
                     extent=(0.5, cols + 0.5, rows + 0.5, 0.5), interpolation="nearest")


def plot_similarity(result: dict, png: Path, zoom: int = 8) -> Path:
    """Per kind of module: phi(i, j) averaged over layers, whole and its top-`zoom` corner (the
    paper's Figure 3 layout: i down, j across, brighter = more alike)."""
    plt = pyplot()
    groups = by_group([m for m in result["modules"] if "similarity" in m])
    names = short_names(groups)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), dpi=110, squeeze=False,
                             layout="constrained", width_ratios=(2, 1))
    for row, (group, members) in zip(axes, groups.items()):
        phis = [m["similarity"]["phi"] for m in members]
        rows, cols = min(len(p) for p in phis), min(len(p[0]) for p in phis)
        mean = [[sum(p[i][j] for p in phis) / len(phis) for j in range(cols)] for i in range(rows)]
        for ax, (r, c), title in ((row[0], (rows, cols), f"top {rows} x top {cols}"),
                                  (row[1], (min(rows, zoom), min(cols, zoom)), f"top {min(rows, zoom)} x top {min(cols, zoom)}")):
            image = _phi_image(ax, mean, r, c, aspect="auto")
            ax.set_xlabel("j: second update's top-j directions")
            ax.set_ylabel("i: first update's top-i")
            ax.set_title(f"{names[group]}: phi(i, j), {title}, mean of {len(members)} layers", fontsize=9)
        fig.colorbar(image, ax=row.tolist(), shrink=0.9, label="phi")
    return save_figure(fig, png)


def plot_similarity_by_layer(result: dict, png: Path, zoom: int = 8, most: int = 6) -> Path:
    """phi(i, j) for i, j <= `zoom`, layer by layer (at most `most` layers, evenly spaced): an average
    over layers can hide one layer's strong overlap."""
    plt = pyplot()
    groups = by_group([m for m in result["modules"] if "similarity" in m])
    names = short_names(groups)
    picked = {g: [ms[round(k * (len(ms) - 1) / max(1, min(most, len(ms)) - 1))] for k in range(min(most, len(ms)))]
              for g, ms in groups.items()}
    columns = max(len(ms) for ms in picked.values())
    fig, axes = plt.subplots(len(groups), columns, figsize=(2.3 * columns + 1, 2.4 * len(groups)), dpi=110,
                             squeeze=False, layout="constrained")
    for row, (group, members) in zip(axes, picked.items()):
        for ax in row[len(members):]:
            ax.axis("off")
        for ax, m in zip(row, members):
            phi = m["similarity"]["phi"]
            image = _phi_image(ax, phi, min(zoom, len(phi)), min(zoom, len(phi[0])), aspect="equal")
            where = f"layer {m['layer']}" if m["layer"] is not None else m["path"]
            ax.set_title(f"{names[group]}, {where}", fontsize=8)
            ax.set_xlabel("j", fontsize=8)
            ax.set_ylabel("i", fontsize=8)
        fig.colorbar(image, ax=row.tolist(), shrink=0.9, label="phi")
    return save_figure(fig, png)
