"""`lorakit analyze`: load the updates to study, measure them (lorakit.analysis) and write report.md,
report.json and PNG figures, each explained for someone new to the LoRA paper's section 7."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .measures import (BASES, DIRECTIONS, Update, adapter_updates, analyze, by_group, model_updates, random_similarity,
                       weight_updates)
from ..core.config import option
from ..core.targets import split_names
from ..errors import LoraError, problems_error
from ..io.adapter_files import adapter_info, load_adapter
from ..io.peft import CONFIG_FILE
from ..io.files import write_text_atomically
from ..zoo import load_model, load_task_model
from .figures import plot_similarity, plot_similarity_by_layer, plot_spectra


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to analyze. Every field but `adapter` is also a `lorakit analyze` option."""

    adapter: str = option("", "adapter folder, or a fully fine-tuned model folder (then --base is needed)")
    compare: str | None = option(None, "a second adapter (or fine-tuned model) folder: subspace similarity with it")
    base: str | None = option(None, "the base model (bundled name or folder): amplification, and full fine-tuning updates")
    targets: tuple[str, ...] = option((), "modules of a fully fine-tuned model to study, e.g. query,value "
                                        "(default: those of the LoRA adapter it is compared with)")
    rank: int = option(0, "directions r for amplification (0: the adapter's own rank; for a full update, the compared "
                        "adapter's rank, else 8)")
    directions: int = option(DIRECTIONS, "top directions compared in subspace similarity, at most")
    basis: str = option("A", "input directions compared: A (a LoRA adapter's A, as in the paper) or delta (dW's own)",
                      choices=BASES)
    out: str = option("out/analysis", "folder for report.md, report.json and the figures")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", split_names(self.targets))
        problems = []
        for name in ("adapter", "compare"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                problems.append(f"{name}={value!r}: not a folder; give an adapter folder or a fine-tuned model folder")
        if self.rank < 0:
            problems.append(f"rank={self.rank!r}: must be 0 (the adapter's own rank) or a positive number of directions")
        if self.directions < 1:
            problems.append(f"directions={self.directions!r}: must be a positive integer, e.g. 64")
        if problems:
            raise problems_error("invalid analyze options", problems)

    def run(self) -> dict:
        """Measure and write the report; returns the measurements (also in report.json)."""
        if self.compare and not self.targets and is_model_folder(self.adapter) and not is_model_folder(self.compare):
            compare = load_updates(self.compare, self.base)  # the LoRA adapter names the modules to study
            updates = load_updates(self.adapter, self.base, _names(compare))
        else:
            updates = load_updates(self.adapter, self.base, self.targets)
            compare = load_updates(self.compare, self.base, self.targets or _names(updates)) if self.compare else None
        bar = (lambda items: tqdm(items, desc="analyze", unit="module")) if self.progress else None
        result = analyze(updates, compare, self.rank or None, self.directions, bar, self.basis)
        result["sources"] = {"adapter": self.adapter, "compare": self.compare, "base": self.base,
                             "kinds": {"adapter": _kind(updates), "compare": _kind(compare) if compare else None}}
        write_report(result, Path(self.out))
        return result


def is_model_folder(folder: str | os.PathLike) -> bool:
    """A transformers model folder (config.json) rather than an adapter folder (adapter_config.json)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / CONFIG_FILE).is_file()


def load_updates(folder: str, base: str | None, targets: tuple[str, ...] = ()) -> dict[str, Update]:
    """An adapter's updates (with W when `base` is given), or a fine-tuned model's W - W_base."""
    if is_model_folder(folder):
        if base is None:
            raise LoraError(f"adapter={folder!r} is a fine-tuned model folder: give the model it started from with --base")
        if not targets:
            raise LoraError(f"adapter={folder!r} is a fine-tuned model folder: name the modules to study with --targets "
                            "(e.g. query,value), or compare it with a LoRA adapter")
        return weight_updates(load_model(base)[0], load_model(folder)[0], targets)
    if base is None:
        return adapter_updates(folder)
    info = adapter_info(folder)
    model = load_task_model(base, info["task"], info["label_names"]) if info["task"] else load_model(base)[0]
    load_adapter(model, folder, "analyzed")
    return model_updates(model, "analyzed")


def _names(updates: dict[str, Update]) -> tuple[str, ...]:
    return tuple(sorted({path.rsplit(".", 1)[-1] for path in updates}))


def _kind(updates: dict[str, Update]) -> str:
    first = next(iter(updates.values()))
    ranks = sorted({u.rank for u in updates.values()})
    if first.kind == "full":
        return "full fine-tuning update (W_after - W_before)"
    if first.kind == "dora":
        return f"DoRA, rank {'/'.join(map(str, ranks))} (the merged update m * (W0 + dW) / ||W0 + dW|| - W0)"
    return f"LoRA, rank {'/'.join(map(str, ranks))}"


# --- the report ----------------------------------------------------------------------------------------------
def write_report(result: dict, out: Path) -> Path:
    """report.md, report.json, spectra.png and (with a comparison) similarity.png and
    similarity_layers.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "report.json", json.dumps(_rounded(result)) + "\n")
    plot_spectra(result, out / "spectra.png")
    compared = any("similarity" in m for m in result["modules"])
    if compared:
        plot_similarity(result, out / "similarity.png")
        plot_similarity_by_layer(result, out / "similarity_layers.png")
    text = "\n".join(_report_lines(result, compared)) + "\n"
    write_text_atomically(out / "report.md", text)
    return out / "report.md"


def _rounded(value, digits: int = 5):
    """Floats to `digits` significant digits, all the way down (report.json stays small)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _report_lines(result: dict, compared: bool) -> list[str]:
    sources, modules = result["sources"], result["modules"]
    lines = ["# What the update learned", "",
             f"- analysed: `{sources['adapter']}` ({sources['kinds']['adapter']}), {len(modules)} modules"]
    if sources["compare"]:
        lines.append(f"- compared with: `{sources['compare']}` ({sources['kinds']['compare']})")
    lines += [f"- base model: `{sources['base']}`" if sources["base"] else
              "- base model: not given (no amplification: it needs the frozen weights W)", ""]
    lines += _spectrum_section(modules, result["energy_share"])
    if compared:
        lines += _similarity_section([m for m in modules if "similarity" in m], result["basis"])
    if any("amplification" in m for m in modules):
        lines += _amplification_section([m for m in modules if "amplification" in m])
    return lines


def _section(title: str, explanation: str, figure: str | None, columns: list[str], rows: list[list[str]],
             means: list[str]) -> list[str]:
    """A report section: heading, one explaining paragraph, its figure, a table and one line per kind of module."""
    lines = [f"## {title}", "", explanation, ""]
    lines += [f"![{figure}]({figure}.png)", ""] if figure else []
    lines += ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for line in means:
        lines += ["", line]
    return lines + [""]


def _mean(values) -> float:
    return statistics.mean(values)


def _spectrum_section(modules: list[dict], share: float) -> list[str]:
    explanation = (
        "An update dW of rank r can change the layer along up to r directions; its singular values say how "
        "strongly it uses each one. When the first few are much larger than the rest, the update is, in effect, "
        "of lower rank than it was given. *Effective rank* is exp(entropy of the normalised singular values): "
        f"r if all are equal, 1 if one dominates. *Energy rank* is the fewest directions that hold {share:.0%} "
        "of ||dW||_F^2.")
    rows = [[m["path"], str(m["rank"]), f"{m['delta_norm']:.4g}", f"{m['top_share']:.1%}", str(m["energy_rank"]),
             f"{m['effective_rank']:.1f}"] for m in modules]
    means = [f"Mean over the {len(ms)} `{group}` modules: energy rank {_mean(m['energy_rank'] for m in ms):.1f}, "
             f"effective rank {_mean(m['effective_rank'] for m in ms):.1f}, top direction "
             f"{_mean(m['top_share'] for m in ms):.1%} of the energy." for group, ms in by_group(modules).items()]
    columns = ["module", "rank", "‖dW‖_F", "top direction's share of energy", f"energy rank ({share:.0%})",
               "effective rank"]
    return _section("1. How many directions does each update use?", explanation, "spectra", columns, rows, means)


def _similarity_section(modules: list[dict], basis: str) -> list[str]:
    directions = ("the right-singular vectors of A for a LoRA adapter, as in the paper's Figures 3 and 4, and of dW for "
                  "a full update" if basis == "A" else "the right-singular vectors of dW itself (--basis delta)")
    explanation = (
        "For each module, phi(i, j) measures how much of the top-i input directions of the first update lie "
        f"inside the top-j input directions of the second ({directions}): 1 means contained, 0 means at right angles. "
        "Directions picked at random in a d-dimensional input would give about max(i, j) / d, shown for "
        "reference. In the figures, brighter is more alike: first the mean over layers (right: its top 8 corner), "
        "then the top 8 corner layer by layer.")

    def corner(phi):  # phi(k, k) for k the smaller of the two sizes
        k = min(len(phi), len(phi[0]))
        return k, phi[k - 1][k - 1]

    rows = []
    for m in modules:
        phi, d = m["similarity"]["phi"], m["similarity"]["dimension"]
        k, phi_kk = corner(phi)
        rows.append([m["path"], f"{phi[0][0]:.3f}", f"{phi[0][-1]:.3f} (J={len(phi[0])})", f"{phi_kk:.3f} (k={k})",
                     f"{random_similarity(k, k, d):.3f}"])
    means = []
    for group, ms in by_group(modules).items():
        phis = [m["similarity"]["phi"] for m in ms]
        means.append(f"Mean over the {len(ms)} `{group}` modules: phi(1, 1) = {_mean(p[0][0] for p in phis):.3f}, "
                     f"phi(1, J) = {_mean(p[0][-1] for p in phis):.3f}, phi(k, k) = {_mean(corner(p)[1] for p in phis):.3f}.")
    columns = ["module", "phi(1, 1)", "phi(1, J): top direction inside all J of the other",
               "phi(k, k), k = smaller size", "random phi(k, k)"]
    lines = _section("2. Do the two updates learn the same directions?", explanation, "similarity", columns, rows, means)
    return lines[:-1] + ["![similarity by layer](similarity_layers.png)", ""]


def _amplification_section(modules: list[dict]) -> list[str]:
    explanation = (
        "Take the r directions dW uses most (its top singular vectors U, V) and measure how much of the frozen "
        "weight W lies along them: ||U^T W V^T||_F. Compare with W's own top r directions (the most W can have "
        "along any r) and with random directions. If dW's directions hold little more of W than random ones, "
        "the update strengthens features W barely uses; the *factor* ||dW||_F / ||U^T W V^T||_F says by how "
        "much (the paper's Table 7 found about 21 for GPT-3 at r = 4).")
    rows = [[m["path"], str(a["rank"])] + [f"{a[k]:.4g}" for k in ("projected", "own", "random", "weight_norm", "delta_norm")]
            + [f"{a['factor']:.2f}"] for m in modules for a in [m["amplification"]]]
    means = []
    for group, ms in by_group(modules).items():
        amps = [m["amplification"] for m in ms]
        means.append(f"Mean over the {len(ms)} `{group}` modules: dW's directions hold "
                     f"{_mean(a['projected'] for a in amps):.3g} of W, random ones {_mean(a['random'] for a in amps):.3g}, "
                     f"W's own top r {_mean(a['own'] for a in amps):.3g}; factor {_mean(a['factor'] for a in amps):.2f}.")
    columns = ["module", "r", "‖Uᵀ W Vᵀ‖_F, dW's directions", "W's own top r", "random", "‖W‖_F", "‖dW‖_F", "factor"]
    return _section("3. Does the update amplify directions W already has?", explanation, None, columns, rows, means)
