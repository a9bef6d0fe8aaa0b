"""lorakit.training.train: learning, exact resume, DDP equivalence, NaN handling, crash-safe checkpoints."""
import dataclasses
import json
import os
import re
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
from lorakit.training.checkpoint import find_checkpoint, load_checkpoint, read_tensors
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
    {"dora": True, "dropout": 0.1},
], ids=["plain", "dropout-accum-warmup", "bfloat16-base", "nf4-base-checkpointing", "int8-base", "dora"])
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
    magnitudes = [key for key in expected if key.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == (len(moved) if changes.get("dora") else 0)  # DoRA's magnitude trains and resumes too


def test_checkpoint_holds_optimizer_scheduler_rng_and_data_position(lm_dir, text_file, tmp_path):
    train(config(lm_dir, text_file, tmp_path / "run", steps=6, save_every=3, keep_checkpoints=5))
    folder = tmp_path / "run" / "checkpoints" / "step-3"
    state = load_checkpoint(folder)
    assert state.step == 3
    assert state.scheduler["last_epoch"] == 3
    assert state.data["position"] > 0 or state.data["epoch"] > 0
    assert len(state.rng) == 1 and state.rng[0]["cpu"].dtype == torch.uint8  # a CPU run: no CUDA generator
    assert state.optimizer_groups[0]["lr"] > 0 and "params" not in state.optimizer_groups[0]
    tensors = read_tensors(folder)
    weights = {k.removeprefix("weights."): t for k, t in tensors.items() if k.startswith("weights.")}
    moments = {k.removeprefix("optimizer.").removesuffix(".exp_avg"): t for k, t in tensors.items()
               if k.endswith(".exp_avg")}  # AdamW's moments: one per trainable tensor, of its shape
    assert weights and {k: t.shape for k, t in moments.items()} == {k: t.shape for k, t in weights.items()}
    assert all(float(t) == 3 for k, t in tensors.items() if k.endswith(".step"))
    assert find_checkpoint(tmp_path / "run").name == "step-6"
    assert sorted(os.listdir(folder)) == ["adapter", "rng.safetensors", "state.json", "trainable"]
    assert not list(folder.rglob(".metadata"))  # DCP's pickled metadata file: not written (no pickle)
    model = lk.load_model(lm_dir)[0]  # each checkpoint also holds the adapter in PEFT's layout
    lk.load_adapter(model, folder / "adapter")


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
    if calls["n"] == 2:  # the second checkpoint's RNG file, after its trainable tensors: die mid-write
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


# --- several processes (torchrun, gloo on the CPU) ------------------------------------------------------
WATCH = ROOT / "tests" / "rank_watch.py"
# The distributed runs' options: 2 processes x 2 micro-batches of 1 example = the single run's batch of 4.
RUN = dict(steps=4, batch_size=4, grad_accum=2, save_every=2, keep_checkpoints=5)


def cli_options(cfg: TrainConfig) -> list[str]:
    """`lorakit train` options for the fields `config` sets."""
    return ["--model", cfg.model, "--data", cfg.data, "--out", cfg.out, "--targets", ",".join(cfg.lora.targets),
            "--dropout", str(cfg.lora.dropout), "--steps", str(cfg.steps), "--lr", str(cfg.lr),
            "--batch-size", str(cfg.batch_size), "--grad-accum", str(cfg.grad_accum), "--max-length",
            str(cfg.max_length), "--eval-fraction", str(cfg.eval_fraction), "--seed", str(cfg.seed), "--save-every",
            str(cfg.save_every), "--keep-checkpoints", str(cfg.keep_checkpoints), "--no-progress",
            *(["--strategy", cfg.strategy] if cfg.strategy else []), *(["--resume", cfg.resume] if cfg.resume else [])]


def torchrun(cfg: TrainConfig, records: Path | None = None, kill: str | None = None,
             processes: int = 2) -> subprocess.CompletedProcess:
    """`lorakit train` for `cfg` in `processes` processes under torchrun, watched by tests/rank_watch.py."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if records is not None:
        records.mkdir(parents=True, exist_ok=True)
        env["LORAKIT_TEST_RECORDS"] = str(records)
    if kill is not None:
        env["LORAKIT_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(WATCH), "train", *cli_options(cfg)],
                          cwd=ROOT, capture_output=True, env=env, timeout=300)


def resume_copy(run: Path, step: int, into: Path) -> Path:
    """A run folder holding only `run`'s step-`step` checkpoint (and its log): as if it had stopped there."""
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / f"step-{step}", into / "checkpoints" / f"step-{step}")
    (into / "checkpoints" / "latest").write_text(f"step-{step}\n")
    shutil.copy(run / "log.jsonl", into / "log.jsonl")
    return into


# Gradients are sums of float32 terms taken in another order (per process, then across processes), so they
# agree to ~1e-7 relative; AdamW's m / sqrt(v) magnifies that for an element whose gradient is near zero, so
# after 4 steps allow 1e-4 relative, 1e-6 absolute (B ~ 1e-2). A missing or doubled reduction is off by ~lr.
ACROSS_PROCESSES = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def runs(lm_dir, text_file, tmp_path_factory):
    """The same run alone and under each strategy (run once each, on first use): name -> (out, records)."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(name: str) -> tuple[Path, Path]:
        if name not in done:
            out, records = root / name, root / f"{name}-records"
            cfg = config(lm_dir, text_file, out, **RUN, strategy=None if name == "single" else name)
            if name == "single":
                train(cfg)
            else:
                proc = torchrun(cfg, records)
                assert proc.returncode == 0, proc.stderr.decode()[-3000:]
                assert proc.stdout.decode().count("trainable") == 1  # only rank 0 reports
            done[name] = out, records
        return done[name]
    return run


def rank1_writes(out: Path, records: Path) -> list[str]:
    """What rank 1 wrote, opened for writing, renamed or removed in `out`, relative to it."""
    record = json.loads((records / "rank1.json").read_text())
    assert record["save_adapter_calls"] == 0
    return sorted({os.path.relpath(p, out) for p in record["written"] if Path(p).resolve().is_relative_to(out.resolve())})


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_strategy_equals_one_process_with_the_same_global_batch(runs, strategy):
    """`torchrun --nproc_per_node 2 -m lorakit train --strategy ...` against one process, with gradient
    accumulation; only rank 0 writes files, but for its own shards of FSDP's checkpoints."""
    (single, _), (out, records) = runs("single"), runs(strategy)
    expected, got = adapter_tensors(single), adapter_tensors(out)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **ACROSS_PROCESSES)
    assert [round(r["loss"], 5) for r in log_records(out) if "loss" in r] == \
        [round(r["loss"], 5) for r in log_records(single) if "loss" in r]
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "log.jsonl", "loss.png", "summary.json"]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-2", "step-4"]
    shards = sorted(os.listdir(out / "checkpoints" / "step-4" / "trainable"))
    assert len(shards) == (2 if strategy == "fsdp" else 1)
    written = rank1_writes(out, records)
    if strategy == "ddp":
        assert written == []
    else:  # its shard of the trainable state, in the folder rank 0 renames into place
        assert written and all(re.fullmatch(r"checkpoints/\.step-[24]\.\w+\.tmp/trainable/shard-00002-.*\.safetensors",
                                            path) for path in written), written
    state = read_tensors(out / "checkpoints" / "step-4")  # whole again, whoever wrote which shard
    single_state = read_tensors(single / "checkpoints" / "step-4")
    assert state.keys() == single_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], single_state[key], **ACROSS_PROCESSES)


@pytest.mark.parametrize("source, strategy, processes", [("fsdp", None, 1), ("single", "fsdp", 2)],
                         ids=["fsdp-2-to-1", "single-1-to-fsdp-2"])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path, source, strategy, processes):
    """DCP reshards: FSDP's step-2 checkpoint (each process wrote its shards) resumes in one process, and a
    one-process checkpoint under FSDP; both end where the uninterrupted one-process run did."""
    (single, _), (out, _) = runs("single"), runs(source)
    resumed = resume_copy(out, 2, tmp_path / "resumed")
    saved = TrainConfig.from_dict(json.loads((single / "summary.json").read_text())["config"])
    cfg = dataclasses.replace(saved, out=str(resumed), resume=str(resumed), strategy=strategy)
    if processes == 1:
        train(cfg)
    else:
        proc = torchrun(cfg)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    expected, got = adapter_tensors(single), adapter_tensors(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **ACROSS_PROCESSES)


@pytest.mark.slow
def test_fsdp_resume_after_a_rank_is_killed_equals_the_uninterrupted_run(lm_dir, text_file, tmp_path):
    """Rank 1 is SIGKILLed as the step-4 checkpoint starts: torchrun stops the run, `latest` still names
    step-2, and the run resumed from it (dropout on: each rank's RNG state restored) ends exactly where an
    uninterrupted run does; the half-built checkpoint is cleared away."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cfg = config(lm_dir, text_file, whole, **{**RUN, "keep_checkpoints": 2}, strategy="fsdp", dropout=0.2)
    assert torchrun(cfg).returncode == 0
    proc = torchrun(dataclasses.replace(cfg, out=str(killed)), kill="1:2")
    assert proc.returncode != 0 and not (killed / "adapter").exists()
    assert find_checkpoint(killed).name == "step-2"
    proc = torchrun(dataclasses.replace(cfg, out=str(killed), resume=str(killed)))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    expected, got = adapter_tensors(whole), adapter_tensors(killed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["latest", "step-2", "step-4"]


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


def test_strategy_options_are_checked_with_the_config():
    with pytest.raises(lk.LoraError) as err:
        TrainConfig(strategy="zero3")
    assert "strategy='zero3': must be one of ddp, fsdp" in str(err.value)
    with pytest.raises(lk.LoraError, match="base_dtype='int8' with strategy='fsdp': bitsandbytes' Int8Params"):
        TrainConfig(strategy="fsdp", base=lk.BasePrecision(base_dtype="int8"))
    TrainConfig(strategy="ddp", base=lk.BasePrecision(base_dtype="int8"))  # DDP leaves the parameters as they are
    with pytest.raises(lk.LoraError, match="strategy='ddp' needs processes started by torchrun"):
        train(TrainConfig(strategy="ddp", progress=False))  # alone: refused before anything loads


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


def test_a_checkpoint_of_the_earlier_format_is_a_clear_error(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"step": 3, "optimizer_param_groups": []}))
    with pytest.raises(lk.LoraError, match="a checkpoint of an older lorakit \\(format 1; this one reads 2\\)"):
        load_checkpoint(tmp_path)


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
