"""bench/cache_load.py still runs: its steps on a tiny Llama in a few seconds, records included."""
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

import tiny

pytest.importorskip("peft")  # bench/common.py records its version

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # the harness's modules import each other by name, as when run as scripts

import cache_load as bench  # noqa: E402


def test_run_times_every_miss_checks_profiles_and_records(tmp_path):
    model = tiny.causal_lm_dir(tmp_path / "lm")
    settings = bench.Settings(model=str(model), adapters=9, capacity=3, cycles=2, threads=1, profile_misses=3,
                              check_rows=2, quiet_wait_s=0, out=tmp_path / "r.jsonl")
    summary = bench.run(settings)
    assert summary["check"]["passed"] and summary["check"]["names"][-1] is None
    assert (summary["misses"], summary["evicting"]) == (18, 15)  # the first three fill the cache
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert Counter(r["kind"] for r in records) == {"meta": 1, "miss": 18, "profile": 1, "summary": 1}
    assert len({r["run"] for r in records}) == 1
    misses = [r for r in records if r["kind"] == "miss"]
    assert [r["adapter"] for r in misses] == [f"a{i:03d}" for i in range(9)] * 2
    assert all("others_cpus" in r for r in misses)  # the machine's other work, per block of misses
    assert "aten::" in (tmp_path / "r_profile.txt").read_text()
    table = bench.table(summary, settings).splitlines()
    assert table[4].startswith("| 18 (15) |") and "| pass " in table[4]
    assert table[2].count("|") == table[3].count("|") == table[4].count("|")  # header, rule and row agree


def test_quick_is_a_smaller_run():
    quick, full = bench.settings_from(["--quick"]), bench.settings_from([])
    assert (quick.adapters, quick.cycles, quick.profile_misses) == (40, 1, 0)
    assert (full.adapters, full.capacity, full.cycles, full.model) == (300, 8, 2, "smollm2-135m")  # the run
    assert bench.settings_from(["--capacity", "4", "--gc-freeze"]).capacity == 4
