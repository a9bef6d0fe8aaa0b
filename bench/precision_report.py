"""bench/precision.py's results as text: the tables, the verdicts against the issue's targets, the "Base
precision" section of RESULTS.md (other sections untouched) and the ratio chart. The verdict rules, table
layout and section handling are bench/perf_report.py's."""
from __future__ import annotations

from pathlib import Path

import perf_models as pm
from perf_load import CLEAN_CPUS
from perf_report import (Target, at, bar_chart, code_line, load_text, machine_line, model_parts, number,
                         ratio_range, results_section, table, write_report)

HEADING = "## Base precision: training on a bfloat16, int8 or nf4 base, lorakit vs PEFT"
NOTES_BEGIN, NOTES_END = "<!-- precision-notes:begin -->", "<!-- precision-notes:end -->"
RATIOS = ("training", "ratios")
TARGETS = (  # the ("Lower the hardware barrier"); the 0.45x memory one is stated for SmolLM2
    Target("training step, lorakit bfloat16 base / PEFT float32", 0.5, "x", (*RATIOS, "step lorakit-bf16/peft-f32")),
    Target("training step, lorakit bfloat16 base / PEFT bfloat16 base", 0.9, "x",
           (*RATIOS, "step lorakit-bf16/peft-bf16")),
    Target("peak RSS (load included), lorakit nf4 / PEFT float32 LoRA (SmolLM2)", 0.45, "x",
           (*RATIOS, "peak lorakit-nf4/peft-f32")),
    Target("peak RSS (load included), lorakit nf4 / PEFT + bitsandbytes nf4", 1.0, "x",
           (*RATIOS, "peak lorakit-nf4/peft-nf4")),
    Target("peak live tensors, lorakit nf4 / PEFT + bitsandbytes nf4", 1.0, "x", (*RATIOS, "live lorakit-nf4/peft-nf4")),
    Target("training step, lorakit nf4 / lorakit bfloat16", 1.2, "x", (*RATIOS, "step lorakit-nf4/lorakit-bf16")),
)
LABELS = {"full-f32": "full fine-tuning, float32", "lorakit-f32": "lorakit, float32 base",
          "lorakit-bf16": "lorakit, bfloat16 base", "lorakit-int8": "lorakit, int8 base (LLM.int8)",
          "lorakit-nf4": "lorakit, nf4 base (QLoRA)", "peft-f32": "PEFT, float32 base", "peft-bf16": "PEFT, bfloat16 base",
          "peft-int8": "PEFT + bitsandbytes int8", "peft-nf4": "PEFT + bitsandbytes nf4",
          "lorakit-nf4-gc": "lorakit, nf4 base, gradient checkpointing",
          "peft-nf4-gc": "PEFT + bitsandbytes nf4, gradient checkpointing"}


def verdicts(summary: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, state, explanation) for every target whose configurations were measured."""
    return [(f"{t.name} <= {number(t.limit, t.unit)}", *t.verdict(summary)) for t in TARGETS
            if t.path[-1] in summary["training"]["ratios"]]


# --- tables ----------------------------------------------------------------------------------------------
def configuration_table(summary: dict) -> str:
    rows = []
    for name, v in summary["training"]["variants"].items():
        rows.append([LABELS.get(name, name), v["precision"], str(v["quantized_layers"]), f"{v['trainable']:,}",
                     "/".join(v["trainable_dtypes"]), f"{v['step_ms']:.0f}", f"{v['min_ms']:.0f}",
                     f"{v['forward_ms']:.0f}", f"{v['backward_ms']:.0f}", f"{v['optimizer_ms']:.0f}",
                     f"{v['runtime_rss_mb']:.0f}", f"{v['load_peak_rss_mb']:.0f}", f"{v['loaded_rss_mb']:.0f}",
                     f"{v['peak_rss_mb']:.0f}", f"{v['peak_mb']:.0f}", f"{v['net_peak_mb']:.0f}",
                     f"{v['live_peak_mb']:.0f}"])
    return table(["configuration", "base held", "bnb layers", "trainable", "trainable dtype", "step ms (median)",
                   "best", "forward", "backward", "AdamW", "RSS after imports MB", "peak up to loaded",
                   "RSS after load", "peak while training", "peak, load included", "peak less imports",
                   "peak live tensors MB"], rows, "lllrlrrrrrrrrrrrr")


def ratio_table(summary: dict) -> str:
    r = summary["training"]["ratios"]
    rows = []
    for pair in dict.fromkeys(key.split(" ", 1)[1] for key in r):
        a, b = pair.split("/")
        rows.append([f"{LABELS.get(a, a)} / {LABELS.get(b, b)}", ratio_range(r[f"step {pair}"]),
                     f"{r[f'step {pair}']['best']:.3f}x", ratio_range(r[f"cpu {pair}"]), f"{r[f'peak {pair}']['ratio']:.3f}x",
                     f"{r[f'memory {pair}']['ratio']:.3f}x", f"{r[f'net {pair}']['ratio']:.3f}x",
                     f"{r[f'live {pair}']['ratio']:.3f}x"])
    return table(["ratio", "step time: median of per-round ratios (range)", "best / best", "process CPU time per step",
                   "peak RSS, load included", "peak RSS while training", "peak less imports", "peak live tensors"],
                  rows, "lrrrrrrr")


def verdict_table(summary: dict) -> str:
    return table(["target", "measured", "verdict"],
                  [[name, measured, f"**{state}**: {why}"] for name, measured, state, why in verdicts(summary)], "lrl")


def model_block(name: str, summary: dict) -> str:
    s, t = summary["shape"], summary["training"]
    return "\n".join([
        f"### {pm.TITLES.get(name, name)}",
        "",
        f"Adapter: rank {s['rank']}, alpha {s['alpha']:g}, no dropout, on {', '.join(s['targets'])}. Batch {s['batch']} x "
        f"{s['seq']} random tokens; {s['warmup']} warm-up + {s['steps']} timed rounds of one step per configuration, "
        f"the processes taking turns. Rounds used (clean: other work under {CLEAN_CPUS} CPUs while the round ran; "
        f"all rounds when fewer than 3 were): {t['rounds_used']} of {t['rounds']}.",
        "",
        "Targets:",
        "",
        verdict_table(summary),
        "",
        "Configurations (`base held`: lk.precision_of on the trained model; `bnb layers`: bitsandbytes "
        "quantized layers; memory in MB):",
        "",
        configuration_table(summary),
        "",
        ratio_table(summary),
    ])


def body(result: dict) -> str:
    """The run's facts, then every model's tables."""
    meta = result["meta"]
    parts = [
        f"Command: `{meta['command']}` (mode {meta['mode']}, run `{result['run']}`, {meta['seconds'] / 60:.1f} min). "
        f"Date: {meta['machine']['date']}." + (f" Label: {meta['label']}." if meta.get("label") else ""),
        "",
        f"Machine: {machine_line(meta)}. Load average (1/5/15 min) {load_text(meta['machine']['loadavg'])} at the start "
        f"and {load_text(meta.get('loadavg_end'))} at the end; rounds waited for a quiet machine "
        f"({meta.get('waited_for_quiet_s', 0):.0f} s in all). " + code_line(meta),
        "",
        "Each configuration is a fresh process that first imports torch, transformers, PEFT and bitsandbytes "
        "(`RSS after imports`), then loads the model from the same directory (`peak up to loaded`, `RSS after "
        "load`): lorakit with `lk.load_base(directory, base)`, PEFT and full fine-tuning with transformers' "
        "`from_pretrained(dtype=...)`, for int8 and nf4 with a `BitsAndBytesConfig` (nf4: double quantization, "
        "bfloat16 compute; the rest of the model bfloat16, the output head unquantized), then "
        "`peft.get_peft_model`. The RSS high-water mark is then reset and read after the timed rounds (`peak "
        "while training`); `peak, load included` is the larger of the two peaks, `peak less imports` the same "
        "less the runtime. `peak live tensors` counts only the tensors created during one more step (not the "
        "weights). The step is zero_grad, the mean causal-LM loss (lorakit: `lorakit train`'s chunked loss; "
        "PEFT and full: the model's `labels=` loss), backward, AdamW, with no autocast: each base computes in "
        "its own dtype (bitsandbytes' layers in bfloat16), the float32 adapters in float32.",
    ]
    return "\n".join(parts + model_parts(result, model_block, "one step", "precision_profile.txt"))


def section(result: dict, notes: str) -> str:
    return results_section(HEADING, "make bench-precision", "precision", result, body(result), notes,
                           (NOTES_BEGIN, NOTES_END))


def write_outputs(result: dict, settings) -> None:
    """The chart, the profile text and the RESULTS.md section, each where settings say (None: skipped)."""
    write_report(result, settings, plot, section, HEADING, (NOTES_BEGIN, NOTES_END), "bench/precision.py")


# --- the chart ----------------------------------------------------------------------------------------------
CHART = (("train step", "step"), ("peak RSS, load incl.", "peak"), ("peak live tensors", "live"))


def chart_rows(summary: dict) -> list[tuple[str, float, float | None, float | None]]:
    """(label, median of per-round ratios, ratio of best times or None, target or None) per bar."""
    limits = {t.path[-1]: t.limit for t in TARGETS}
    ratios = summary["training"]["ratios"]
    pairs = list(dict.fromkeys(key.split(" ", 1)[1] for key in ratios))
    return [(f"{what}: {pair.replace('/', ' / ')}", at(summary, (*RATIOS, f"{metric} {pair}"))["ratio"],
             ratios[f"{metric} {pair}"].get("best"), limits.get(f"{metric} {pair}"))
            for what, metric in CHART for pair in pairs]


def plot(result: dict, path: Path) -> None:
    bar_chart({name: chart_rows(summary) for name, summary in result["models"].items()},
              f"lorakit base precision benchmark, run {result['run']} (below 1: a is faster / smaller than b)", path)
