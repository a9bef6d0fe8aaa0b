"""A study's figures (PNG): quality against data size, against trainable parameters and against rank; the
train/held-out gap; time, memory and adapter size; the pretrained weights' spectra beside each layer type's
result. Each plots the cells (mean, error bar = std over seeds) that results.cells computed."""
from __future__ import annotations

from pathlib import Path

from ..analysis.figures import pyplot, save_figure
from .results import Metric, largest_size, rank_series


def _label(cell: dict) -> str:
    return cell["arm"] if cell["full"] else f"{cell['arm']} r={cell['rank']}"


def _series(cells: list[dict], key: str, by=("arm", "rank")) -> dict[tuple, list[dict]]:
    """Cells grouped by `by`, each group sorted by `key`; only groups with more than one point."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault(tuple(c[k] for k in by), []).append(c)
    return {k: sorted(v, key=lambda c: c[key]) for k, v in groups.items() if len({c[key] for c in v}) > 1}


def _axes(plt, title: str, xlabel: str, ylabel: str, logx: bool = True):
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110, layout="constrained")
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def quality_vs_data(cells: list[dict], metric: Metric, png: Path, key: str = "metric") -> Path:
    """Held-out metric (or, with key="gap", train minus held-out) against training examples, per setting."""
    plt = pyplot()
    what = f"held-out {metric.name}" if key == "metric" else f"train - held-out {metric.name}"
    fig, ax = _axes(plt, f"{what} vs data size (mean, bar = std over seeds)", "training examples", what)
    for members in _series(cells, "train_examples").values():
        style = dict(color="black", linestyle="--") if members[0]["full"] else {}
        ax.errorbar([c["train_examples"] for c in members], [c[key] for c in members],
                    yerr=[c[f"{key}_std"] for c in members], marker="o", capsize=3, label=_label(members[0]), **style)
    if key == "gap":
        ax.axhline(0, color="grey", linewidth=0.8)
    sizes = sorted({c["train_examples"] for c in cells})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    _legend(ax, ncol=2)
    return save_figure(fig, png)


def quality_vs_parameters(cells: list[dict], metric: Metric, png: Path) -> Path:
    """Held-out metric against trainable parameters at the largest data size, one line per target set
    (its ranks, over every arm that adapts it), full fine-tuning a square."""
    plt = pyplot()
    fig, ax = _axes(plt, f"held-out {metric.name} vs trainable parameters (largest data size)",
                    "trainable parameters", f"held-out {metric.name}")
    for members in _by_targets(cells).values():
        members = sorted(members, key=lambda c: c["trainable"])
        arms = "+".join(dict.fromkeys(c["arm"] for c in members))
        ax.errorbar([c["trainable"] for c in members], [c["metric"] for c in members],
                    yerr=[c["metric_std"] for c in members], marker="s" if members[0]["full"] else "o", capsize=3,
                    label=arms if members[0]["full"] else f"{arms}: {','.join(members[0]['targets'])}")
        for c in members:
            if not c["full"]:
                ax.annotate(f"r{c['rank']}", (c["trainable"], c["metric"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    _legend(ax)
    return save_figure(fig, png)


def quality_vs_rank(cells: list[dict], metric: Metric, png: Path) -> Path:
    """Held-out metric against rank, one line per target set and data size (sets run at several ranks)."""
    plt = pyplot()
    fig, ax = _axes(plt, f"held-out {metric.name} vs rank (mean, bar = std over seeds)", "rank r",
                    f"held-out {metric.name}")
    for (targets, _), members in rank_series(cells).items():
        ax.errorbar([c["rank"] for c in members], [c["metric"] for c in members],
                    yerr=[c["metric_std"] for c in members], marker="o", capsize=3,
                    label=f"{targets}, {members[0]['train_examples']} examples")
    ax.set_xscale("log", base=2)
    _legend(ax)
    return save_figure(fig, png)


def costs(cells: list[dict], png: Path) -> Path:
    """Seconds per run, peak RSS and saved size (adapter, or the whole model) per setting, largest data size."""
    plt = pyplot()
    shown = sorted(_largest(cells), key=lambda c: (c["full"], c["arm"], c["rank"]))
    labels = [_label(c) for c in shown]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), dpi=110, layout="constrained")
    for ax, (key, scale, title) in zip(axes, (("seconds", 1, "seconds per run"), ("peak_rss_bytes", 2 ** 20, "peak RSS (MiB)"),
                                             ("saved_bytes", 1e6, "saved adapter / model (MB, log)"))):
        ax.barh(labels, [c[key] / scale for c in shown], xerr=[c.get(f"{key}_std", 0) / scale for c in shown])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        if key == "saved_bytes":
            ax.set_xscale("log")
    fig.suptitle("cost per run (shared machine: times are indicative)", fontsize=10)
    return save_figure(fig, png)


def spectra(types: dict[str, dict], alone: dict[str, dict], metric: Metric, png: Path) -> Path:
    """Each layer type's W0 spectrum (sigma_k / sigma_1, mean over blocks), its effective-rank share, and
    (for the types some arm adapts alone: `alone`, type -> cell) that arm's held-out metric against it."""
    plt = pyplot()
    fig, (left, right, third) = plt.subplots(1, 3, figsize=(18, 4.8), dpi=110, layout="constrained")
    for kind, s in types.items():
        left.plot([i + 1 for i in s["spectrum_index"]], s["spectrum"], ".-", label=kind)
    left.set(yscale="log", xlabel="direction k", ylabel="sigma_k / sigma_1", title="spectrum of W0 (mean over blocks)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = list(types)
    right.barh(names, [types[k]["effective_rank_share"] for k in names], label="effective rank / min(d_out, d_in)")
    right.barh(names, [types[k]["energy_rank_share"] for k in names], alpha=0.5, label="90%-energy rank / min(d)")
    right.set(xlim=(0, 1), title="how much of its full rank W0 uses")
    right.legend(fontsize=8)
    for kind, cell in alone.items():
        share = types[kind]["effective_rank_share"]
        third.errorbar([share], [cell["metric"]], yerr=[cell["metric_std"]], marker="o", capsize=3)
        third.annotate(f"{cell['arm']} r={cell['rank']}", (share, cell["metric"]), fontsize=7, xytext=(4, 3),
                       textcoords="offset points")
    third.set(xlabel="W0 effective rank / min(d_out, d_in)", ylabel=f"held-out {metric.name}",
              title="adapting one type alone (same budget) vs W0's rank")
    third.grid(alpha=0.3)
    return save_figure(fig, png)


def _legend(ax, ncol: int = 1) -> None:
    if ax.get_legend_handles_labels()[0]:  # a figure with no series says so by its empty axes
        ax.legend(fontsize=8, ncol=ncol)


def _largest(cells: list[dict]) -> list[dict]:
    size = largest_size(cells)
    return [c for c in cells if c["data_size"] == size]


def _by_targets(cells: list[dict]) -> dict[str, list[dict]]:
    sets: dict[str, list[dict]] = {}
    for c in _largest(cells):
        sets.setdefault("full" if c["full"] else ",".join(c["targets"]), []).append(c)
    return sets
