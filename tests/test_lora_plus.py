"""lorakit.training.lora_plus: LoRA+'s parameter groups hold exactly the right tensors at the right rates, one
AdamW step moves B ratio times as far as A (against AdamW's update written out), PEFT's create_loraplus_optimizer
gives the same rates, and `lorakit train --lora-plus-ratio` trains and resumes exactly."""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
import tiny
from lorakit.training.checkpoint import load_checkpoint
from lorakit.training.config import TrainConfig
from test_cli import run
from test_peft_interop import bert, gpt2, randomise_trainable_

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """An embedding, a linear layer and a head: every kind of trainable tensor LoRA+ sorts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))))


def adapted_net() -> Net:
    model = Net()
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("emb", "fc"), modules_to_save=("head",), bias="lora_only"))
    with torch.no_grad():  # trained already: B is not zero, so A has a gradient too
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def by_name(groups: list[dict]) -> dict[str, tuple[list, float]]:
    return {g["name"]: ([id(p) for p in g["params"]], g["lr"]) for g in groups}


def test_groups_hold_exactly_the_right_tensors_at_the_right_rates():
    model = adapted_net()
    fc, emb, head = model.fc.adapters["default"], model.emb.adapters["default"], model.head.copies["default"]
    groups = lk.lora_plus_groups(model, lr=1e-3, ratio=16, weight_decay=0.1, embedding_lr=5e-6)
    assert by_name(groups) == {
        "lora_A": ([id(fc.A)], 1e-3),
        "embedding": ([id(emb.A), id(emb.B)], 5e-6),
        "lora_B": ([id(fc.B)], 1e-3 * 16),
        "other": ([id(model.fc.base_layer.bias), id(head.weight), id(head.bias)], 1e-3),  # bias='lora_only'
    }
    assert all(g["weight_decay"] == 0.1 for g in groups)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(trainable)  # each trainable tensor once, nothing frozen


def test_naming_an_adapter_splits_only_its_factors():
    model = adapted_net()
    lk.inject_(model, lk.LoraConfig(rank=3, targets=("fc",)), adapter="other")
    mine, theirs = model.fc.adapters["default"], model.fc.adapters["other"]
    groups = by_name(lk.lora_plus_groups(model, lr=1e-3, ratio=4, adapter="other"))
    assert groups["lora_A"] == ([id(theirs.A)], 1e-3) and groups["lora_B"] == ([id(theirs.B)], 4e-3)
    assert {id(mine.A), id(mine.B)} <= set(groups["other"][0])  # still trained, at lr


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_adamw_step_moves_b_ratio_times_as_far(weight_decay):
    """AdamW's first step, written out: p <- p (1 - lr wd) - lr g / (|g| + eps) (m and v bias-corrected
    are g and g^2), with each group's lr; so B's step is ratio times A's."""
    model, lr, ratio, eps = adapted_net(), 1e-2, 16.0, 1e-8
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    model(ids).square().sum().backward()
    groups = lk.lora_plus_groups(model, lr=lr, ratio=ratio, weight_decay=weight_decay)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    before = {id(p): (p.detach().clone(), p.grad.clone()) for g in groups for p in g["params"]}
    torch.optim.AdamW(groups, eps=eps).step()
    for g in groups:
        for p in g["params"]:
            p0, grad = before[id(p)]
            lr_p = rate[id(p)]
            expected = p0 * (1 - lr_p * weight_decay) - lr_p * grad / (grad.abs() + eps)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    A, B = model.fc.adapters["default"].A, model.fc.adapters["default"].B
    (a0, ga), (b0, gb) = before[id(A)], before[id(B)]
    if weight_decay == 0:  # |step| = lr for every entry with a gradient far above eps
        torch.testing.assert_close((b0 - B.detach()).abs(), torch.full_like(b0, ratio * lr))
        torch.testing.assert_close((a0 - A.detach()).abs(), torch.full_like(a0, lr))


def peft_rates(model, optimizer) -> dict[tuple[str, str], float]:
    """(module path, 'A' | 'B' | 'bias') -> lr, from PEFT's optimizer and parameter names."""
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    found = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            path = name.removeprefix("base_model.model.")
            kind = "bias" if path.endswith(".bias") else "A" if ".lora_A." in path or "lora_embedding_A" in path else "B"
            found[(path.split(".lora_")[0].removesuffix(".bias").removesuffix(".base_layer"), kind)] = rate[id(p)]
    return found


def lorakit_rates(model, groups) -> dict[tuple[str, str], float]:
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    found = {}
    for path, layer in lk.lora_layers(model):
        part = layer.adapters["default"]
        found[(path, "A")], found[(path, "B")] = rate[id(part.A)], rate[id(part.B)]
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None and bias.requires_grad:
            found[(path, "bias")] = rate[id(bias)]
    return found


@pytest.mark.parametrize("make, targets, fan_in_fan_out", [
    (gpt2, ["c_attn", "c_fc"], True), (bert, ["query", "value", "word_embeddings"], False)], ids=["gpt2", "bert"])
def test_rates_equal_peft_create_loraplus_optimizer(make, targets, fan_in_fan_out, tmp_path):
    """The same adapter in both libraries: A, B and embedding adapters get PEFT's rates. Biases differ, as
    documented: PEFT trains every 1-D tensor with B (lr * ratio), lorakit at lr."""
    from peft.optimizers import create_loraplus_optimizer

    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="lora_only"))
    randomise_trainable_(theirs, seed=1)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path)
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    expected = peft_rates(theirs, optimizer)
    got = lorakit_rates(ours, lk.lora_plus_groups(ours, lr=1e-3, ratio=16))
    assert got.keys() == expected.keys() and any(k == "bias" for _, k in got)
    assert {k: v for k, v in got.items() if k[1] != "bias"} == {k: v for k, v in expected.items() if k[1] != "bias"}
    assert {v for k, v in expected.items() if k[1] == "bias"} == {1e-3 * 16}  # PEFT: biases with B
    assert {v for k, v in got.items() if k[1] == "bias"} == {1e-3}  # lorakit: biases at lr
    if "word_embeddings" in targets:
        assert got[("embeddings.word_embeddings", "A")] == got[("embeddings.word_embeddings", "B")] == 1e-6


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ratio=0), "ratio=0: must be a positive number"),
    (dict(ratio=float("nan")), "ratio=nan"),
    (dict(lr=-1.0), "lr=-1.0: must be a positive number"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(adapter="nope"), "adapter='nope' is not in this model"),
])
def test_bad_arguments_are_clear_errors(kwargs, fragment):
    with pytest.raises(lk.LoraError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        lk.lora_plus_groups(adapted_net(), **{"lr": 1e-3, "ratio": 16, **kwargs})


def test_a_model_without_adapters_is_a_clear_error():
    with pytest.raises(lk.LoraError, match="no trainable LoRA factors"):
        lk.lora_plus_groups(Net(), lr=1e-3, ratio=16)


def test_train_config_checks_the_ratio():
    with pytest.raises(lk.LoraError, match=r"lora_plus_ratio=-2: must be a positive number"):
        TrainConfig(lora_plus_ratio=-2)
    with pytest.raises(lk.LoraError, match=r"lora_plus_ratio=16 with full=True"):
        TrainConfig(lora_plus_ratio=16, full=True)
    assert TrainConfig(lora_plus_ratio=16).lora_plus_ratio == 16 and TrainConfig().lora_plus_ratio is None


# --- lorakit train --lora-plus-ratio ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_plus")
    data = root / "text.txt"
    data.write_text("\n\n".join(tiny.TEXT.strip().splitlines() * 4) + "\n")
    return tiny.causal_lm_dir(root / "lm"), data


def train_argv(lm, out, *extra) -> list[str]:
    model, data = lm
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "6", "--lr", "1e-2",
            "--batch-size", "2", "--max-length", "16", "--targets", "q_proj,v_proj", "--save-every", "3",
            "--no-progress", "--seed", "1", *extra]


def ok(argv):
    code, out, err = run(argv)
    assert code == 0, err
    return out


def test_train_with_lora_plus_resumes_exactly_and_checkpoints_its_groups(lm, tmp_path):
    whole = tmp_path / "whole"
    ok(train_argv(lm, whole, "--lora-plus-ratio", "16"))
    groups = load_checkpoint(whole / "checkpoints" / "step-3").optimizer_groups
    assert [g["name"] for g in groups] == ["lora_A", "lora_B"]
    assert groups[1]["initial_lr"] == 16 * groups[0]["initial_lr"] == 16 * 1e-2
    assert groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"])  # the schedule scales both alike
    # A run stopped after step 3 resumes to the same adapter.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    (resumed / "checkpoints" / "latest").write_text("step-3\n")
    shutil.copy(whole / "log.jsonl", resumed / "log.jsonl")
    ok(train_argv(lm, resumed, "--lora-plus-ratio", "16", "--resume", str(resumed)))
    expected, got = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (whole, resumed))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["config"]["lora_plus_ratio"] == 16
    # Resuming with another ratio would silently keep the checkpoint's rates: refused.
    code, _, err = run(train_argv(lm, resumed, "--resume", str(resumed), "--steps", "8"))
    assert code == 2 and "--lora-plus-ratio=None: the checkpoint" in err and "trained with --lora-plus-ratio=16.0" in err


def test_ratio_one_trains_exactly_as_without_lora_plus(lm, tmp_path):
    ok(train_argv(lm, tmp_path / "plain"))
    ok(train_argv(lm, tmp_path / "one", "--lora-plus-ratio", "1"))
    plain, one = (load_file(tmp_path / run_ / "adapter" / "adapter_model.safetensors") for run_ in ("plain", "one"))
    assert all(torch.equal(plain[k], one[k]) for k in plain)


@pytest.mark.parametrize("value, fragment", [("0", "--lora-plus-ratio=0.0: must be a positive number"),
                                             ("x", "--lora-plus-ratio: invalid float value")])
def test_bad_ratio_on_the_command_line_names_the_option(lm, tmp_path, value, fragment):
    code, out, err = run(train_argv(lm, tmp_path / "never", "--lora-plus-ratio", value))
    assert code == 2 and fragment in err and not (tmp_path / "never").exists()
