"""bench/perf.py's results as text: markdown tables, verdicts against the targets, the RESULTS.md
section (other sections untouched), the ratio chart and the profile digest."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import perf_models as pm
from perf_load import CLEAN_CPUS

HEADING = "## Performance: lorakit vs PEFT vs full fine-tuning"
NOTES_BEGIN, NOTES_END = "<!-- perf-notes:begin -->", "<!-- perf-notes:end -->"  # kept when the section is rewritten


# --- targets -------------------------------------------------------------------------------------------
# Two estimates of every timed ratio: the median of per-round ratios (what the issue asks for) and the
# ratio of best times (robust where other work only ever adds time). A verdict is "met" or "not met"
# when both agree, "inconclusive (noise)" when they do not.
MET, NOT_MET, INCONCLUSIVE = "met", "not met", "inconclusive (noise)"
MERGED_TOLERANCE = 0.03  # "merged equal to base within noise": both estimates within 3% of 1


@dataclass(frozen=True)
class Target:
    """A goal from the issue: a statistic of a model's summary at most `limit` (exactly 0 with exact=True)."""

    name: str
    limit: float
    unit: str  # "x" for a ratio, "ms", or "" for a plain number
    path: tuple[str, ...]  # where the statistics are in a model's summary
    key: str = "ratio"  # "ratio" (best estimate: "best") or "median_ms" (best estimate: "min_ms")
    exact: bool = False

    def estimates(self, summary: dict) -> dict[str, float]:
        """{"median": ..., "best": ...} (just one of them where only one was measured)."""
        stats = at(summary, self.path)
        best = stats.get("best" if self.key == "ratio" else "min_ms")
        label = "median" if self.key in ("ratio", "median_ms") else "value"
        return {label: stats[self.key], **({"best": best} if best is not None else {})}

    def verdict(self, summary: dict) -> tuple[str, str, str]:
        """(measured, state, explanation)."""
        estimates = self.estimates(summary)
        measured = "; ".join(f"{number(v, self.unit)} {k}" for k, v in estimates.items())
        if self.exact:
            value = next(iter(estimates.values()))
            return measured, MET if value == self.limit else NOT_MET, "exactly 0" if value == self.limit else f"{value:.3g}"
        state = _state([v <= self.limit for v in estimates.values()])
        return measured, state, "; ".join(f"{k} {_margin(v, self.limit, self.unit)}" for k, v in estimates.items())


def at(summary: dict, path: tuple[str, ...]) -> dict:
    """The statistics at `path` in a model's summary."""
    for key in path:
        summary = summary[key]
    return summary


def _state(results: list[bool]) -> str:
    """Met when every estimate meets the goal, not met when none does, inconclusive otherwise."""
    return MET if all(results) else NOT_MET if not any(results) else INCONCLUSIVE


def _margin(value: float, limit: float, unit: str) -> str:
    if value <= limit:
        return f"{number(limit - value, unit)} under"
    return f"{number(value - limit, unit)} ({100 * (value - limit) / limit:.0f}%) over"


TARGETS = (
    Target("training step, lorakit / full fine-tuning", 0.65, "x", ("training", "ratios", "step lorakit/full")),
    Target("training step, lorakit / PEFT", 0.90, "x", ("training", "ratios", "step lorakit/peft")),
    Target("peak training memory (RSS), lorakit / PEFT", 0.85, "x", ("training", "ratios", "memory lorakit/peft")),
    Target("peak training memory (live tensors), lorakit / PEFT", 0.85, "x", ("training", "ratios", "live lorakit/peft")),
    Target("inference, lorakit unmerged / base", 1.03, "x", ("inference", "lorakit")),
    Target("load + activate a rank-8 adapter, model in memory", 20.0, "ms", ("io", "load", "lorakit"), "median_ms"),
    Target("load + activate onto a plain model (wraps its layers)", 20.0, "ms", ("io", "cold load", "lorakit"), "median_ms"),
    Target("max abs(W - W0) after 100 bf16 merge/unmerge cycles", 0.0, "", ("precision", "lorakit"),
           "drift_after_cycles", exact=True),
    Target("training step, lorakit DoRA / lorakit LoRA", 1.25, "x", ("training", "ratios", "step lorakit-dora/lorakit")),
    Target("training step, lorakit DoRA / PEFT DoRA", 0.80, "x", ("training", "ratios", "step lorakit-dora/peft-dora")),
)


def merged_verdict(summary: dict) -> tuple[str, str, str]:
    """Merged lorakit vs base, "equal within noise": both estimates within MERGED_TOLERANCE of 1."""
    stats = summary["inference"]["lorakit merged"]
    estimates = {"median": stats["ratio"], "best": stats["best"]}
    inside = [abs(v - 1) <= MERGED_TOLERANCE for v in estimates.values()]
    measured = "; ".join(f"{v:.3f}x {k}" for k, v in estimates.items())
    return measured, _state(inside), f"within {MERGED_TOLERANCE:.0%} of 1: " + ", ".join(
        f"{k} {'yes' if ok else 'no'}" for k, ok in zip(estimates, inside))


def verdicts(summary: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, state, explanation) for every target on one model's summary."""
    rows = []
    for target in TARGETS:
        bound = "= 0" if target.exact else f"<= {number(target.limit, target.unit)}"
        rows.append((f"{target.name} {bound}", *target.verdict(summary)))
    rows.insert(4, ("inference, lorakit merged / base: equal within noise", *merged_verdict(summary)))
    return rows


def number(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.3g}"


# --- tables ----------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ratio_range(stats: dict) -> str:
    return f"{stats['ratio']:.3f}x ({stats['ratio_min']:.2f}-{stats['ratio_max']:.2f})"


def inference_table(summary: dict) -> str:
    names = {"base": "base", "lorakit": "lorakit, unmerged", "lorakit merged": "lorakit, merged",
             "peft": "PEFT, unmerged", "peft merged": "PEFT, merged"}
    inf = summary["inference"]
    rows = [[label, f"{inf[key]['median_ms']:.0f}", f"{inf[key]['min_ms']:.0f}", ratio_range(inf[key]), f"{inf[key]['best']:.3f}x"]
            for key, label in names.items()]
    return table(["forward", "median ms", "best ms", "/ base: median of per-round ratios (range)", "best / best base"],
                  rows, "lrrrr")


def training_table(summary: dict) -> str:
    v = summary["training"]["variants"]
    names = {"full": "full fine-tuning", "peft": "PEFT LoRA", "lorakit": "lorakit LoRA",
             "floor": "floor: frozen model, backward to layer 0, no adapter",
             "floor-chunked": "floor with lorakit's chunked loss", "lorakit-dora": "lorakit DoRA",
             "peft-dora": "PEFT DoRA"}
    rows = [[label, f"{v[k]['trainable']:,}", f"{v[k]['step_ms']:.0f}", f"{v[k]['min_ms']:.0f}", f"{v[k]['forward_ms']:.0f}",
             f"{v[k]['backward_ms']:.0f}", f"{v[k]['optimizer_ms']:.0f}", f"{v[k]['peak_rss_mb']:.0f}",
             f"{v[k]['rss_before_mb']:.0f}", f"{v[k]['added_mb']:.0f}", f"{v[k]['live_peak_mb']:.0f}"]
            for k, label in names.items()]
    return table(["variant", "trainable", "step ms (median)", "best", "forward", "backward", "AdamW",
                   "peak RSS MB", "RSS before MB", "added by training MB", "peak live tensors MB"], rows, "lrrrrrrrrrr")


def training_ratio_table(summary: dict) -> str:
    r = summary["training"]["ratios"]
    rows = [[label, ratio_range(r[f"step {pair}"]), f"{r[f'step {pair}']['best']:.3f}x", ratio_range(r[f"cpu {pair}"]),
             f"{r[f'memory {pair}']['ratio']:.3f}x", f"{r[f'added {pair}']['ratio']:.3f}x", f"{r[f'live {pair}']['ratio']:.3f}x"]
            for pair, label in (("lorakit/full", "lorakit / full"), ("lorakit/peft", "lorakit / PEFT"),
                                ("peft/full", "PEFT / full"), ("lorakit/floor", "lorakit / floor"),
                                ("peft/floor", "PEFT / floor"), ("lorakit/floor-chunked", "lorakit / floor with lorakit's loss"),
                                ("lorakit-dora/lorakit", "lorakit DoRA / lorakit LoRA"),
                                ("lorakit-dora/peft-dora", "lorakit DoRA / PEFT DoRA"),
                                ("peft-dora/peft", "PEFT DoRA / PEFT LoRA"))]
    return table(["ratio", "step time: median of per-round ratios (range)", "best / best",
                   "process CPU time per step", "peak RSS", "added by training", "peak live tensors"], rows, "lrrrrrr")


def io_table(summary: dict) -> str:
    ops = [("save", "io", "save"), ("load + activate, model in memory", "io", "load"),
           ("load + activate onto a plain model", "io", "cold load"), ("switch the active adapter", "io", "switch"),
           ("merge (all adapted layers)", "merge", "merge"), ("unmerge", "merge", "unmerge")]
    rows = []
    for label, section, op in ops:
        entry = summary[section][op]
        digits = 3 if op == "switch" else 1
        rows.append([label, f"{entry['lorakit']['median_ms']:.{digits}f}", f"{entry['peft']['median_ms']:.{digits}f}",
                     ratio_range(entry["ratio"])])
    return table(["operation", "lorakit ms", "PEFT ms", "lorakit / PEFT"], rows, "lrrr")


def precision_table(summary: dict) -> str:
    rows = []
    for library, label in (("lorakit", "lorakit"), ("peft", "PEFT")):
        p = summary["precision"][library]
        rows.append([label, p["adapter_dtype"].replace("torch.", ""),
                     f"{p['logits_max_abs']:.3g} (mean {p['logits_mean_abs']:.2g})", f"{p['bf16_vs_fp32_max_abs']:.3g}",
                     f"{p['drift_after_1']:.3g}", f"{p['drift_after_cycles']:.3g}",
                     f"{p['changed_elements']:,} of {p['weight_elements']:,}",
                     f"{p['cycle_ms']:.1f}" if p["cycle_ms"] is not None else "-"])
    cycles = summary["precision"]["lorakit"]["cycles"]
    return table(["library", "adapter dtype", "max abs(merged - unmerged) logits", "bf16 vs float32 logits, unmerged (bf16's own error)",
                   "max abs(W - W0), 1 cycle", f"after {cycles} cycles", f"weights changed after {cycles}",
                   "ms per cycle"], rows, "llrrrrrr")


def verdict_table(summary: dict) -> str:
    rows = [[name, measured, f"**{state}**: {why}"] for name, measured, state, why in verdicts(summary)]
    return table(["target", "measured", "verdict"], rows, "lrl")


def model_block(name: str, summary: dict, level: str = "###") -> str:
    s, t = summary["shape"], summary["train_shape"]
    targets = ", ".join(s["targets"])
    check = summary["check"]
    lines = [
        f"{level} {pm.TITLES.get(name, name)}",
        "",
        f"Adapter: rank {s['rank']}, alpha 16, no dropout, on {targets}. Inference, files and merge: batch "
        f"{s['batch']} x {s['seq']} random tokens. Training: batch {t['batch']} x {t['seq']}, "
        f"{t['warmup']} warm-up + {t['steps']} timed rounds of one step per variant, the three processes taking turns.",
        "",
        f"Rounds used (clean: other work under {CLEAN_CPUS} CPUs while the round ran; all rounds when fewer "
        f"than 3 were): inference {summary['inference']['base']['rounds_used']} of {summary['inference']['base']['rounds']}, "
        f"training {summary['training']['rounds_used']} of {summary['training']['rounds']}, "
        f"files {summary['io']['load']['ratio']['rounds_used']} of {summary['io']['load']['ratio']['rounds']}. "
        "Medians are over the clean rounds, best times over all.",
        "",
        f"Check (float32): lorakit vs PEFT logits {check['lorakit_vs_peft']:.2g}, lorakit merged vs unmerged "
        f"{check['lorakit_merged_vs_unmerged']:.2g}, PEFT merged vs unmerged {check['peft_merged_vs_unmerged']:.2g}; "
        f"the adapter moves the logits by {check['adapter_effect']:.2g}: {'pass' if check['passed'] else 'FAIL'}.",
        "",
        "Targets (the issue's are for GPT-2 small; other models for reference):",
        "",
        verdict_table(summary),
        "",
        "Inference latency (forward under inference_mode):",
        "",
        inference_table(summary),
        "",
        "Training step (zero_grad, forward + mean causal-LM loss, backward, AdamW; each configuration in its own process; "
        "lorakit computes the loss the way `lorakit train` does, by chunks without the full logits, the others with "
        "the model's own `labels=` loss, as transformers' Trainer does):",
        "",
        training_table(summary),
        "",
        training_ratio_table(summary),
        "",
        "Adapter files, switching and merging (interleaved, median):",
        "",
        io_table(summary),
        "",
        f"Merge precision, bfloat16 base (batch {summary['precision_batch']} x {s['seq']} for the logits):",
        "",
        precision_table(summary),
    ]
    return "\n".join(lines)


# --- profiles --------------------------------------------------------------------------------------------
def profile_digest(profiles: list[dict], top: int = 5) -> str:
    """One line per profile: the phases (training steps), the ops with the most self CPU time and,
    where measured, the ops that allocated the most memory that outlived them."""
    lines = []
    for report in profiles:
        ops = ", ".join(f"{k} {v:.0f} ms" for k, v in list(report["self_ms"].items())[:top])
        phases = report.get("phases_ms")
        phase_text = (" phases " + ", ".join(f"{k} {v:.0f} ms" for k, v in phases.items()) + ";") if phases else ""
        memory = report.get("self_mb")
        memory_text = ("; memory allocated by ops (outputs, saved tensors): " + ", ".join(f"{k} {v:.0f} MB" for k, v in list(memory.items())[:top])
                       if memory else "")
        lines.append(f"- {report['model']}, {report['what']}:{phase_text} self CPU time: {ops}{memory_text}")
    return "\n".join(lines)


def profile_text(profiles: list[dict]) -> str:
    parts = []
    for report in profiles:
        parts.append(f"== {report['model']}: {report['what']}\n{report.get('phases_ms', '')}\n{report['table']}\n"
                     f"{report.get('memory_table', '')}\n{report.get('python', '')}")
    return "\n\n".join(parts)


# --- the whole report ---------------------------------------------------------------------------------------
def machine_line(meta: dict) -> str:
    m = meta["machine"]
    return (f"{m['nproc']} CPUs ({m['cpu']}), {m['memory_gb']} GB RAM, {m['threads']} torch threads; "
            f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}")


def code_line(meta: dict) -> str:
    git = meta["machine"].get("git")
    if not git:
        return "Code: not a git checkout."
    changed = git["lorakit_changed"]
    extra = f", with uncommitted changes to {', '.join(changed)}" if changed else ", lorakit/ unchanged from it"
    return f"Code: commit {git['head']}{extra}."


def body(result: dict) -> str:
    """The tables of every model, with the run's facts first."""
    meta = result["meta"]
    load = meta["machine"]["loadavg"]
    parts = [
        f"Command: `{meta['command']}` (mode {meta['mode']}, run `{result['run']}`, {meta['seconds'] / 60:.1f} min). "
        f"Date: {meta['machine']['date']}.",
        "",
        f"Machine: {machine_line(meta)}. Load average (1/5/15 min) {load_text(load)} at the start and "
        f"{load_text(meta.get('loadavg_end'))} at the end; other work shares the cores, so every comparison is "
        "interleaved, its ratio taken round by round, each round started when the machine was quiet "
        f"(waited {meta.get('waited_for_quiet_s', 0):.0f} s in all) and its other work recorded. " + code_line(meta),
        "",
        "Memory: `peak RSS` is the kernel's high-water mark (VmHWM) of the training process's resident memory, "
        "reset after the model is built and read after the last step: weights, gradients, AdamW state, "
        "activations and the Python/torch runtime together. `RSS before` is the same process just before the "
        "first step; `added by training` is the difference (gradients, AdamW state, activations). RSS also "
        "holds the allocator's slack (memory freed by torch but kept by malloc), which no library controls; "
        "`peak live tensors` counts only tensors alive at once during one more step (every tensor created by "
        "an op, from creation until freed: activations kept for backward, gradients, temporaries; lorakit.training.plan's "
        "counter), measured after the timed rounds.",
    ]
    return "\n".join(parts + model_parts(result, model_block, "one step or call", "perf_profile.txt"))


def model_parts(result: dict, block, profiled: str, profile_file: str) -> list[str]:
    """Each model's block (`block(name, summary)`), then the profiles' digest, as lines of a report body."""
    parts = []
    for name, summary in result["models"].items():
        parts += ["", block(name, summary)]
    if result.get("profiles"):
        parts += ["", f"### Profiles (torch.profiler, {profiled}; full tables in `bench/results/{profile_file}`)",
                  "", profile_digest(result["profiles"])]
    return parts


def load_text(load) -> str:
    return "/".join(f"{x:.1f}" for x in load) if load else "unknown"


def section(result: dict, notes: str) -> str:
    return results_section(HEADING, "make bench", "perf", result, body(result), notes, (NOTES_BEGIN, NOTES_END))


def results_section(heading: str, target: str, stem: str, result: dict, text: str, notes: str,
                    markers: tuple[str, str]) -> str:
    """A RESULTS.md section: heading, where the records and chart are, the body, then the kept notes."""
    plot = f"\n\n![ratios](results/{stem}.png)" if result.get("plot") else ""
    return (f"{heading}\n\n`{target}` runs `bench/{stem}.py`: every record in `bench/results/{stem}.jsonl`; "
            f"the chart of ratios in `bench/results/{stem}.png`.{plot}\n\n{text}\n\n"
            f"{markers[0]}\n{notes.strip()}\n{markers[1]}\n")


def replace_section(text: str, new_section: str, heading: str = HEADING) -> str:
    """`text` with the section under `heading` replaced (or appended); every other section kept as it is."""
    start = text.find(heading)
    if start < 0:
        return (text.rstrip() + "\n\n" if text.strip() else "# Benchmarks\n\n") + new_section
    following = re.search(r"^## ", text[start + len(heading):], re.M)
    end = start + len(heading) + following.start() if following else len(text)
    return text[:start] + new_section + ("\n" + text[end:] if following else "")


def existing_notes(text: str, begin: str = NOTES_BEGIN, end: str = NOTES_END, script: str = "bench/perf.py") -> str:
    """The hand-written notes between the markers `begin` and `end`, or a placeholder saying `script` keeps them."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        return f"### Notes\n\n(hand-written notes on this run go here; `{script}` keeps them)"
    return text[start + len(begin):stop]


def write_outputs(result: dict, settings) -> None:
    """The chart, the profile text and the RESULTS.md section, each where settings say (None: skipped)."""
    write_report(result, settings, plot, section, HEADING, (NOTES_BEGIN, NOTES_END), "bench/perf.py")


def write_report(result: dict, settings, draw, make_section, heading: str, markers: tuple[str, str],
                 script: str) -> None:
    """A benchmark's outputs: `draw`'s chart, the profile text, and its RESULTS.md section (`make_section(result,
    notes)`, the hand-written notes between `markers` kept), each where settings say (None: skipped)."""
    if settings.plot is not None:
        draw(result, settings.plot)
        result["plot"] = str(settings.plot)
    if settings.profile_out is not None and result.get("profiles"):
        settings.profile_out.write_text(profile_text(result["profiles"]))
    if settings.results_md is not None:
        path = Path(settings.results_md)
        text = path.read_text() if path.exists() else ""
        path.write_text(replace_section(text, make_section(result, existing_notes(text, *markers, script)), heading))


# --- the chart ----------------------------------------------------------------------------------------------
TRAINING = ("training", "ratios")
CHART = (  # (label, where its statistics are in a model's summary), one bar each
    ("inference: lorakit unmerged / base", ("inference", "lorakit")),
    ("inference: lorakit merged / base", ("inference", "lorakit merged")),
    ("inference: PEFT unmerged / base", ("inference", "peft")),
    ("inference: PEFT merged / base", ("inference", "peft merged")),
    ("train step: lorakit / full", (*TRAINING, "step lorakit/full")),
    ("train step: PEFT / full", (*TRAINING, "step peft/full")),
    ("train step: lorakit / PEFT", (*TRAINING, "step lorakit/peft")),
    ("train step: lorakit / floor (no adapter)", (*TRAINING, "step lorakit/floor")),
    ("train step: lorakit / floor, lorakit's loss", (*TRAINING, "step lorakit/floor-chunked")),
    ("train step: lorakit DoRA / lorakit LoRA", (*TRAINING, "step lorakit-dora/lorakit")),
    ("train step: lorakit DoRA / PEFT DoRA", (*TRAINING, "step lorakit-dora/peft-dora")),
    ("peak RSS: lorakit / full", (*TRAINING, "memory lorakit/full")),
    ("peak RSS: lorakit / PEFT", (*TRAINING, "memory lorakit/peft")),
    ("peak live tensors: lorakit / PEFT", (*TRAINING, "live lorakit/peft")),
    ("peak RSS: lorakit / floor (no adapter)", (*TRAINING, "memory lorakit/floor")),
    ("peak RSS: lorakit / floor, lorakit's loss", (*TRAINING, "memory lorakit/floor-chunked")),
    ("load + activate: lorakit / PEFT", ("io", "load", "ratio")),
    ("cold load: lorakit / PEFT", ("io", "cold load", "ratio")),
    ("save: lorakit / PEFT", ("io", "save", "ratio")),
    ("switch: lorakit / PEFT", ("io", "switch", "ratio")),
    ("merge: lorakit / PEFT", ("merge", "merge", "ratio")),
    ("unmerge: lorakit / PEFT", ("merge", "unmerge", "ratio")),
)


def chart_rows(summary: dict) -> list[tuple[str, float, float | None, float | None]]:
    """(label, median of per-round ratios, ratio of best times or None, target or None) per bar; the
    targets are TARGETS' ratios, and 1 for merged inference (equal to the base)."""
    limits = {t.path: t.limit for t in TARGETS if t.unit == "x"} | {("inference", "lorakit merged"): 1.0}
    return [(label, at(summary, path)["ratio"], at(summary, path).get("best"), limits.get(path))
            for label, path in CHART]


def plot(result: dict, path: Path) -> None:
    """The ratio chart of every model (bar_chart)."""
    bar_chart({name: chart_rows(summary) for name, summary in result["models"].items()},
              f"lorakit benchmark, run {result['run']} (below 1: lorakit or PEFT is faster / smaller)", path)


def bar_chart(panels: dict[str, list[tuple[str, float, float | None, float | None]]], title: str, path: Path) -> None:
    """Bars from 1 to each ratio (log scale), one panel per model (rows as chart_rows gives them, labels
    "what: a / b", blue where a is lorakit's); a circle marks the ratio of best times where there is one,
    a red tick the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    height = max(6.5, 0.3 * max(len(rows) for rows in panels.values()) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), height), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], panels):
        rows = panels[name][::-1]
        for i, (label, value, best, target) in enumerate(rows):
            ax.barh(i, value - 1, left=1, color="tab:blue" if "lorakit" in label.split(":")[1] else "tab:gray")
            ax.text(value, i, f" {value:.2f} " if value >= 1 else f"{value:.2f} ", va="center", fontsize=8,
                    ha="left" if value >= 1 else "right")
            if best is not None:
                ax.plot(best, i, marker="o", markerfacecolor="none", markeredgecolor="black", markersize=5)
            if target is not None:
                ax.plot([target, target], [i - 0.45, i + 0.45], color="red", linewidth=2)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.set_title(pm.TITLES.get(name, name), fontsize=10)
        ax.set_xlabel("ratio: bar = median of per-round ratios, circle = best / best, red = target")
        ax.margins(x=0.2)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
