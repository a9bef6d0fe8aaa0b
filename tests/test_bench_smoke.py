"""bench/mixed_batch.py still runs: its steps on a tiny GPT-2 in a few seconds, records included."""
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "mixed_batch.py"
TINY = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)


def bench_module():
    if str(BENCH.parent) not in sys.path:
        sys.path.insert(0, str(BENCH.parent))  # the harness imports bench/common.py by name, as when run as a script
    spec = importlib.util.spec_from_file_location("mixed_batch_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = bench_module()


def tiny_settings(tmp_path: Path, **changes):
    fields = dict(model=TINY, batch=6, seq=8, ks=(1, 4), repeats=1, threads=1, profile_k=4, out=tmp_path / "r.jsonl")
    return bench.Settings(**{**fields, **changes})


def test_run_checks_times_profiles_and_records_every_case(tmp_path):
    threads = torch.get_num_threads()
    summary = bench.run(tiny_settings(tmp_path))
    assert torch.get_num_threads() == threads  # the run's thread count is not left behind
    cases = [(t, k) for t in ("c_attn", "all-linear") for k in (1, 4)]
    assert [(r["targets"], r["k"], r["variant"]) for r in summary] == [(*c, v) for c in cases for v in bench.VARIANTS]
    assert all(r["check_passed"] for r in summary)

    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert Counter(r["kind"] for r in records) == {"meta": 1, "check": 4, "time": 12, "summary": 12, "profile": 2}
    assert len({r["run"] for r in records}) == 1
    checks = [r for r in records if r["kind"] == "check"]
    assert all(c["passed"] and c["adapter_effect"] > 1e-2 for c in checks)
    assert "aten::" in (tmp_path / "r_profile.txt").read_text()
    table = bench.table(summary).splitlines()
    assert len(table) == 2 + len(cases) and all(line.endswith("| pass |") for line in table[2:])


def test_check_fails_when_peft_holds_other_weights(tmp_path):
    settings = tiny_settings(tmp_path)
    base = bench.build_base(settings)
    lorakit_model = bench.build_lorakit(base, "c_attn", 2, settings)
    peft_model = bench.build_peft(base, lorakit_model, 2)
    ids = torch.randint(0, TINY["vocab_size"], (settings.batch, settings.seq),
                        generator=torch.Generator().manual_seed(0))
    names = bench.routing(2, settings.batch)
    with torch.inference_mode():
        assert bench.check(base, lorakit_model, peft_model, ids, names)["passed"]
    with torch.no_grad():
        next(p for n, p in peft_model.named_parameters() if "lora_B.a1" in n).mul_(2.0)
    with torch.inference_mode():
        result = bench.check(base, lorakit_model, peft_model, ids, names)
    assert not result["passed"] and result["problems"][0].startswith("lorakit vs peft")


def test_a_summary_is_the_median_of_per_round_ratios_to_the_base():
    stats = bench.summarise({"base": [2.0, 4.0, 10.0], "lorakit": [3.0, 4.0, 30.0]})
    # lorakit / base round by round: 1.5, 1.0, 3.0, median 1.5 (the ratio of the medians, 4 / 4, would say 1.0)
    assert stats["lorakit"] == {"median_ms": 4.0, "ratio": 1.5, "min_ms": 3.0, "max_ms": 30.0}
    assert stats["base"] == {"median_ms": 4.0, "ratio": 1.0, "min_ms": 2.0, "max_ms": 10.0}


def test_routing_is_round_robin_and_quick_is_a_smaller_run():
    assert bench.routing(3, 7) == ["a0", "a1", "a2", "a0", "a1", "a2", "a0"]
    quick = bench.settings_from(["--quick"])
    full = bench.settings_from([])
    assert (quick.targets, quick.ks, quick.profile_k) == (("c_attn",), (1, 32), None)
    assert (full.targets, full.ks, full.profile_k) == (("c_attn", "all-linear"), (1, 8, 32), 32)
    assert (full.batch, full.seq, full.model, full.threads) == (32, 64, {}, 2)  # the shapes
    partial = bench.settings_from(["--repeats", "3", "--targets", "all-linear", "--ks", "32", "--no-profile",
                                   "--label", "busy"])
    assert (partial.repeats, partial.targets, partial.ks) == (3, ("all-linear",), (32,))
    assert (partial.profile_k, partial.label) == (None, "busy")
