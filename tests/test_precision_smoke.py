"""bench/precision.py still runs: every configuration (float32 / bfloat16 / int8 / nf4 bases, lorakit and PEFT,
full fine-tuning) on a tiny GPT-2 in a few seconds, records, verdicts and report included."""
import json
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))  # the harness's modules import each other by name, as when run as scripts

import perf  # noqa: E402
import perf_models as pm  # noqa: E402
import perf_report  # noqa: E402
import perf_step  # noqa: E402
import precision  # noqa: E402
import precision_report  # noqa: E402

TINY = perf.Case("gpt2-tiny", train_batch=2, train_seq=8, train_warmup=1, train_steps=2)
HELD = {"f32": "float32", "bf16": "bfloat16", "int8": "int8", "nf4": "nf4"}  # short name -> lk.precision_of


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One whole run on the tiny GPT-2, every configuration in this process."""
    tmp_path = tmp_path_factory.mktemp("precision")
    settings = precision.Settings(cases=(TINY,), threads=1, isolate=False, quiet_budget_s=0, profile=False,
                                  out=tmp_path / "precision.jsonl", plot=tmp_path / "precision.png",
                                  profile_out=None, results_md=tmp_path / "RESULTS.md")
    result = precision.run(settings)
    result["meta"]["command"] = "pytest"
    return settings, result


def test_every_configuration_steps_once_a_round_and_is_recorded(tiny_run):
    settings, result = tiny_run
    records = [json.loads(line) for line in settings.out.read_text().splitlines()]
    configs = list(precision.CONFIGS)
    rounds = TINY.train_warmup + TINY.train_steps
    assert Counter(r["kind"] for r in records) == {"meta": 1, "train_step": len(configs) * rounds,
                                                   "train": len(configs), "summary": 1, "end": 1}
    steps = [r for r in records if r["kind"] == "train_step"]
    for round_ in range(rounds):  # the order rotates one place a round
        order = [r["variant"] for r in steps if r["round"] == round_]
        assert order == perf.rotated(configs, round_)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["step_ms"] > 0 for r in steps)


def test_each_configuration_holds_the_base_it_names(tiny_run):
    _, result = tiny_run
    variants = result["models"]["gpt2-tiny"]["training"]["variants"]
    for name, v in variants.items():
        library, short, *gc = name.split("-")
        assert v["precision"] == HELD[short], name  # measured on the trained model, not taken from the spec
        assert v["trainable_dtypes"] == ["float32"], name  # adapters (and full fine-tuning) train in float32
        assert (v["quantized_layers"] > 0) == (short in ("int8", "nf4")), name
        assert v["checkpointing"] == bool(gc), name
    for short in ("f32", "bf16", "int8", "nf4", "nf4-gc"):  # the twins: the same adapter on the same base layers
        lorakit, peft = variants[f"lorakit-{short}"], variants[f"peft-{short}"]
        assert lorakit["trainable"] == peft["trainable"] < variants["full-f32"]["trainable"]
        assert lorakit["quantized_layers"] == peft["quantized_layers"]
    # tiny GPT-2: its 2 c_attn, c_proj, c_fc and mlp.c_proj layers are quantized; the tied output head is not
    assert variants["lorakit-nf4"]["quantized_layers"] == 2 * 4


def test_memory_is_measured_from_imports_through_training(tiny_run):
    _, result = tiny_run
    summary = result["models"]["gpt2-tiny"]["training"]
    for name, v in summary["variants"].items():
        assert 0 < v["runtime_rss_mb"] <= v["peak_mb"], name
        assert v["peak_mb"] == max(v["load_peak_rss_mb"], v["peak_rss_mb"])
        assert v["net_peak_mb"] == pytest.approx(v["peak_mb"] - v["runtime_rss_mb"])
        # every float32 gradient is alive at once when backward ends
        assert v["live_peak_mb"] * 2**20 >= 4 * v["trainable"], name
    for a, b in precision.PAIRS:
        ratios = summary["ratios"]
        assert ratios[f"peak {a}/{b}"]["ratio"] == pytest.approx(
            summary["variants"][a]["peak_mb"] / summary["variants"][b]["peak_mb"])
        assert ratios[f"step {a}/{b}"]["rounds"] == TINY.train_steps


def test_the_twin_bases_store_the_same_weights(tmp_path):
    """lk.load_base and transformers' BitsAndBytesConfig (written out as PEFT's users do) store the same base:
    every weight, dequantized where quantized, is equal, and quantized ones differ from the float32 model's."""
    from lorakit.core.precision import dense_weight, is_quantized

    directory = pm.model_source("gpt2-tiny", tmp_path)
    reference = dict(pm.build_base("gpt2-tiny").named_modules())
    for base in precision.BASES:
        lorakit, peft = (dict(pm.load_base(directory, base, loader).named_modules())
                         for loader in ("lorakit", "transformers"))
        assert lorakit.keys() == peft.keys() == reference.keys()
        quantized = [path for path, module in lorakit.items() if is_quantized(module)]
        assert len(quantized) == (8 if base in ("int8", "nf4") else 0)  # the tied output head stays unquantized
        for path, module in lorakit.items():
            if getattr(module, "weight", None) is None:
                continue
            mine, theirs = dense_weight(module), dense_weight(peft[path])
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), (base, path)
            if path in quantized:  # really quantized: moved from the float32 weight (Conv1D's is (in, out))
                # (how far is tests/test_precision.py's business; bitsandbytes' CPU nf4 is off for rows under
                # 64 weights, as this tiny model's, and both loaders alike)
                assert not torch.equal(mine.float(), reference[path].weight.t()), (base, path)


def test_report_has_a_verdict_per_target_and_keeps_other_sections(tiny_run, tmp_path):
    settings, result = tiny_run
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Benchmarks\n\n{perf_report.HEADING}\n\nkeep me\n")
    precision_report.write_outputs(result, replace(settings, results_md=md, plot=tmp_path / "p.png"))
    text = md.read_text()
    assert "keep me" in text and text.count(precision_report.HEADING) == 1
    assert (tmp_path / "p.png").stat().st_size > 0
    md.write_text(text.replace("(hand-written notes on this run go here; `bench/precision.py` keeps them)", "my notes")
                  + "\n## Later section\n\nalso kept\n")
    precision_report.write_outputs(result, replace(settings, results_md=md, plot=None))
    text = md.read_text()
    assert "my notes" in text and "also kept" in text and "keep me" in text
    assert text.count(precision_report.HEADING) == 1
    rows = precision_report.verdicts(result["models"]["gpt2-tiny"])
    assert len(rows) == len(precision_report.TARGETS)
    assert {state for _, _, state, _ in rows} <= {perf_report.MET, perf_report.NOT_MET, perf_report.INCONCLUSIVE}
    assert len(precision_report.chart_rows(result["models"]["gpt2-tiny"])) == 3 * len(precision.PAIRS)


def test_a_quantized_base_needs_a_directory_and_full_fine_tuning_a_float32_model():
    with pytest.raises(ValueError, match="needs directory="):
        perf_step.StepSpec(model="gpt2-tiny", base="nf4")
    with pytest.raises(ValueError, match="full fine-tuning trains a float32 model"):
        perf_step.StepSpec(model="gpt2-tiny", variant="full", base="bfloat16", directory="x")
    with pytest.raises(ValueError, match="base='fp8'"):
        perf_step.StepSpec(model="gpt2-tiny", base="fp8", directory="x")


def test_quick_settings_shorten_every_case_and_leave_results_md_alone():
    settings = precision.settings_from(["--quick", "--models", "smollm2-135m"])
    assert [c.model for c in settings.cases] == ["smollm2-135m"]
    assert all((c.train_warmup, c.train_steps) == (1, 2) for c in settings.cases)
    assert settings.results_md is None and settings.plot is None and not settings.profile
    assert asdict(precision.settings_from(["--steps", "3"]))["cases"][0]["train_steps"] == 3


@pytest.mark.slow
def test_a_fresh_process_records_its_memory_from_imports_to_training(tmp_path):
    """An nf4 lorakit configuration in its own process (process start and imports: several seconds)."""
    directory = pm.model_source("gpt2-tiny", tmp_path)
    spec = perf_step.StepSpec(model="gpt2-tiny", variant="lorakit", base="nf4", directory=str(directory), batch=2,
                              seq=8, threads=1, preload=precision.PRELOAD)
    result = perf_step.lockstep({"lorakit-nf4": spec}, rounds=2, isolate=True)
    stats = result["stats"]["lorakit-nf4"]
    assert stats["precision"] == "nf4" and stats["quantized_layers"] == 8
    # the high-water mark up to loaded covers the process after its imports and after loading (a tiny model
    # may load in less than loading frees, so those two are not ordered)
    assert 0 < max(stats["runtime_rss_mb"], stats["loaded_rss_mb"]) <= stats["load_peak_rss_mb"]
    assert stats["peak_rss_mb"] >= stats["rss_before_mb"] > 0
