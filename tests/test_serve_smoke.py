"""bench/serve.py still runs: (a)-(d) and the scaling servers on a tiny Llama in about half a minute (real
`lorakit serve` processes), records, report and chart included; its statistics against references."""
import json
import random
import signal
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("openai")
pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # the harness's modules import each other by name, as when run as scripts

import serve  # noqa: E402
import serve_http  # noqa: E402
import serve_report  # noqa: E402
from tiny import WORDS, causal_lm_dir  # noqa: E402


def tiny_settings(tmp_path: Path) -> "serve.Settings":
    text = tmp_path / "text.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(2000)))
    return serve.Settings(model=str(causal_lm_dir(tmp_path / "model")), text=text, prompt_tokens=16, max_tokens=8,
                          concurrency=4, adapters=4, requests=8, rounds=2, scaling=(1, 4), scaling_max_loaded=2,
                          scaling_requests=8, scaling_rounds=2, threads=1, quiet_budget_s=0, adapter_cache=None,
                          out=tmp_path / "serve.jsonl", plot=tmp_path / "serve.png", markdown=tmp_path / "serve.md")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    settings = tiny_settings(tmp_path_factory.mktemp("serve"))
    result = serve.run(settings)
    result["meta"]["command"] = "pytest"
    serve_report.write_outputs(result, settings)
    return settings, result


def test_every_configuration_answers_every_request_and_is_recorded(tiny_run):
    settings, result = tiny_run
    records = [json.loads(line) for line in settings.out.read_text().splitlines()]
    runs = [r for r in records if r["kind"] == "run"]
    timed = [r for r in runs if r["round"] >= 0]
    assert Counter(r["kind"] for r in records if r["kind"] != "request") == {
        "meta": 1, "run": 4 + 4 * 2 + 2 * 2, "summary": 1, "end": 1}  # warm-ups, (a)-(d) x 2, scaling 2 x 2
    assert all(r["errors"] == 0 and r["tokens"] > 0 for r in runs)
    for round_ in range(settings.rounds):  # the order rotates one place a round
        order = [r["variant"] for r in timed if r["phase"] == "compare" and r["round"] == round_]
        assert order == serve.rotated(list(serve.VARIANTS), round_)
    # (c) and (d) answer (b)'s requests once over the rounds, each round those of its share of the adapters
    requests = [r for r in records if r["kind"] == "request" and r["phase"] == "compare"]
    per = {v: Counter(r["adapter"] for r in requests if r["variant"] == v) for v in serve.VARIANTS}
    assert per["c"] == per["d"] == Counter({f"a{i:03d}": 2 for i in range(4)})
    assert per["b"] == Counter({f"a{i:03d}": 2 * settings.rounds for i in range(4)})
    assert per["a"] == Counter({settings.model: settings.requests * settings.rounds})
    assert all(r["tokens"] <= settings.max_tokens and len(r["itl_ms"]) <= r["tokens"] for r in requests)


def test_scaling_reads_misses_and_loads_from_the_servers(tiny_run):
    settings, result = tiny_run
    one, four = result["scaling"][1]["cache_all"], result["scaling"][4]["cache_all"]
    assert (one["misses"], one["loads"]["count"]) == (1, 1)  # one adapter: loaded once, then hits
    # four adapters round-robin through two slots: every request a miss, less what a batch shares
    assert four["misses"] == four["loads"]["count"] > 2 and four["evictions"] == four["misses"] - 2
    path = result["load_path"]
    assert path["calls"] == path["misses"] == 4 * settings.load_path_cycles and path["evictions"] == path["calls"] - 2


def test_report_has_the_targets_tables_and_chart(tiny_run):
    settings, result = tiny_run
    text = settings.markdown.read_text()
    assert text.startswith(serve_report.HEADING) and "| (b) throughput >= 0.85x (a) |" in text
    assert text.count("\n| (a) lorakit serve, base |") == 1 and "| 4 |" in text
    rows = serve_report.verdicts(result)
    assert len(rows) == 3 and {state for _, _, state, _ in rows} <= {"met", "not met", "inconclusive (noise)"}
    assert settings.plot.stat().st_size > 0


def test_a_server_is_stopped_when_the_block_fails(tmp_path):
    settings = tiny_settings(tmp_path)
    spec = serve_http.ServerSpec("t", settings.model, serve.adapter_root([], tmp_path / "root"), 1, threads=1,
                                 log=tmp_path / "server.log")
    with pytest.raises(KeyError):
        with serve_http.servers([spec]) as [server]:
            assert serve_http.scrape(server.url)["misses"] == 0
            raise KeyError("the benchmark failed")
    assert server.process.returncode in (0, -signal.SIGTERM)


def test_metrics_add_up_across_spans():
    def span(misses, under_5ms, under_10ms):
        return {"misses": misses, "hits": 1.0, "evictions": 0.0,
                "loads": {"count": misses, "sum": 0.5 * misses, "buckets": [(0.005, under_5ms), (0.01, under_10ms)]}}

    total = serve_http.metrics_sum([span(2.0, 1.0, 2.0), span(3.0, 0.0, 3.0)])
    assert (total["misses"], total["hits"], total["loads"]["count"]) == (5.0, 2.0, 5.0)
    assert total["loads"]["buckets"] == [(0.005, 1.0), (0.01, 5.0)]
    assert serve_http.metrics_delta(total, span(2.0, 1.0, 2.0)) == {**span(3.0, 0.0, 3.0), "hits": 1.0}


def test_histogram_quantiles_match_prometheus():
    # 10 loads: 2 in (0, 5 ms], 7 in (5, 10 ms], 1 in (10, 25 ms]
    buckets = [(0.005, 2.0), (0.01, 9.0), (0.025, 10.0), (float("inf"), 10.0)]
    assert serve_http.histogram_quantile(0.5, buckets) == pytest.approx(0.005 + 0.005 * 3 / 7)
    assert serve_http.histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.015 * 0.9)
    assert serve_http.histogram_max(buckets) == 0.025
    stats = serve_http.load_stats({"count": 10.0, "sum": 0.08, "buckets": buckets})
    assert stats["share_within"] == 0.9 and stats["mean_ms"] == pytest.approx(8.0)
    assert serve_http.load_stats({"count": 0.0, "sum": 0.0, "buckets": []})["mean_ms"] is None


def test_percentiles_and_ratios_against_numpy():
    rng = random.Random(1)
    values = [rng.expovariate(10) for _ in range(101)]
    stats = serve.percentiles(values)
    assert stats["p50"] == pytest.approx(1e3 * np.percentile(values, 50))
    assert stats["p99"] == pytest.approx(1e3 * np.percentile(values, 99))
    def runs(throughputs, others):
        return [{"throughput": t, "others": o} for t, o in zip(throughputs, others)]

    ratios = serve.ratio_stats(runs([2.0, 3.0, 9.0], [0.0] * 3), runs([1.0, 2.0, 3.0], [0.1] * 3))  # 2, 1.5, 3
    assert (ratios["ratio"], ratios["min"], ratios["max"], ratios["best"], ratios["rounds"]) == (2.0, 1.5, 3.0, 3.0, 3)
    # a round in which other work was busy during either run is left out (while 2 clean rounds remain)
    ratios = serve.ratio_stats(runs([2.0, 3.0, 9.0], [0.0, 0.0, 0.0]), runs([1.0, 2.0, 3.0], [0.1, 1.0, 0.0]))
    assert (ratios["ratio"], ratios["rounds"], ratios["best"]) == (2.5, 2, 3.0)  # rounds 0 and 2: 2 and 3
    assert serve.used_rounds(runs([1, 1, 1], [1.0, 1.0, 0.0])) == [0, 1, 2]  # one clean round: all are kept


def test_prompts_have_exactly_the_tokens_asked_for(tmp_path):
    from lorakit.zoo import load_tokenizer

    settings = tiny_settings(tmp_path)
    tokenizer = load_tokenizer(settings.model)
    found = serve.prompts(tokenizer, settings.text.read_text(), 16, 10)
    assert len(set(found)) == 10 and all(len(tokenizer(p)["input_ids"]) == 16 for p in found)
    with pytest.raises(ValueError, match="windows of 16 tokens"):
        serve.prompts(tokenizer, "the lord said", 16, 1)


def test_quick_is_a_smaller_run_that_leaves_the_report_alone():
    quick, full = serve.settings_from(["--quick"]), serve.settings_from([])
    assert (full.model, full.prompt_tokens, full.max_tokens, full.adapters) == ("smollm2-135m", 64, 32, 32)
    assert (full.scaling, full.scaling_max_loaded) == ((1, 8, 32, 128), 8)
    assert quick.rounds == 1 and quick.requests < full.requests and quick.plot is None and quick.markdown is None
    partial = serve.settings_from(["--rounds", "5", "--concurrency", "8", "--threads", "1"])
    assert (partial.rounds, partial.concurrency, partial.threads) == (5, 8, 1)


@pytest.mark.slow
def test_quick_runs_on_smollm2(tmp_path):
    """`make bench-serve BENCH_ARGS=--quick` on the bundled SmolLM2-135M (1-2 minutes: three servers load it)."""
    settings = replace(serve.settings_from(["--quick"]), out=tmp_path / "serve.jsonl", quiet_budget_s=0)
    result = serve.run(settings)
    variants = result["compare"]["variants"]
    assert all(v["errors"] == 0 and v["tokens"] > 0 for v in variants.values())
    assert variants["b"]["ran_to_limit"] > 0.9  # the prompts' greedy continuations do not stop early
    assert result["scaling"][max(settings.scaling)]["cache"]["misses"] > settings.scaling_max_loaded
