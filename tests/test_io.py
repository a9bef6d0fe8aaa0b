"""Adapter files: round trips, atomic writes, and strict, transactional loading."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from lorakit.io import integrity
from lorakit.io.peft import CONFIG_FILE, WEIGHTS_FILE


class Net(nn.Module):
    """One of each layer kind lorakit adapts (except Conv1D, covered by the PEFT tests)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, 8)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.proj(h)))


CONFIG = lk.LoraConfig(rank=4, alpha=8, targets=("embed", "conv", "proj"), rank_pattern={"conv": 2})
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 19]])


def fresh(seed=0) -> Net:
    torch.manual_seed(seed)
    return Net()


def trained(seed=0, config=CONFIG, adapter="default") -> Net:
    """A model with a non-trivial adapter (B random, so the adapter changes the output)."""
    model = fresh(seed)
    lk.inject_(model, config, adapter)
    torch.manual_seed(123)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters[adapter].B.normal_()
            layer.adapters[adapter].A.normal_()
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything load must leave alone on failure: tensors, grad flags, module types."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "adapters": lk.adapters(model),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["adapters"] == before["adapters"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


@pytest.fixture
def saved(tmp_path) -> tuple[Net, Path]:
    model = trained()
    return model, lk.save_adapter(model, tmp_path / "adapter")


def test_round_trip_gives_identical_outputs(saved):
    model, directory = saved
    expected = model(IDS)
    other = fresh()
    assert lk.load_adapter(other, directory) == "default"
    torch.testing.assert_close(other(IDS), expected, rtol=0, atol=0)
    assert lk.adapter_config(other, "default").rank_for("conv") == 2


def test_files_are_peft_layout_with_lorakit_metadata(saved):
    _, directory = saved
    assert sorted(os.listdir(directory)) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files left
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["conv", "embed", "proj"]
    assert config["rank_pattern"] == {"conv": 2}
    keys = load_file(directory / WEIGHTS_FILE).keys()
    assert "base_model.model.proj.lora_A.weight" in keys
    assert "base_model.model.embed.lora_embedding_B" in keys
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        meta = f.metadata()
    assert meta["lorakit_format_version"] == lk.io.adapter_files.FORMAT_VERSION
    assert set(json.loads(meta["lorakit_base_fingerprint"])) == {"embed", "conv", "proj"}


def test_load_into_existing_adapter_of_same_shape(saved):
    model, directory = saved
    expected = model(IDS)
    other = fresh()
    lk.inject_(other, CONFIG)
    lk.load_adapter(other, directory)
    torch.testing.assert_close(other(IDS), expected, rtol=0, atol=0)


def test_load_under_a_second_name_keeps_the_first(saved, tmp_path):
    model, directory = saved
    other_model = trained(config=CONFIG.replace(rank=3, rank_pattern={}), adapter="b")
    lk.save_adapter(other_model, tmp_path / "b", adapter="b")
    lk.load_adapter(model, tmp_path / "b", adapter="b")
    assert lk.adapters(model) == ["default", "b"]
    with lk.use(model, "b"):
        torch.testing.assert_close(model(IDS), other_model(IDS), rtol=0, atol=0)


def test_save_is_atomic_and_failed_save_keeps_old_files(saved, monkeypatch):
    model, directory = saved
    before = {name: (directory / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.io.adapter_files.save_file", broken_save)
    with torch.no_grad():
        next(iter(lk.lora_layers(model)))[1].adapters["default"].B.add_(1.0)
    with pytest.raises(OSError):
        lk.save_adapter(model, directory)
    assert sorted(os.listdir(directory)) == [CONFIG_FILE, WEIGHTS_FILE]
    for name, data in before.items():
        assert (directory / name).read_bytes() == data


# --- strict, transactional loading: each failure leaves the model exactly as it was ----------------
def rewrite_weights(directory: Path, change, keep_checksum: bool = False) -> None:
    """Edit the tensors as another program would: lorakit's checksum goes unless `keep_checksum`
    (then it no longer matches, as after damage on disk)."""
    path = directory / WEIGHTS_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if not keep_checksum:
        del meta["lorakit_checksum"]
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=meta)


def rewrite_config(directory: Path, change) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    change(config)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


BAD_FILES = {
    "wrong shape": (lambda d: rewrite_weights(d, lambda t: t.update({
        "base_model.model.proj.lora_A.weight": torch.zeros(5, 8)})), "shape"),
    "missing key": (lambda d: rewrite_weights(d, lambda t: t.pop("base_model.model.proj.lora_B.weight")),
                    "missing key 'base_model.model.proj.lora_B.weight'"),
    "unexpected key": (lambda d: rewrite_weights(d, lambda t: t.update({"base_model.model.x.lora_A.weight": torch.zeros(1)})),
                       "unexpected key 'base_model.model.x.lora_A.weight'"),
    "nan": (lambda d: rewrite_weights(d, lambda t: t["base_model.model.conv.lora_B.weight"].view(-1).__setitem__(0, float("nan"))),
            "NaN or Inf"),
    "inf": (lambda d: rewrite_weights(d, lambda t: t["base_model.model.embed.lora_embedding_A"].view(-1).__setitem__(3, float("inf"))),
            "NaN or Inf"),
    "truncated": (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-40]), "corrupt or truncated"),
    "garbage": (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x00" * 64), "corrupt or truncated"),
    "unknown field": (lambda d: rewrite_config(d, lambda c: c.update(lora_magic=3)), "lora_magic=3: unknown field"),
    "unsupported feature": (lambda d: rewrite_config(d, lambda c: c.update(use_dora=True)), "use_dora=True"),
    "bad json": (lambda d: (d / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
    "bad rank": (lambda d: rewrite_config(d, lambda c: c.update(r=0)), "r=0"),
    "other peft type": (lambda d: rewrite_config(d, lambda c: c.update(peft_type="IA3")), "peft_type='IA3'"),
    "no target": (lambda d: rewrite_config(d, lambda c: c.update(target_modules=["nope"])), "matches no module"),
    "rank mismatch": (lambda d: rewrite_config(d, lambda c: c.update(rank_pattern={})), "shape"),
    "missing config": (lambda d: (d / CONFIG_FILE).unlink(), "adapter_config.json: file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("existing", [False, True], ids=["plain", "already-injected"])
def test_bad_file_raises_and_leaves_model_untouched(saved, case, existing):
    _, directory = saved
    corrupt, message = BAD_FILES[case]
    corrupt(directory)
    model = fresh()
    if existing:
        lk.inject_(model, CONFIG.replace(rank=4, rank_pattern={"conv": 2}), "default")
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=message.replace("(", r"\(").replace("[", r"\[")):
        lk.load_adapter(model, directory)
    assert_unchanged(model, before)


def test_pickle_is_never_loaded(saved):
    _, directory = saved
    (directory / WEIGHTS_FILE).rename(directory / "adapter_model.bin")
    with pytest.raises(lk.LoraError, match="pickle"):
        lk.load_adapter(fresh(), directory)


def test_missing_directory():
    with pytest.raises(lk.LoraError, match="not a directory"):
        lk.load_adapter(fresh(), "/nonexistent/adapter")


def test_different_base_is_refused_unless_allowed(saved):
    model, directory = saved
    other_base = fresh(seed=1)
    before = snapshot(other_base)
    with pytest.raises(lk.LoraError, match="different base weights.*allow_base_mismatch=True"):
        lk.load_adapter(other_base, directory)
    assert_unchanged(other_base, before)
    lk.load_adapter(other_base, directory, allow_base_mismatch=True)
    assert lk.adapters(other_base) == ["default"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fingerprint_accepts_the_same_base_in_another_dtype(saved, dtype):
    _, directory = saved
    model = fresh().to(dtype)
    lk.load_adapter(model, directory)
    assert lk.adapters(model) == ["default"]


def test_fingerprint_uses_unmerged_weights(saved, tmp_path):
    model, _ = saved
    lk.merge_(model)
    lk.save_adapter(model, tmp_path / "merged")
    lk.load_adapter(fresh(), tmp_path / "merged")  # the base it was trained on: accepted


def test_failure_during_copy_rolls_back(saved, monkeypatch):
    """Even an error after injection (here: a failing copy) leaves no trace."""
    _, directory = saved
    model = fresh()
    before = snapshot(model)
    real_copy = torch.Tensor.copy_
    calls = {"n": 0}

    def flaky_copy(self, src, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated failure")
        return real_copy(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", flaky_copy)
    with pytest.raises(RuntimeError, match="simulated"):
        lk.load_adapter(model, directory)
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_load_with_bias_modes_restores_biases(tmp_path):
    config = CONFIG.replace(bias="all")
    model = trained(config=config)
    with torch.no_grad():
        model.head.bias.add_(1.0)  # trained bias of a module without an adapter
        model.proj.bias.add_(2.0)
    lk.save_adapter(model, tmp_path / "a")
    other = fresh()
    lk.load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(other(IDS), model(IDS), rtol=0, atol=0)
    assert other.head.bias.requires_grad


def test_save_unknown_adapter(tmp_path):
    with pytest.raises(lk.LoraError, match="adapter='nope' is not in this model"):
        lk.save_adapter(trained(), tmp_path / "x", adapter="nope")
    assert not (tmp_path / "x").exists()


def test_saved_files_follow_the_umask(saved):
    _, directory = saved
    mask = os.umask(0)
    os.umask(mask)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (directory / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_adapter_info_reads_config_counts_and_metadata(tmp_path):
    model = trained()
    directory = lk.save_adapter(model, tmp_path / "a", metadata={"lorakit_task": "classify",
                                                                  "lorakit_label_names": '["no", "yes"]'})
    info = lk.adapter_info(directory)
    layers = dict(lk.lora_layers(model))
    assert info["modules"] == len(layers) == 3
    assert info["parameters"] == sum(l.adapters["default"].A.numel() + l.adapters["default"].B.numel() for l in layers.values())
    assert info["config"]["rank"] == 4 and info["config"]["alpha"] == 8 and info["config"]["rank_pattern"] == {"conv": 2}
    assert info["task"] == "classify" and info["label_names"] == ["no", "yes"] and info["format_version"] == lk.io.adapter_files.FORMAT_VERSION
    assert info["files"] == {n: (directory / n).stat().st_size for n in (CONFIG_FILE, WEIGHTS_FILE)}
    assert len(info["base_fingerprint"]) == 12


def test_adapter_info_of_a_file_without_lorakit_metadata(saved):
    _, directory = saved
    tensors = load_file(directory / WEIGHTS_FILE)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})  # as PEFT writes it
    info = lk.adapter_info(directory)
    assert info["format_version"] is None and info["task"] is None and info["base_fingerprint"] is None
    assert info["modules"] == 3


def test_fingerprint_of_a_large_weight_samples_it_and_still_tells_bases_apart():
    """Past FINGERPRINT_ENTRIES entries the probe samples fixed positions: a re-seeded base differs,
    a scaled copy differs, a bfloat16 copy agrees."""
    def fingerprint(weight):
        return integrity.base_fingerprint(dict(_holding(weight).named_modules()), ["proj"])

    n = 4 * integrity.FINGERPRINT_ENTRIES
    w = torch.randn(n // 64, 64, generator=torch.Generator().manual_seed(0))
    same = fingerprint(w)
    assert integrity.fingerprint_problems(same, fingerprint(w.clone())) == []
    assert integrity.fingerprint_problems(same, fingerprint(w.to(torch.bfloat16))) == []
    assert integrity.fingerprint_problems(same, fingerprint(torch.randn(w.shape))) == ["proj"]
    assert integrity.fingerprint_problems(same, fingerprint(w * 1.1)) == ["proj"]


def _holding(weight: torch.Tensor) -> nn.Module:
    holder = nn.ModuleDict({"proj": nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)})
    holder["proj"].weight.data = weight
    return holder


def test_an_adapter_with_an_older_fingerprint_method_loads_unchecked(saved, tmp_path):
    """Format 1 fingerprinted every entry; its numbers are not comparable, so they are not compared."""
    model, directory = saved
    tensors, metadata = lk.io.adapter_files._read_weights(directory / WEIGHTS_FILE)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={**metadata, "lorakit_format_version": "1"})
    lk.load_adapter(fresh(seed=1), directory)  # a different base, but nothing to compare with
