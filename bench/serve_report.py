"""bench/serve.py's results as text and a chart: the tables, the verdicts against the targets, and the
markdown section bench/results/serve.md holds (for whoever merges it into RESULTS.md)."""
from __future__ import annotations

from pathlib import Path

from perf_load import CLEAN_CPUS
from perf_report import INCONCLUSIVE, MET, NOT_MET, code_line, load_text, machine_line, table
from serve_http import load_stats

HEADING = "## Serving: `lorakit serve` under concurrent clients, many adapters, vs PEFT"
LOAD_LIMIT_MS = 10.0
LOAD_SHARE = 0.99  # "at most 10 ms": the 99th percentile


def labels(settings: dict) -> dict[str, str]:
    return {"a": "(a) lorakit serve, base", "b": f"(b) lorakit serve, {settings['adapters']} adapters",
            "c": "(c) PEFT, one request at a time", "d": "(d) PEFT, one batch per adapter"}


# --- verdicts ----------------------------------------------------------------------------------------------
def _state(results: list[bool]) -> str:
    return MET if all(results) else NOT_MET if not any(results) else INCONCLUSIVE


def at_least(stats: dict, limit: float) -> tuple[str, str, str]:
    """(measured, state, why) for a throughput ratio that must be >= limit: the median of per-round ratios
    and the ratio of the best rounds must agree for met / not met."""
    estimates = {"median of rounds": stats["ratio"], "best / best": stats["best"]}
    measured = (f"{stats['ratio']:.2f}x median ({stats['min']:.2f}-{stats['max']:.2f} over {stats['rounds']} rounds); "
                f"{stats['best']:.2f}x best / best")
    return measured, _state([v >= limit for v in estimates.values()]), f"limit {limit:g}x"


def load_verdict(result: dict) -> tuple[str, str, str]:
    """First-use loads at most 10 ms: at the 99th percentile of the server's misses (the histogram's 10 ms
    bucket bound is exact), for every adapter count that missed, and in the in-process load path."""
    served = {n: load_stats(s["cache"]["loads"], LOAD_LIMIT_MS / 1e3) for n, s in result["scaling"].items()}
    shares = {n: stats["share_within"] for n, stats in served.items() if stats["count"] > 0}
    path = result["load_path"]
    measured = "; ".join([f"{n} adapters: {100 * share:.0f}% of {served[n]['count']:.0f} misses <= 10 ms"
                          for n, share in shares.items()]
                         + [f"load path in process: p99 {path['all']['p99']:.1f} ms, max {path['max_ms']:.1f} ms"])
    results = [share >= LOAD_SHARE for share in shares.values()] + [path["all"]["p99"] <= LOAD_LIMIT_MS]
    return measured, _state(results), f"p99 <= {LOAD_LIMIT_MS:g} ms"


def verdicts(result: dict) -> list[tuple[str, str, str, str]]:
    ratios = result["compare"]["ratios"]
    return [("(b) throughput >= 0.85x (a)", *at_least(ratios["b/a"], 0.85)),
            ("(b) throughput >= 4x (c)", *at_least(ratios["b/c"], 4.0)),
            (f"first-use adapter load <= 10 ms, flat as adapters cycle "
             f"(--max-loaded {result['meta']['settings']['scaling_max_loaded']})", *load_verdict(result))]


# --- tables ----------------------------------------------------------------------------------------------------
def _ms(stats: dict, key: str) -> str:
    return "-" if stats[key] is None else f"{stats[key]:.0f}" if stats[key] >= 100 else f"{stats[key]:.1f}"


def _others(values: list) -> str:
    known = [v for v in values if v is not None]
    return f"{max(known):.2f}" if known else "?"


def _rounds(values: list, used: list[int], digits: int) -> str:
    """Every round's value, a * on those left out (other work) and "-" where there was none."""
    return ", ".join("-" if v is None else f"{v:.{digits}f}" + ("" if i in used else "*") for i, v in enumerate(values))


def latency_cells(s: dict) -> list[str]:
    return [_ms(s["ttft_ms"], "p50"), _ms(s["ttft_ms"], "p99"), _ms(s["itl_ms"], "p50"), _ms(s["itl_ms"], "p99")]


def compare_table(compare: dict, settings: dict) -> str:
    variants, rows, label = compare["variants"], [], labels(settings)
    for name, s in variants.items():
        ratio = compare["ratios"][f"{name}/a"]["ratio"] if name != "a" else 1.0
        rounds = _rounds(s["rounds"], s["used"], 0)
        rows.append([label[name], f"{s['throughput']:.1f}", rounds, f"{ratio:.2f}x", *latency_cells(s),
                     f"{s['requests']}", f"{s['tokens']}", f"{100 * s['ran_to_limit']:.0f}%", f"{s['errors']}",
                     _others(s["others"])])
    return table(["configuration", "tokens/s (median)", "rounds", "vs (a), median of rounds", "TTFT p50 ms",
                  "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "requests", "tokens", "ran to max_tokens", "errors",
                  "other CPUs (max)"],
                 rows, "lrrrrrrrrrrrr")


def scaling_table(scaling: dict) -> str:
    rows = []
    for n, s in scaling.items():
        cache, stats = s["cache_all"], load_stats(s["cache"]["loads"], LOAD_LIMIT_MS / 1e3)
        rounds = _rounds(s["round_load_ms"], s["used"], 1)
        rows.append([str(n), f"{s['throughput']:.1f}", f"{s['vs_first']['ratio']:.2f}x", *latency_cells(s),
                     f"{cache['misses']:.0f}", f"{cache['hits']:.0f}", f"{cache['evictions']:.0f}",
                     _ms(stats, "mean_ms"), _ms(stats, "p50_ms"), _ms(stats, "p99_ms"), _ms(stats, "max_le_ms"),
                     "-" if stats["share_within"] is None else f"{100 * stats['share_within']:.0f}%", rounds])
    return table(["adapters registered", "tokens/s (median)", "vs 1 adapter", "TTFT p50 ms", "TTFT p99 ms",
                  "ITL p50 ms", "ITL p99 ms", "misses", "hits", "evictions", "load ms: mean", "p50 (hist.)",
                  "p99 (hist.)", "max <=", "<= 10 ms", "mean per round"], rows, "rrrrrrrrrrrrrrrl")


def load_path_line(path: dict) -> str:
    others = "unknown" if path["others"] is None else f"{path['others']:.2f}"
    return (f"The load path alone, in this process (`AdapterCache.ensure` of {path['adapters']} adapters in turn "
            f"through {path['slots']} slots: {path['calls']} calls, {path['misses']} misses, {path['evictions']} "
            f"evictions; other work meanwhile {others} CPUs): p50 {path['all']['p50']:.2f} ms, p99 "
            f"{path['all']['p99']:.2f} ms, max {path['max_ms']:.2f} ms, mean {path['mean_ms']:.2f} ms; p50 over the "
            f"first {path['adapters']} calls {path['first_cycle']['p50']:.2f} ms, over the last "
            f"{path['last_cycle']['p50']:.2f} ms.")


def verdict_table(result: dict) -> str:
    return table(["target", "measured", "verdict"],
                 [[name, measured, f"**{state}**: {why}"] for name, measured, state, why in verdicts(result)], "lll")


def body(result: dict) -> str:
    meta, s = result["meta"], result["meta"]["settings"]
    compare = result["compare"]
    return "\n".join([
        f"Command: `{meta['command']}` (mode {meta['mode']}, run `{result['run']}`, {meta['seconds'] / 60:.1f} min). "
        f"Date: {meta['machine']['date']}." + (f" Label: {meta['label']}." if meta.get("label") else ""),
        "",
        f"Machine: {machine_line(meta)}. Load average (1/5/15 min) {load_text(meta['machine']['loadavg'])} at the "
        f"start and {load_text(meta.get('loadavg_end'))} at the end; runs waited for a quiet machine "
        f"({meta.get('waited_for_quiet_s', 0):.0f} s in all; quiet: other work under {CLEAN_CPUS} CPUs), and the CPUs "
        f"other work used during each run are recorded. " + code_line(meta),
        "",
        f"Workload: {s['model']} (float32), prompts of exactly {s['prompt_tokens']} tokens (windows of "
        f"{Path(s['text']).name}), greedy, max_tokens {s['max_tokens']}; throughput counts the tokens generated over "
        f"the run's wall time. (a) and (b): one `lorakit serve` (--max-loaded {s['adapters']}), {s['concurrency']} "
        f"streaming clients (`openai` client; each sends its next request when its last one is answered; their first "
        f"requests spread over {compare['spread_s']:.1f} s, one request's latency in the warm-up, so that requests "
        f"arrive spread out rather than in waves), {compare['requests']} requests a round, (b)'s round-robin over "
        f"{compare['adapters']} rank-{s['rank']} q_proj/v_proj adapters; TTFT from sending the request to the "
        f"first text chunk, ITL the gaps between chunks. (c) and (d): PEFT in the benchmark's process. Servers and "
        f"PEFT run with {s['threads']} torch thread(s) each. In round r (c) and (d) answer the requests of adapters r, "
        f"r + {s['rounds']}, ... (so (b)'s requests once over the rounds, in (b)'s groups); TTFT from `set_adapter` "
        f"to the first token `generate` streams, ITL the gaps between tokens. {s['rounds']} timed rounds after a "
        f"warm-up, the order rotating. Rounds marked * had other work over {CLEAN_CPUS} CPUs during a run and are "
        "left out of the medians, ratios, latencies and load times (when at least 2 rounds were clean).",
        "",
        "### Targets",
        "",
        verdict_table(result),
        "",
        "### (a)-(d)",
        "",
        compare_table(compare, s),
        "",
        f"### Scaling with the adapters registered (--max-loaded {s['scaling_max_loaded']})",
        "",
        f"One server per count, started together; {s['scaling_rounds']} rounds of {s['scaling_requests']} requests "
        f"to each in turn, round-robin over its adapters, {s['concurrency']} clients. Cache counters and the load "
        "histogram (`lorakit_adapter_load_seconds`: the engine's time in `AdapterCache.ensure` on a miss, eviction "
        "included) from /metrics, after a warm-up on the base (misses, hits, evictions: every round; load times: "
        "the rounds used); the histogram's quantiles are interpolated within "
        "its buckets (bounds 5, 10, 25 ms ...), so below 10 ms only the mean (exact: sum / count) and the share "
        "<= 10 ms (a bucket bound) are exact.",
        "",
        scaling_table(result["scaling"]),
        "",
        load_path_line(result["load_path"]),
    ])


def section(result: dict) -> str:
    plot = "\n\n![serving](results/serve.png)" if result.get("plot") else ""
    return (f"{HEADING}\n\n`make bench-serve` runs `bench/serve.py`: every record in `bench/results/serve.jsonl`; "
            f"the charts in `bench/results/serve.png`.{plot}\n\n{body(result)}\n")


def write_outputs(result: dict, settings) -> None:
    """The chart and the markdown section, each where settings say (None: skipped)."""
    if settings.plot is not None:
        plot(result, settings.plot)
        result["plot"] = str(settings.plot)
    if settings.markdown is not None:
        Path(settings.markdown).write_text(section(result))


# --- the chart ------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    """Four panels: throughput (a)-(d) with the targets, their latencies, scaling with adapters, load times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    settings = result["meta"]["settings"]
    throughput_panel(axes[0][0], result["compare"], labels(settings))
    latency_panel(axes[0][1], result["compare"], labels(settings))
    scaling_panel(axes[1][0], result["scaling"], settings["scaling_max_loaded"])
    load_panel(axes[1][1], result)
    fig.suptitle(f"lorakit serve benchmark, run {result['run']} ({result['meta']['settings']['model']}, "
                 f"{result['meta']['settings']['concurrency']} clients)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_panel(ax, compare: dict, label: dict[str, str]) -> None:
    """Median tokens/s per configuration, whiskers over the rounds; red ticks on (b): 0.85x (a) and 4x (c)."""
    variants = compare["variants"]
    names = list(variants)
    medians = [variants[n]["throughput"] for n in names]
    low = [m - min(variants[n]["rounds"]) for m, n in zip(medians, names)]
    high = [max(variants[n]["rounds"]) - m for m, n in zip(medians, names)]
    ax.bar(range(len(names)), medians, yerr=[low, high], capsize=4,
           color=["tab:blue" if n in ("a", "b") else "tab:gray" for n in names])
    for i, m in enumerate(medians):
        ax.text(i, m, f"{m:.0f}\n", ha="center", va="bottom", fontsize=8)
    b = names.index("b")
    targets = ((0.85 * variants["a"]["throughput"], "0.85 x (a)"), (4 * variants["c"]["throughput"], "4 x (c)"))
    for target, text in targets:
        ax.plot([b - 0.45, b + 0.45], [target, target], color="red", linewidth=2)
        ax.text(b + 0.47, target, text, color="red", va="center", fontsize=8)
    _variant_ticks(ax, names, label)
    ax.set_ylabel("generated tokens / s (median of rounds; whiskers: range)")
    ax.set_title("throughput; red: the targets for (b)", fontsize=10)


def _variant_ticks(ax, names: list[str], label: dict[str, str]) -> None:
    ax.set_xticks(range(len(names)), [label[n].replace(", ", ",\n", 1) for n in names], fontsize=8)


def latency_panel(ax, compare: dict, label: dict[str, str]) -> None:
    variants = compare["variants"]
    names = list(variants)
    series = (("TTFT p50", "ttft_ms", "p50"), ("TTFT p99", "ttft_ms", "p99"), ("ITL p50", "itl_ms", "p50"),
              ("ITL p99", "itl_ms", "p99"))
    width = 0.8 / len(series)
    for k, (what, key, q) in enumerate(series):
        values = [variants[n][key][q] or 0.0 for n in names]
        ax.bar([i + (k - 1.5) * width for i in range(len(names))], values, width, label=what)
    ax.set_yscale("log")
    _variant_ticks(ax, names, label)
    ax.set_ylabel("ms (log scale)")
    ax.set_title("time to first token and inter-token latency", fontsize=10)
    ax.legend(fontsize=8)


def scaling_panel(ax, scaling: dict, slots: int) -> None:
    counts = list(scaling)
    ax.bar(range(len(counts)), [scaling[n]["throughput"] for n in counts], color="tab:blue", alpha=0.7,
           label="tokens/s")
    ax.set_xticks(range(len(counts)), [f"{n} adapters" for n in counts], fontsize=8)
    ax.set_ylabel("generated tokens / s (median of rounds)")
    twin = ax.twinx()
    for q, style in (("p50", "o-"), ("p99", "s--")):
        twin.plot(range(len(counts)), [scaling[n]["ttft_ms"][q] for n in counts], style, color="tab:orange",
                  label=f"TTFT {q}")
    twin.set_ylabel("TTFT ms")
    twin.legend(fontsize=8, loc="upper right")
    ax.set_title(f"scaling with adapters registered ({slots} loaded at most)", fontsize=10)


def load_panel(ax, result: dict) -> None:
    """The in-process load path, call by call; the server's histogram means per round in the legend."""
    path = result["load_path"]
    ax.plot(range(1, len(path["ms"]) + 1), path["ms"], ".", markersize=3, color="tab:blue",
            label=f"AdapterCache.ensure in process ({path['adapters']} adapters, {path['slots']} slots)")
    ax.axhline(LOAD_LIMIT_MS, color="red", linewidth=1.5, label=f"target {LOAD_LIMIT_MS:g} ms")
    for n, s in result["scaling"].items():
        if any(m is not None for m in s["round_load_ms"]):
            means = _rounds(s["round_load_ms"], s["used"], 1)
            ax.plot([], [], " ", label=f"server, {n} adapters: mean ms per round {means}")
    ax.set_xlabel("call (each a miss)")
    ax.set_ylabel("adapter load ms")
    ax.set_ylim(bottom=0)
    ax.set_title("adapter load on a cache miss", fontsize=10)
    ax.legend(fontsize=7)
