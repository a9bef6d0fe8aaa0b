"""lorakit.training.train: learning, exact resume, DDP equivalence, NaN handling, crash-safe checkpoints."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lorakit as lk
import tiny
from lorakit.training.checkpoint import find_checkpoint, load_checkpoint
from lorakit.training.config import TrainConfig
from lorakit.training.train import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return tiny.causal_lm_dir(tmp_path_factory.mktemp("models") / "lm")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    paragraphs = [line for line in tiny.TEXT.strip().splitlines()]
    path.write_text("\n\n".join(paragraphs * 6) + "\n")
    return path


LORA_FIELDS = {f.name for f in dataclasses.fields(lk.LoraConfig)}


def config(lm_dir, text_file, out, **changes) -> TrainConfig:
    """A short run; `changes` may name TrainConfig's and LoraConfig's fields alike."""
    lora = lk.LoraConfig(**{"targets": ("q_proj", "v_proj"), **{k: v for k, v in changes.items() if k in LORA_FIELDS}})
    base = dict(model=str(lm_dir), data=str(text_file), out=str(out), lora=lora,
                steps=8, lr=5e-3, batch_size=4, max_length=16, eval_fraction=0.25, progress=False, seed=3)
    return TrainConfig(**{**base, **{k: v for k, v in changes.items() if k not in LORA_FIELDS}})


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_lora_training_lowers_held_out_loss_and_writes_its_files(lm_dir, text_file, tmp_path):
    cfg = config(lm_dir, text_file, tmp_path / "run", steps=30, lr=3e-2, alpha=32, targets="all-linear")
    result = train(cfg)
    assert result.last_eval["eval_loss"] < result.first_eval["eval_loss"] - 1.0
    assert 0 < result.trainable < result.total / 2  # tiny model; real ones: see test_real_models
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "log.jsonl", "loss.png", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "lora" and summary["steps"] == 30
    assert summary["config"]["lora"] == {**lk.LoraConfig().to_dict(), "alpha": 32, "targets": ["all-linear"]}
    assert TrainConfig.from_dict(summary["config"]) == cfg  # the whole config, LoRA's nested
    assert summary["best_eval"]["eval_loss"] == min(e["eval_loss"] for e in [result.first_eval, result.last_eval])
    steps = [r for r in log_records(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved adapter is a normal lorakit/PEFT adapter for the base model.
    model = lk.load_model(lm_dir)[0]
    lk.load_adapter(model, out / "adapter")
    assert lk.adapter_config(model, "default").rank == 8


def test_full_fine_tuning_uses_the_same_loop(lm_dir, text_file, tmp_path):
    result = train(config(lm_dir, text_file, tmp_path / "full", full=True, steps=10, lr=2e-3))
    assert result.trainable == result.total
    assert result.last_eval["eval_loss"] < result.first_eval["eval_loss"]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")  # a complete model folder


@pytest.mark.parametrize("changes", [
    {}, {"dropout": 0.2, "grad_accum": 2, "warmup": 3, "schedule": "linear"},
    {"base": lk.BasePrecision(base_dtype="bfloat16")},
    {"base": lk.BasePrecision(base_dtype="nf4"), "grad_checkpointing": True},
    {"base": lk.BasePrecision(base_dtype="int8")},
], ids=["plain", "dropout-accum-warmup", "bfloat16-base", "nf4-base-checkpointing", "int8-base"])
def test_resume_equals_uninterrupted_run(lm_dir, text_file, tmp_path, changes):
    whole = tmp_path / "whole"
    train(config(lm_dir, text_file, whole, steps=8, save_every=4, **changes))
    # A second run that stopped after step 4: only the step-4 checkpoint exists.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    (resumed / "checkpoints" / "latest").write_text("step-4\n")
    shutil.copy(whole / "log.jsonl", resumed / "log.jsonl")
    train(config(lm_dir, text_file, resumed, steps=8, save_every=4, resume=str(resumed), **changes))
    expected, got = adapter_tensors(whole), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    moved = [key for key in expected if "lora_B" in key]
    assert moved and all(torch.count_nonzero(expected[key]) > 0 for key in moved)  # B starts at zero: it trained


def test_checkpoint_holds_optimizer_scheduler_rng_and_data_position(lm_dir, text_file, tmp_path):
    train(config(lm_dir, text_file, tmp_path / "run", steps=6, save_every=3, keep_checkpoints=5))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-3")
    assert state.step == 3
    assert state.scheduler["last_epoch"] == 3
    assert state.data["position"] > 0 or state.data["epoch"] > 0
    assert len(state.rng) == 1 and state.rng[0].dtype == torch.uint8
    slots = state.optimizer["state"].values()  # AdamW's moments: one slot per trainable tensor, of its shape
    assert sorted(s["exp_avg"].shape for s in slots) == sorted(w.shape for w in state.weights.values())
    assert len(slots) > 0 and all(float(s["step"]) == 3 for s in slots)
    assert find_checkpoint(tmp_path / "run").name == "step-6"
    model = lk.load_model(lm_dir)[0]  # each checkpoint also holds the adapter in PEFT's layout
    lk.load_adapter(model, tmp_path / "run" / "checkpoints" / "step-3" / "adapter")


def test_nan_steps_are_skipped_and_persistent_nan_stops(lm_dir, text_file, tmp_path, monkeypatch):
    import lorakit.training.train as training

    real = training.summed_loss
    calls = {"n": 0}

    def sometimes_nan(model, batch, task, device, bf16=False):
        loss, logits = real(model, batch, task, device, bf16)
        calls["n"] += 1
        return (loss * float("nan"), logits) if model.training and calls["n"] in (3, 4) else (loss, logits)

    monkeypatch.setattr(training, "summed_loss", sometimes_nan)
    result = train(config(lm_dir, text_file, tmp_path / "some", steps=6, eval_fraction=0.0))
    assert result.skipped_steps >= 1
    records = [r for r in log_records(tmp_path / "some") if "loss" in r]
    assert any(r["skipped"] for r in records) and not records[-1]["skipped"]
    weights = adapter_tensors(tmp_path / "some")
    assert all(torch.isfinite(t).all() for t in weights.values())

    monkeypatch.setattr(training, "summed_loss", lambda *a, **k: (real(*a, **k)[0] * float("inf"), None))
    with pytest.raises(lk.LoraError, match="diverged: 2 steps in a row.*lower lr"):
        train(config(lm_dir, text_file, tmp_path / "all", steps=6, eval_fraction=0.0, max_bad_steps=2))


KILLER = """
import os, signal, sys
import lorakit.training.checkpoint as checkpoint
from lorakit.training.config import TrainConfig
from lorakit.training.train import train
real = checkpoint.save_file
calls = {"n": 0}
def dying_save(tensors, path, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 5:  # the second checkpoint's second file: die mid-write
        with open(path, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, *args, **kwargs)
checkpoint.save_file = dying_save
train(TrainConfig.from_dict(__import__("json").loads(sys.argv[1])))
"""


def test_sigkill_mid_checkpoint_leaves_the_previous_one_intact(lm_dir, text_file, tmp_path):
    out = tmp_path / "run"
    cfg = config(lm_dir, text_file, out, steps=6, save_every=2).to_dict()
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(cfg)], cwd=ROOT, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert find_checkpoint(out).name == "step-2"
    state = load_checkpoint(out)
    assert state.step == 2
    # ... and the run resumes from it to the end.
    result = train(config(lm_dir, text_file, out, steps=6, save_every=2, resume=str(out)))
    assert result.steps == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-4", "step-6"]


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(lm_dir, text_file, tmp_path):
    """`torchrun --nproc_per_node 2 -m lorakit train ...` (gloo on CPU) against one process."""
    single = tmp_path / "single"
    train(config(lm_dir, text_file, single, steps=4, batch_size=4, grad_accum=1))
    ddp = tmp_path / "ddp"
    options = ["--model", str(lm_dir), "--data", str(text_file), "--out", str(ddp), "--targets", "q_proj,v_proj",
               "--steps", "4", "--lr", "5e-3", "--batch-size", "4", "--max-length", "16", "--eval-fraction", "0.25",
               "--seed", "3", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "lorakit", "train", *options],
        cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    expected, got = adapter_tensors(single), adapter_tensors(ddp)
    # Gradients agree to ~1e-7; AdamW's m / sqrt(v) magnifies that for an element whose gradient is
    # near zero, so after 4 steps allow 1e-3 relative. A missing or wrong reduction is off by ~lr (5e-3).
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-6)
    single_log = [r for r in log_records(single) if "loss" in r]
    ddp_log = [r for r in log_records(ddp) if "loss" in r]
    assert [round(r["loss"], 5) for r in single_log] == [round(r["loss"], 5) for r in ddp_log]
    assert proc.stdout.decode().count("trainable") == 1  # only rank 0 reports


def test_grad_checkpointing_and_bf16_autocast_run(lm_dir, text_file, tmp_path):
    result = train(config(lm_dir, text_file, tmp_path / "gc", steps=3, grad_checkpointing=True, bf16=True))
    assert result.skipped_steps == 0
    assert torch.isfinite(torch.tensor(result.last_eval["eval_loss"]))


def test_bad_options_are_reported_together():
    with pytest.raises(lk.LoraError) as err:
        TrainConfig(lora={"rank": 8}, steps=0, lr=-1.0, schedule="exp", batch_size=6, grad_accum=4, eval_fraction=1.5)
    message = str(err.value)
    for fragment in ("6 problem(s)", "lora={'rank': 8}: must be a LoraConfig", "steps=0", "lr=-1.0", "schedule='exp'",
                     "grad_accum=4: must divide batch_size=6", "eval_fraction=1.5"):
        assert fragment in message


def test_the_lora_options_are_a_loraconfig_with_its_defaults():
    assert TrainConfig().lora == lk.LoraConfig()  # one source of LoRA defaults: targets=None, the architecture's
    cfg = TrainConfig(lora=lk.LoraConfig(rank=4, rank_pattern={"q_proj": 2}, modules_to_save=("pooler",)))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_classifier_head_joins_the_modules_to_save_given():
    given = TrainConfig(lora=lk.LoraConfig(modules_to_save=("pooler.dense",)))
    assert given.adapter_config("classifier") == given.lora.replace(modules_to_save=("pooler.dense", "classifier"))
    assert given.adapter_config(None) == given.lora  # causal-lm: no head
    named = TrainConfig(lora=lk.LoraConfig(modules_to_save=("classifier",)))
    assert named.adapter_config("classifier") == named.lora  # named already: once


def test_classify_saves_the_new_head_and_the_modules_to_save_given(tmp_path):
    model_dir = tiny.encoder_dir(tmp_path / "encoder")
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in
                            [("the lord said", "lord"), ("the king of the land", "land")] * 4))
    result = train(TrainConfig(model=str(model_dir), data=str(data), task="classify", out=str(tmp_path / "run"),
                               lora=lk.LoraConfig(modules_to_save=("pooler.dense",)), steps=2, batch_size=4,
                               eval_fraction=0.0, progress=False))
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    expected = [name for name, _ in reference.named_modules() if name.endswith("pooler.dense") or name == "classifier"]
    assert [path for path, _ in lk.saved_modules(result.model)] == expected == ["bert.pooler.dense", "classifier"]
    saved = adapter_tensors(tmp_path / "run")
    assert {f"base_model.model.{path}.weight" for path in expected} <= saved.keys()


def test_resume_without_checkpoint_is_a_clear_error(lm_dir, text_file, tmp_path):
    with pytest.raises(lk.LoraError, match="resume=.*no checkpoint there"):
        train(config(lm_dir, text_file, tmp_path / "x", resume=str(tmp_path / "nothing")))


@pytest.mark.slow
def test_short_real_run_lowers_held_out_loss(tmp_path):
    """SmolLM2-135M, rank 8 on q_proj/v_proj, a few steps on King James verses."""
    result = train(TrainConfig(model="smollm2-135m", data=str(ROOT / "data" / "kjv_sample.txt"), out=str(tmp_path),
                               lora=lk.LoraConfig(targets=("q_proj", "v_proj")), steps=6, lr=2e-3, batch_size=4, max_length=48, eval_fraction=0.05, progress=False))
    assert result.last_eval["eval_loss"] < result.first_eval["eval_loss"] - 0.1
    assert result.trainable / result.total < 0.01


@pytest.mark.slow
def test_short_real_classifier_run_beats_chance(tmp_path):
    """all-MiniLM-L6-v2 on WordNet supersenses (6 classes): LoRA (on BERT's default targets, query and
    value) + a new head, under 1% trainable."""
    result = train(TrainConfig(model="minilm-l6", data=str(ROOT / "data" / "wordnet_supersenses.jsonl"),
                               task="classify", out=str(tmp_path), steps=40, lr=3e-3, batch_size=32, max_length=32,
                               eval_fraction=0.1, progress=False))
    assert result.last_eval["eval_accuracy"] > 0.6 > 2 * result.first_eval["eval_accuracy"]
    assert result.trainable / result.total < 0.01
