"""lorakit.cli: complete --help, and train -> eval -> generate -> inspect -> merge end to end on tiny
models, each checked against plain transformers (or a hand-written loop) as the reference."""
import contextlib
import dataclasses
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

import lorakit as lk
import tiny
from lorakit.cli import main
from lorakit.cli.options import config_from_args
from lorakit.cli.parser import build_parser
from lorakit.serving.inference import prompt_texts
from lorakit.training.config import TrainConfig
from lorakit.training.plan import PlanConfig

ROOT = Path(__file__).resolve().parent.parent
PARAGRAPHS = [
    "the lord said unto the man and the man said unto the lord",
    "in the day that the king of the land came to the house of god",
    "he was the son of the king and she was the daughter of the man",
    "they made the house and they called it the house of the lord",
    "the people of the land were many and the king was first",
    "and it was long and the day was made for the people",
]
PROMPTS = ["the lord said", "in the day that the king of the land", "they"]
CLASSIFY = [("the lord said unto the man", "lord"), ("the king of the land", "land"),
            ("the son of god", "lord"), ("the people of the land", "land")]


def run(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lorakit argv`, in process; argparse's own exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def ok(argv: list[str]) -> str:
    code, out, err = run(argv)
    assert code == 0, err
    return out


# --- --help ------------------------------------------------------------------------------------------
def test_top_level_help_lists_every_subcommand_with_an_example():
    code, out, _ = run(["--help"])
    assert code == 0
    for command in ("train", "eval", "generate", "merge", "inspect", "export", "plan", "analyze"):
        assert command in out and f"lorakit {command} " in out


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields that are options: a field holding a config (TrainConfig.lora, .base) stands for that one's fields."""
    fields = []
    for f in dataclasses.fields(cls):
        kind = type(f.default_factory()) if f.default_factory is not dataclasses.MISSING else None
        fields += option_fields(kind) if kind is not None and dataclasses.is_dataclass(kind) else [f]
    return fields


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("plan", PlanConfig)])
def test_help_has_every_config_and_loraconfig_field_with_its_help_default_and_choices(command, cls):
    code, out, _ = run([command, "--help"])
    assert code == 0
    flat = " ".join(out.split())  # argparse wraps lines (also after a hyphen: compare without whitespace)
    fields = option_fields(cls)
    assert {f.name for f in dataclasses.fields(lk.LoraConfig)} <= {f.name for f in fields}
    for f in fields:
        option = "--" + f.name.replace("_", "-")
        assert f"{option} " in out or f"{option}," in out, option
        if f.default is True or f.default is False:
            assert f"--no-{f.name.replace('_', '-')}" in out
        assert "".join(f.metadata["help"].split()) in "".join(out.split()), option
        for choice in f.metadata.get("choices", ()):
            assert str(choice) in out
    assert "LoraConfig options:" in out
    for shown in ("(default: 8)", "(default: 16.0)", "(default: none)", "(default: off)"):
        assert shown in flat
    if command == "train":
        assert "(default: on)" in flat and "(default: cosine)" in flat


LORA_OPTIONS = [  # (options, the LoraConfig fields they give)
    ([], {}),
    (["--rank", "4"], {"rank": 4}),
    (["--alpha", "32"], {"alpha": 32.0}),
    (["--dropout", "0.05"], {"dropout": 0.05}),
    (["--targets", "q_proj, v_proj"], {"targets": ("q_proj", "v_proj")}),
    (["--targets", "all-linear"], {"targets": ("all-linear",)}),
    (["--exclude", "layers.0.q_proj,lm_head"], {"exclude": ("layers.0.q_proj", "lm_head")}),
    (["--bias", "lora_only"], {"bias": "lora_only"}),
    (["--init", "gaussian"], {"init": "gaussian"}),
    (["--init", "pissa", "--init-niter", "4"], {"init": "pissa", "init_niter": 4}),
    (["--rslora"], {"rslora": True}),
    (["--rslora", "--no-rslora"], {"rslora": False}),
    (["--dora"], {"dora": True}),
    (["--rank-pattern", "q_proj=16,v_proj=4"], {"rank_pattern": {"q_proj": 16, "v_proj": 4}}),
    (["--alpha-pattern", "*.layers.0.*=32"], {"alpha_pattern": {"*.layers.0.*": 32.0}}),
    (["--alpha-pattern", "q_proj=8, v_proj = 2.5"], {"alpha_pattern": {"q_proj": 8.0, "v_proj": 2.5}}),
    (["--modules-to-save", "classifier,score"], {"modules_to_save": ("classifier", "score")}),
    (["--adapter-dtype", "bfloat16"], {"adapter_dtype": "bfloat16"}),
    (["--rank", "2", "--targets", "c_attn", "--rank-pattern", "h.0.*=8", "--modules-to-save", "ln_f"],
     {"rank": 2, "targets": ("c_attn",), "rank_pattern": {"h.0.*": 8}, "modules_to_save": ("ln_f",)}),
]


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("plan", PlanConfig)])
@pytest.mark.parametrize("options, fields", LORA_OPTIONS, ids=[" ".join(o) or "none" for o, _ in LORA_OPTIONS])
def test_every_lora_option_parses_to_its_loraconfig_field(command, cls, options, fields):
    args = build_parser().parse_args([command, *options])
    config = config_from_args(cls, args)
    assert config.lora == lk.LoraConfig(**fields)  # the reference: the same config built directly
    assert config == cls(lora=lk.LoraConfig(**fields))  # and nothing else changed
    for name, value in fields.items():
        assert getattr(config.lora, name) == value and type(getattr(config.lora, name)) is type(
            getattr(lk.LoraConfig(**fields), name))


def test_the_lora_options_cover_every_loraconfig_field():
    covered = {name for _, fields in LORA_OPTIONS for name in fields}
    assert covered == {f.name for f in dataclasses.fields(lk.LoraConfig)}


@pytest.mark.parametrize("command, options", [
    ("eval", ["--model", "--adapter", "--data", "--task", "--max-length", "--batch-size", "--json"]),
    ("generate", ["--model", "--adapter", "--prompt", "--prompts", "--max-new-tokens", "--temperature", "--seed",
                  "--no-chat", "--json"]),
    ("merge", ["--model", "--adapter", "--out", "--dtype", "--force"]),
    ("inspect", ["ADAPTER", "--json"]),
    ("export", ["ADAPTER", "--for", "vllm", "--out", "--force"]),
    ("plan", ["--model", "--rank", "--targets", "--batch", "--seq", "--json"]),
    ("analyze", ["ADAPTER", "--compare", "--base", "--targets", "--rank", "--directions", "--basis", "--out",
                 "--no-progress"]),
])
def test_subcommand_help_mentions_every_option(command, options):
    code, out, _ = run([command, "--help"])
    assert code == 0
    for option in options:
        assert option in out
    assert f"example:\n  lorakit {command} " in out


def test_python_dash_m_lorakit_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "lorakit", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lorakit {lk.__version__}"


# --- end to end: causal-lm -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama folder, a text file, and an adapter trained on it by `lorakit train`."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny.causal_lm_dir(root / "lm")
    data = root / "text.txt"
    data.write_text("\n\n".join(PARAGRAPHS) + "\n")
    out = root / "run"
    code, printed, err = run(["train", "--model", str(model), "--data", str(data), "--out", str(out),
                              "--steps", "6", "--lr", "3e-2", "--batch-size", "2", "--max-length", "32",
                              "--eval-fraction", "0.34", "--targets", "q_proj,v_proj", "--no-progress"])
    assert code == 0, err
    return {"model": model, "data": data, "out": out, "adapter": out / "adapter", "printed": printed}


def base_with_adapter(lm) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(lm["model"]).eval()
    lk.load_adapter(model, lm["adapter"])
    return model


def test_train_prints_a_summary_that_matches_the_model(lm):
    base = transformers.AutoModelForCausalLM.from_pretrained(lm["model"])
    lora = sum(8 * (m.in_features + m.out_features) for name, m in base.named_modules()
               if name.endswith(("q_proj", "v_proj")))
    total = sum(p.numel() for p in base.parameters()) + lora
    summary = json.loads((lm["out"] / "summary.json").read_text())
    printed = lm["printed"]
    assert f"trainable parameters: {lora:,} of {total:,} ({100 * lora / total:.2f}%)" in printed
    assert "trained 6 steps" in printed and "(0 skipped)" in printed
    assert f"in {lm['adapter']}" in printed
    assert f"first loss {summary['first_eval']['eval_loss']:.4f}" in printed
    assert f"last loss {summary['last_eval']['eval_loss']:.4f}" in printed
    assert "adapter/, checkpoints/, log.jsonl, loss.png, summary.json" in printed


def test_eval_equals_transformers_loss_over_the_whole_file(lm):
    result = json.loads(ok(["eval", "--model", str(lm["model"]), "--adapter", str(lm["adapter"]),
                            "--data", str(lm["data"]), "--max-length", "32", "--json"]))
    model, tokenizer = base_with_adapter(lm), transformers.AutoTokenizer.from_pretrained(lm["model"])
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for text in PARAGRAPHS:  # one example each (all shorter than --max-length)
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            loss_sum += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert result["task"] == "causal-lm" and result["examples"] == len(PARAGRAPHS)
    assert result["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(loss_sum / tokens).exp().item(), rel=1e-5)
    base_only = json.loads(ok(["eval", "--model", str(lm["model"]), "--data", str(lm["data"]), "--json"]))
    assert base_only["loss"] != pytest.approx(result["loss"])  # the adapter was used


def greedy_reference(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy decoding by hand: argmax of the full forward, one token at a time, stop at eos."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def test_generate_is_greedy_and_batching_with_left_padding_changes_nothing(lm, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = ["generate", "--model", str(lm["model"]), "--adapter", str(lm["adapter"]), "--max-new-tokens", "6"]
    batched = [json.loads(line) for line in ok(common + ["--prompts", str(prompts_file), "--json"]).splitlines()]
    model, tokenizer = base_with_adapter(lm), transformers.AutoTokenizer.from_pretrained(lm["model"])
    assert [r["prompt"] for r in batched] == PROMPTS
    for record in batched:
        assert record["completion"] == greedy_reference(model, tokenizer, record["prompt"], 6)
    alone = ok(common + ["--prompt", PROMPTS[1]])
    assert alone == f"> {PROMPTS[1]}\n{batched[1]['completion']}\n\n"


@pytest.fixture(scope="module")
def mlp_adapter(lm):
    """A second causal-lm adapter, on other modules (up_proj, down_proj) and random, so it changes completions."""
    model = transformers.AutoModelForCausalLM.from_pretrained(lm["model"])
    lk.inject_(model, lk.LoraConfig(rank=2, alpha=4, targets=("up_proj", "down_proj")), adapter="mlp")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["mlp"].B.copy_(torch.randn(layer.adapters["mlp"].B.shape, generator=g))
    return lk.save_adapter(model, lm["out"].parent / "mlp", adapter="mlp")


def test_generate_per_row_adapters_in_one_batch_equal_generating_each_alone(lm, mlp_adapter, tmp_path):
    folders = {"kjv": lm["adapter"], "mlp": mlp_adapter}
    rows = [{"prompt": PROMPTS[0], "adapter": "kjv"}, {"prompt": PROMPTS[1], "adapter": None},
            {"prompt": PROMPTS[2], "adapter": "mlp"}, {"prompt": PROMPTS[1], "adapter": "mlp"},
            {"prompt": PROMPTS[0]}]  # absent: the base
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["generate", "--model", str(lm["model"]), "--max-new-tokens", "6"]
    named = ["--adapter", f"kjv={folders['kjv']}", "--adapter", f"mlp={folders['mlp']}", "--prompts", str(prompts_file)]
    batched = [json.loads(line) for line in ok(common + named + ["--json"]).splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in batched] == [(row["prompt"], row.get("adapter")) for row in rows]
    for record in batched:  # reference: the single-adapter path, one prompt at a time
        adapter = ["--adapter", str(folders[record["adapter"]])] if record["adapter"] else []
        alone = json.loads(ok(common + adapter + ["--prompt", record["prompt"], "--json"]))
        assert alone["completion"] == record["completion"], record
    assert batched[1]["completion"] != batched[3]["completion"]  # the adapter was used
    text = ok(common + named)
    assert text.startswith(f"[kjv]\n> {PROMPTS[0]}\n{batched[0]['completion']}\n\n"
                           f"[base model]\n> {PROMPTS[1]}\n{batched[1]['completion']}\n\n[mlp]\n")


def test_generate_per_row_mistakes_name_the_line_or_the_option(lm, mlp_adapter, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "the", "adapter": "mlp"}) + "\n\n"
                            + json.dumps({"prompt": "the", "adapter": "nope"}) + "\n")
    named, single = f"mlp={mlp_adapter}", str(mlp_adapter)
    cases = [
        (["--adapter", named, "--prompts", str(prompts_file)], [f"{prompts_file}:3:", "'nope'", "['mlp']"]),
        (["--adapter", single, "--prompts", str(prompts_file)], [f"{prompts_file}:1:", "'mlp'", "NAME=DIR"]),
        (["--prompts", str(prompts_file)], [f"{prompts_file}:1:", "'mlp'"]),
        (["--adapter", single, "--adapter", named, "--prompts", str(prompts_file)], ["only --adapter", "NAME=DIR"]),
        (["--adapter", named, "--adapter", f"mlp={lm['adapter']}", "--prompts", str(prompts_file)],
         ["'mlp' is given twice"]),
        (["--adapter", named, "--prompt", "the"], ["--prompt:", "--prompts FILE.jsonl"]),
    ]
    for extra, fragments in cases:
        code, out, err = run(["generate", "--model", str(lm["model"])] + extra)
        assert code == 2 and not out and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in err, (extra, err)


def test_prompts_go_through_the_chat_template_unless_no_chat(lm):
    tokenizer = transformers.AutoTokenizer.from_pretrained(lm["model"])
    assert prompt_texts(tokenizer, PROMPTS) == PROMPTS  # no template: as they are
    tokenizer.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
                               "{% if add_generation_prompt %} the lord said{% endif %}")
    assert prompt_texts(tokenizer, ["the king"]) == ["<s> the king </s> the lord said"]
    assert prompt_texts(tokenizer, ["the king"], chat=False) == ["the king"]


def test_inspect_reports_the_adapter_from_its_header(lm):
    info = json.loads(ok(["inspect", str(lm["adapter"]), "--json"]))
    model = base_with_adapter(lm)
    layers = list(lk.lora_layers(model))
    with safe_open(str(lm["adapter"] / "adapter_model.safetensors"), framework="pt") as f:
        fingerprint = f.metadata()["lorakit_base_fingerprint"]
    assert info["config"] | {"targets": sorted(info["config"]["targets"])} == {
        "rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"], "dropout": 0.0, "bias": "none",
        "rslora": False, "dora": False, "rank_pattern": {}, "alpha_pattern": {}}
    assert info["modules"] == len(layers)
    assert info["parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["task"] == "causal-lm" and info["base_model"] == str(lm["model"]) and info["label_names"] is None
    assert info["format_version"] == lk.io.adapter_files.FORMAT_VERSION and info["scale"] == 2.0
    assert info["base_fingerprint"] == hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    assert info["files"] == {name: (lm["adapter"] / name).stat().st_size
                             for name in ("adapter_config.json", "adapter_model.safetensors")}
    text = ok(["inspect", str(lm["adapter"])])
    for fragment in ("rank 8, alpha 16, scale 2", "targets:", f"{len(layers)} adapted", info["base_fingerprint"],
                     "causal-lm"):
        assert fragment in text


def test_merge_writes_a_plain_model_with_the_adapters_logits(lm, tmp_path):
    out = tmp_path / "merged"
    printed = ok(["merge", "--model", str(lm["model"]), "--adapter", str(lm["adapter"]), "--out", str(out)])
    assert "LlamaForCausalLM.from_pretrained" in printed
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no lorakit
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = tokenizer(PARAGRAPHS[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = base_with_adapter(lm)(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f, \
            safe_open(str(lm["model"] / "model.safetensors"), framework="pt") as g:
        assert set(f.keys()) == set(g.keys())  # the base's tensors, nothing of the adapter's
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_merge_refuses_a_non_empty_out_unless_forced(lm, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["merge", "--model", str(lm["model"]), "--adapter", str(lm["adapter"]), "--out", str(out)]
    code, _, err = run(argv)
    assert code == 2 and "--out" in err and "--force" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"
    ok(argv + ["--force"])
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# --- end to end: classify ------------------------------------------------------------------------------
def test_classify_adapter_brings_its_labels_and_head_to_eval(tmp_path):
    model_dir = tiny.encoder_dir(tmp_path / "encoder")
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in CLASSIFY * 3))
    out = tmp_path / "run"
    ok(["train", "--model", str(model_dir), "--task", "classify", "--data", str(data), "--out", str(out),
        "--steps", "4", "--lr", "3e-2", "--batch-size", "4", "--eval-fraction", "0", "--no-progress"])
    info = json.loads(ok(["inspect", str(out / "adapter"), "--json"]))
    assert info["task"] == "classify" and info["label_names"] == ["land", "lord"]
    # No --targets: BERT's default targets, its attention's query and value projections.
    encoder = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    expected = sorted(name for name, _ in encoder.named_modules() if name.endswith((".query", ".value")))
    assert sorted(info["config"]["targets"]) == ["query", "value"] and info["modules"] == len(expected) == 4
    lk.load_adapter(encoder, out / "adapter")
    assert sorted(lk.adapter_paths(encoder, "default")) == expected
    result = json.loads(ok(["eval", "--model", str(model_dir), "--adapter", str(out / "adapter"),
                            "--data", str(data), "--json"]))
    # Reference: transformers builds the classifier from the recorded labels; lorakit loads the adapter into it.
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, id2label={0: "land", 1: "lord"}, label2id={"land": 0, "lord": 1}).eval()
    lk.load_adapter(reference, out / "adapter")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer([t for t, _ in CLASSIFY * 3], return_tensors="pt", padding=True)
    labels = torch.tensor([{"land": 0, "lord": 1}[y] for _, y in CLASSIFY * 3])
    with torch.no_grad():
        logits = reference(**batch).logits
    assert result["task"] == "classify" and result["examples"] == len(labels)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
    assert result["accuracy"] == (logits.argmax(-1) == labels).float().mean().item()
    code, _, err = run(["generate", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--prompt", "x"])
    assert code == 2 and "classify" in err
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "x", "adapter": "cls"}) + "\n")
    code, _, err = run(["generate", "--model", str(model_dir), "--adapter", f"cls={out / 'adapter'}",
                        "--prompts", str(prompts_file)])
    assert code == 2 and "'cls'" in err and "classify" in err


# --- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["train", "--model", "no-such-model"], "--model"),
    (["train", "--data", "no/such/file.txt"], "--data"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--rank", "eight"], "--rank"),
    (["train", "--task", "translate"], "--task"),
    (["train", "--batch-size", "8", "--grad-accum", "3"], "--grad-accum"),
    (["eval", "--model", "no-such-model"], "--model"),
    (["eval", "--data", "no/such/file.txt"], "--data"),
    (["eval", "--adapter", "no/such/dir"], "--adapter"),
    (["eval", "--max-length", "1"], "--max-length"),
    (["generate", "--prompt", "the", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompts", "no/such/file.jsonl"], "--prompts"),
    (["generate", "--prompt", "the", "--adapter", "no/such/dir"], "--adapter"),
    (["generate", "--prompt", "the", "--adapter", "sql=no/such/dir"], "--adapter"),
    (["inspect", "no/such/dir"], "ADAPTER"),
    *[([command, *options], option) for command in ("train", "plan") for options, option in [
        (["--alpha", "0"], "--alpha=0"),
        (["--dropout", "1.5"], "--dropout=1.5"),
        (["--bias", "some"], "--bias"),
        (["--init", "zeros"], "--init"),
        (["--targets", ","], "--targets"),
        (["--targets", "q_prj"], "--targets: 'q_prj' matches no module"),
        (["--exclude", ""], "--exclude"),
        (["--modules-to-save", "all-linear"], "--modules-to-save=('all-linear',)"),
        (["--rank-pattern", "q_proj"], "--rank-pattern: 'q_proj': give comma-separated PATTERN=VALUE pairs"),
        (["--rank-pattern", "q_proj=1.5"], "--rank-pattern"),
        (["--rank-pattern", "=4"], "--rank-pattern"),
        (["--rank-pattern", "q_proj=0"], "--rank-pattern['q_proj']=0: must be a positive integer"),
        (["--alpha-pattern", "q_proj=x"], "--alpha-pattern"),
        (["--alpha-pattern", "q_proj=1,q_proj=2"], "--alpha-pattern: 'q_proj' is given twice"),
        (["--alpha-pattern", "*.layers.0.*=-2"], "--alpha-pattern['*.layers.0.*']=-2.0: must be a positive number"),
    ]],
])
def test_bad_input_exits_2_with_a_message_naming_the_option(lm, argv, option):
    defaults = {"train": ["--model", str(lm["model"]), "--data", str(lm["data"]), "--no-progress",
                          "--out", str(lm["out"].parent / "never")],
                "eval": ["--model", str(lm["model"]), "--data", str(lm["data"])],
                "generate": ["--model", str(lm["model"])],
                "plan": ["--model", str(lm["model"]), "--batch", "1", "--seq", "8"],
                "inspect": []}[argv[0]]
    code, out, err = run(argv[:1] + defaults + argv[1:])  # later options win
    assert code == 2, out
    assert option in err and "Traceback" not in err
    assert not (lm["out"].parent / "never").exists()


@pytest.mark.parametrize("command", ["train", "plan"])
def test_lora_and_other_problems_are_reported_together(lm, command):
    other = ["--steps", "0"] if command == "train" else ["--batch", "0"]
    code, out, err = run([command, "--model", str(lm["model"]), "--rank", "0", "--dropout", "2", *other])
    assert code == 2 and not out and "Traceback" not in err
    for fragment in ("--rank=0: must be a positive integer", "--dropout=2.0: must be a number in [0, 1)",
                     f"{other[0]}=0: must be a positive integer"):
        assert fragment in err


# --- a quantized base end to end ----------------------------------------------------------------------
def test_train_eval_and_merge_on_an_nf4_base(lm, tmp_path):
    """QLoRA from the command line: train on an nf4 base, evaluate on it, then export the merge dense (the
    dequantized base plus the adapter) and, opted in, re-quantized with its measured error."""
    out = tmp_path / "qlora"
    ok(["train", "--model", str(lm["model"]), "--data", str(lm["data"]), "--out", str(out), "--steps", "3",
        "--lr", "3e-2", "--batch-size", "2", "--max-length", "32", "--base-dtype", "nf4", "--compute-dtype",
        "float32", "--no-progress"])
    adapter = out / "adapter"
    assert lk.adapter_info(adapter)["base_dtype"] == "nf4"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["base"]["base_dtype"] == "nf4"
    printed = ok(["eval", "--model", str(lm["model"]), "--adapter", str(adapter), "--data", str(lm["data"]),
                  "--base-dtype", "nf4", "--compute-dtype", "float32", "--json"])
    assert json.loads(printed)["loss"] > 0

    code, _, err = run(["merge", "--model", str(lm["model"]), "--adapter", str(adapter), "--out",
                        str(tmp_path / "no"), "--requantize"])
    assert code == 2 and "re-quantizing needs --base-dtype int8 or nf4" in err
    printed = ok(["merge", "--model", str(lm["model"]), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                  "--base-dtype", "nf4", "--compute-dtype", "float32", "--dtype", "float32"])
    assert "(nf4 base)" in printed
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    base = lk.load_base(str(lm["model"]), lk.BasePrecision(base_dtype="nf4", compute_dtype="float32"))
    lk.load_adapter(base, adapter)
    ids = torch.tensor([[5, 9, 12, 30, 7, 2]])
    expected = base.train()(ids).logits  # training mode: bitsandbytes computes with the float32 dequantized weight
    torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    printed = ok(["merge", "--model", str(lm["model"]), "--adapter", str(adapter), "--out", str(tmp_path / "q"),
                  "--base-dtype", "nf4", "--dtype", "bfloat16", "--requantize"])
    assert re.search(r"re-quantized to nf4: \d+ layers, relative weight error [\d.]+% mean, [\d.]+% max", printed)
