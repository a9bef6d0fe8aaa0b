"""lorakit.study: spec errors name their field; a killed study resumes without redoing runs; the report is
recomputed from the runs' own summary.json files (means and stds as numpy computes them); a quick study end
to end on a tiny model; --suggest picks the smallest setting within the margin; TensorBoard event files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny
from lorakit.errors import LoraError
from lorakit.study.report import build_report
from lorakit.study.results import METRICS, cells
from lorakit.study.runner import LOG_FILE, run_study
from lorakit.study.spec import load_spec, spec_from_dict
from lorakit.study.suggest import suggest
from lorakit.training.config import TrainConfig
from lorakit.training.datasets import load_dataset, sample_dataset, split_dataset
from lorakit.training.train import SUMMARY_FILE, train

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"a": "the lord god king", "b": "man son house land", "c": "day time way first"}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny.encoder_dir(tmp_path_factory.mktemp("models") / "encoder")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A 3-way task the tiny encoder can learn: each label's texts draw most words from its own list."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(60):
        label = "abc"[i % 3]
        words = [rng.choice(LABELS[label].split()) if rng.random() < 0.7 else rng.choice(tiny.WORDS) for _ in range(6)]
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path = tmp_path_factory.mktemp("data") / "labels.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def spec_dict(encoder, data, **top) -> dict:
    """Two LoRA arms (one sweeping two learning rates) and full fine-tuning, two data sizes, two seeds."""
    return {"name": "tiny", "seeds": [0, 1], "data_sizes": [12, 0],
            "train": {"model": str(encoder), "data": str(data), "task": "classify", "steps": 3, "batch_size": 4,
                      "max_length": 12, "eval_fraction": 0.25},
            "sweep": {"data_size": 0, "seed": 0},
            "arms": [{"name": "qv", "targets": ["query", "value"], "ranks": [2], "lrs": [1e-3, 1e-2]},
                     {"name": "ffn", "targets": ["intermediate.dense"], "ranks": [1], "lr_from": "qv",
                      "data_sizes": [0]},
                     {"name": "full", "full": True, "lrs": [1e-4], "data_sizes": [0], "seeds": [0]}],
            **top}


def events(out: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (out / LOG_FILE).read_text().splitlines()) if e["event"] == name]


# --- spec --------------------------------------------------------------------------------------------
def test_spec_errors_name_every_bad_field_at_once(encoder, labelled):
    raw = spec_dict(encoder, labelled, seeds=[0, -1], colour="red")
    raw["train"]["stepz"] = 3
    raw["arms"][0]["ranks"] = [0]
    raw["arms"][1]["lr_from"] = "nowhere"
    raw["arms"].append({"name": "qv", "targets": "query"})
    with pytest.raises(LoraError) as err:
        spec_from_dict(raw)
    message = str(err.value)
    for field in ("colour: unknown field", "seeds=[0, -1]", "train.stepz", "arms[0].ranks=[0]",
                  "arms[1].lr_from='nowhere'", "arms[3].targets='query'"):
        assert field in message, field
    with pytest.raises(LoraError, match=r"train.steps=0: must be a positive integer"):
        spec_from_dict({**spec_dict(encoder, labelled), "train": {"steps": 0}})


def test_spec_files_toml_and_yaml_read_the_same(encoder, labelled, tmp_path):
    yaml = pytest.importorskip("yaml")
    raw = spec_dict(encoder, labelled)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "s.json").write_text(json.dumps(raw))
    assert load_spec(tmp_path / "s.yaml") == load_spec(tmp_path / "s.json") == spec_from_dict(raw)
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(LoraError, match=r"bad.toml.*not valid TOML"):
        load_spec(tmp_path / "bad.toml")
    for shipped in sorted((ROOT / "docs" / "study").glob("*.toml")):
        assert load_spec(shipped).arms  # the specs `make study` runs parse


def test_sample_dataset_keeps_the_held_out_set_and_names_the_field(encoder, labelled):
    from lorakit.zoo import load_tokenizer

    data = load_dataset(labelled, "classify", load_tokenizer(str(encoder)), 12)
    train_part, held_out = split_dataset(data, 0.25, seed=3)
    small = sample_dataset(train_part, 10, seed=3)
    assert len(small.examples) == 10 and all(e in train_part.examples for e in small.examples)
    assert sample_dataset(train_part, 10, seed=3) == small and sample_dataset(train_part, 0, 3) == train_part
    with pytest.raises(LoraError, match=r"train_examples=999: .* only 45 training example"):
        sample_dataset(train_part, 999, seed=3)


# --- running, resuming, reporting --------------------------------------------------------------------
def test_quick_study_end_to_end_report_recomputed_from_summaries(encoder, labelled, tmp_path):
    spec = spec_from_dict(spec_dict(encoder, labelled))
    out = tmp_path / "study"
    runs = run_study(spec, out, jobs=1, progress=False, threads=1)  # here (the killed study below uses workers)
    # qv's sweep (2 lrs), then qv 2 sizes x 2 seeds, ffn 2 seeds, full 1: the chosen sweep run is reused
    assert len(runs.sweep) == 2 and len(runs.grid) == 7 and len(events(out, "run_done")) == 8
    done = {e["run"] for e in events(out, "run_done")}
    assert done == {r.name for r in runs.sweep} | {r.name for r in runs.grid}
    assert all((r.folder / SUMMARY_FILE).is_file() for r in runs.grid)
    report = build_report(spec, out)
    for name in ("report.md", "report.json", "quality_vs_data.png", "gap_vs_data.png", "quality_vs_params.png",
                 "cost.png", "w0_spectra.png"):
        assert (out / name).stat().st_size > 0, name
    # every mean and std is numpy's over the runs' own summary.json files
    summaries = {r.name: json.loads((r.folder / SUMMARY_FILE).read_text()) for r in runs.grid}
    for cell in report["cells"]:
        members = [r for r in runs.grid if (r.arm, r.rank, r.data_size, r.lr) ==
                   (cell["arm"], cell["rank"], cell["data_size"], cell["lr"])]
        values = np.array([summaries[r.name]["last_eval"]["eval_accuracy"] for r in members])
        assert cell["n"] == len(members)
        assert cell["metric"] == pytest.approx(values.mean())
        assert cell["metric_std"] == pytest.approx(values.std(ddof=1) if len(values) > 1 else 0.0)
        assert cell["trainable"] == summaries[members[0].name]["trainable_parameters"]
    # paired by seed: ffn minus qv on the same seed (same split), as numpy computes it
    accuracy = {(r.arm, r.seed): summaries[r.name]["last_eval"]["eval_accuracy"] for r in runs.grid if r.data_size == 0}
    ffn = next(d for d in report["paired"]["differences"] if d["arm"] == "ffn")
    differences = np.array([accuracy[("ffn", seed)] - accuracy[("qv", seed)] for seed in (0, 1)])
    assert report["paired"]["reference"] == "qv" and ffn["n"] == 2
    assert (ffn["difference"], ffn["difference_std"]) == pytest.approx((differences.mean(), differences.std(ddof=1)))
    # change one run's summary: the regenerated report says so
    target = next(r for r in runs.grid if r.arm == "full")
    summary = summaries[target.name]
    summary["last_eval"]["eval_accuracy"] = 0.123456
    (target.folder / SUMMARY_FILE).write_text(json.dumps(summary))
    again = build_report(spec, out, with_figures=False)
    assert next(c for c in again["cells"] if c["arm"] == "full")["metric"] == pytest.approx(0.123456)
    assert "0.123 ± 0.000 (n=1)" in (out / "report.md").read_text()


def test_a_killed_study_resumes_without_redoing_finished_runs(encoder, labelled, tmp_path):
    raw = spec_dict(encoder, labelled)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(raw))
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "study", str(spec_file), "--out", str(out),
                                "--jobs", "2"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180  # generous: a loaded 2-core machine trains the first runs slowly
    while time.monotonic() < deadline and (not (out / LOG_FILE).exists() or len(events(out, "run_done")) < 3):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the study, its forkserver and its worker, mid-run
    process.wait()
    first = {e["run"] for e in events(out, "run_done")}
    assert 3 <= len(first) < 8, "killed too late to test resuming; give the tiny study more runs"
    runs = run_study(spec_from_dict(raw), out, jobs=1, progress=False, threads=1)
    second = {e["run"] for e in events(out, "run_done")} - first
    everything = {r.name for r in runs.sweep + runs.grid}
    assert first.isdisjoint(second) and first | second == everything  # each run trained exactly once
    assert {e["run"] for e in events(out, "run_skip")} >= first
    assert all(r.key == json.loads((r.folder / "study_run.json").read_text())["config_hash"] for r in runs.grid)


# --- suggest -------------------------------------------------------------------------------------------
def _records(rows) -> list[dict]:
    """Constructed records: (arm, rank, trainable, accuracies over seeds) at all data."""
    return [{"run": f"{arm}-{rank}-{seed}", "arm": arm, "full": arm == "full", "rank": rank, "targets": [arm],
             "data_size": 0, "train_examples": 100, "lr": 1e-3, "seed": seed, "metric": value,
             "train_metric": value, "gap": 0.0, "trainable": trainable, "seconds": 1.0, "peak_rss_bytes": 1,
             "saved_bytes": 1} for arm, rank, trainable, values in rows for seed, value in enumerate(values)]


def test_suggest_picks_the_smallest_setting_within_the_margin():
    rows = [("qv", 1, 100, [0.80, 0.82]), ("qv", 4, 400, [0.885, 0.895]), ("qv", 16, 1600, [0.90, 0.90]),
            ("mlp", 2, 300, [0.86, 0.86]), ("full", 0, 10 ** 6, [0.95, 0.95])]
    found = suggest(cells(_records(rows)), METRICS["classify"], margin=0.01)
    assert (found.best["arm"], found.best["rank"]) == ("qv", 16)  # full fine-tuning is not a candidate
    assert (found.chosen["arm"], found.chosen["rank"]) == ("qv", 4)  # 0.89 is within 0.01 of 0.90; mlp is not
    assert [found.within(c) for c in found.candidates] == [False, False, True, True]
    wide = suggest(cells(_records(rows)), METRICS["classify"], margin=0.05)
    assert (wide.chosen["arm"], wide.chosen["rank"]) == ("mlp", 2)
    perplexity = [("qv", 1, 100, [12.0]), ("qv", 4, 400, [10.4]), ("qv", 16, 1600, [10.0])]
    low = suggest(cells(_records(perplexity)), METRICS["causal-lm"], margin=0.5)  # lower is better
    assert (low.best["rank"], low.chosen["rank"]) == (16, 4)


# --- TensorBoard ---------------------------------------------------------------------------------------
def test_report_to_tensorboard_writes_a_readable_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lm = tiny.causal_lm_dir(tmp_path / "lm")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(tiny.TEXT.strip().splitlines() * 4) + "\n")
    cfg = TrainConfig(model=str(lm), data=str(text), out=str(tmp_path / "run"), steps=5, lr=1e-2, batch_size=4,
                      max_length=16, eval_fraction=0.25, progress=False, report_to="tensorboard")
    train(cfg)
    events_dir = tmp_path / "run" / "tensorboard"
    assert list(events_dir.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events_dir))
    accumulator.Reload()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in log if "loss" in r]
    scalars = accumulator.Scalars("train/loss")
    assert [e.step for e in scalars] == [step for step, _ in losses] == [1, 2, 3, 4, 5]
    assert [e.value for e in scalars] == pytest.approx([loss for _, loss in losses], rel=1e-6)  # float32 there
    assert [e.step for e in accumulator.Scalars("eval/eval_loss")] == [0, 5]
    assert {"train/lr", "eval/eval_perplexity"} <= set(accumulator.Tags()["scalars"])
    with pytest.raises(LoraError, match=r"report_to='wandb'"):
        TrainConfig(report_to="wandb")


def test_a_study_from_flags_is_the_spec_they_describe(encoder, labelled, tmp_path):
    from lorakit.cli import build_parser
    from lorakit.cli.study import flag_spec

    args = build_parser().parse_args(["study", "--model", str(encoder), "--data", str(labelled), "--task", "classify",
                                      "--target-set", "attn=query,value", "--target-set", "ffn=intermediate.dense",
                                      "--ranks", "1,8", "--lrs", "1e-3,1e-2", "--seeds", "0,1", "--steps", "5",
                                      "--out", str(tmp_path / "mine"), "--suggest", "--margin", "0.02"])
    spec = spec_from_dict(flag_spec(args), source="flags")
    assert [(a.name, a.targets, a.ranks, a.lrs, a.seeds, a.sweep_rank) for a in spec.arms] == [
        ("attn", ("query", "value"), (1, 8), (1e-3, 1e-2), (0, 1), 8),
        ("ffn", ("intermediate.dense",), (1, 8), (1e-3, 1e-2), (0, 1), 8)]
    assert (spec.train.model, spec.train.task, spec.train.steps) == (str(encoder), "classify", 5)
    with pytest.raises(LoraError, match="--model and --data"):
        flag_spec(build_parser().parse_args(["study", "--out", str(tmp_path)]))


def test_a_second_study_on_the_same_folder_is_refused(encoder, labelled, tmp_path):
    import fcntl

    from lorakit.study.runner import LOCK_FILE

    (tmp_path / "study").mkdir()
    with open(tmp_path / "study" / LOCK_FILE, "a+") as held:  # as a running study holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LoraError, match=r"another lorakit study is running on this folder"):
            run_study(spec_from_dict(spec_dict(encoder, labelled)), tmp_path / "study", jobs=1, progress=False)
    assert not list((tmp_path / "study").glob("runs*"))  # nothing trained


def test_a_diverged_sweep_run_is_recorded_scored_worst_and_not_retried(encoder, labelled, tmp_path):
    raw = spec_dict(encoder, labelled, data_sizes=[0], seeds=[0])
    raw["train"]["max_bad_steps"] = 1  # the first NaN/Inf step ends the run
    raw["arms"] = [{"name": "qv", "targets": ["query", "value"], "ranks": [2], "lrs": [1e-3, 1e30]}]
    spec, out = spec_from_dict(raw), tmp_path / "study"
    runs = run_study(spec, out, jobs=1, progress=False, threads=1)
    assert runs.lrs == {"qv": 1e-3}
    assert [e["run"] for e in events(out, "run_failed")] == ["qv-r2-nall-lr1e+30-s0"]
    run_study(spec, out, jobs=1, progress=False, threads=1)  # again: nothing to do
    assert len(events(out, "run_failed")) == 1 and len(events(out, "run_done")) == 1
    report = build_report(spec, out, with_figures=False, with_spectra=False)
    assert [f["run"] for f in report["failed_runs"]] == ["qv-r2-nall-lr1e+30-s0"]
    assert "diverged" in report["failed_runs"][0]["error"] and len(report["records"]) == 1
