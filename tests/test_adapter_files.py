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
from lorakit.io.adapter_files import base_record, read_adapter
from lorakit.io.peft import CONFIG_FILE, WEIGHTS_FILE
from walks import counting_walks


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
        "parts": {(path, name): (part.scale, part.dropout_p, part.config)
                  for path, layer in lk.lora_layers(model) for name, part in layer.adapters.items()},
        "active": lk.active_adapter(model),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["adapters"] == before["adapters"]
    assert after["parts"] == before["parts"] and after["active"] == before["active"]
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
    "unsupported feature": (lambda d: rewrite_config(d, lambda c: c.update(lora_bias=True)), "lora_bias=True"),
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


def test_a_base_record_taken_earlier_writes_the_same_files(saved, tmp_path):
    """What FSDP needs: the base recorded while whole; the weights may be elsewhere (sharded) when it saves."""
    model, directory = saved
    record = base_record(model)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.base_layer.weight.zero_()  # not the base any more: only the record can say what it was
    lk.save_adapter(model, tmp_path / "recorded", base=record)
    (config, tensors, metadata), (config_0, tensors_0, metadata_0) = map(read_adapter, (tmp_path / "recorded", directory))
    assert config == config_0 and metadata == metadata_0  # fingerprint included
    assert tensors.keys() == tensors_0.keys() and all(torch.equal(tensors[k], tensors_0[k]) for k in tensors)
    lk.load_adapter(fresh(), tmp_path / "recorded")  # the fingerprint is the original base's
    other = trained(config=lk.LoraConfig(targets=("proj",)), adapter="other")
    with pytest.raises(lk.LoraError, match="base: the record covers other layers than adapter 'other'"):
        lk.save_adapter(other, tmp_path / "x", base=record)


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


def test_an_adapter_with_an_older_fingerprint_method_loads_unchecked(saved, tmp_path):
    """Format 1 fingerprinted every entry; its numbers are not comparable, so they are not compared."""
    model, directory = saved
    tensors, metadata = lk.io.adapter_files._read_weights(directory / WEIGHTS_FILE)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={**metadata, "lorakit_format_version": "1"})
    lk.load_adapter(fresh(seed=1), directory)  # a different base, but nothing to compare with


# --- loading under a name that exists replaces the whole adapter ------------------------------------
REPLACEMENTS = {
    "alpha": CONFIG.replace(alpha=64),
    "rank": CONFIG.replace(rank=2, rank_pattern={}),
    "patterns": CONFIG.replace(rank_pattern={"conv": 4, "proj": 2}, alpha_pattern={"proj": 3.0, "embed": 5}),
    "rslora": CONFIG.replace(rslora=True),
    "dropout": CONFIG.replace(dropout=0.25),
    "bias lora_only": CONFIG.replace(bias="lora_only"),
    "bias all": CONFIG.replace(bias="all"),
    "modules to save": CONFIG.replace(modules_to_save=("head",)),
    "fewer modules": CONFIG.replace(targets=("proj",), rank_pattern={}),
    "init": CONFIG.replace(init="gaussian"),
}


def with_trained_biases(model: nn.Module) -> nn.Module:
    """Trained biases that differ from the base's, so a file's biases show whether they were loaded."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(0.5)
    return model


def holding_keep(seed=7) -> Net:
    """A fresh base already holding another adapter, 'keep' (active, since it came first)."""
    model = fresh()
    torch.manual_seed(seed)
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("proj",)), "keep")
    return model


def described(model: nn.Module) -> dict:
    """What a user can observe of a model's adapters: structure, tensors, flags, per-layer parts, configs."""
    return {**snapshot(model), "configs": {name: lk.adapter_config(model, name) for name in lk.adapters(model)}}


@pytest.mark.parametrize("field", sorted(REPLACEMENTS))
def test_loading_over_an_adapter_of_the_same_name_equals_a_fresh_load(tmp_path, field):
    """Issue: loading y into slot 'slot' that held x kept x's scale and config. Now the model ends up as if
    x had never been there, for every field an adapter file carries."""
    x_dir = lk.save_adapter(trained(), tmp_path / "x")
    y_model = with_trained_biases(trained(config=REPLACEMENTS[field]))
    y_dir = lk.save_adapter(y_model, tmp_path / "y")

    replaced = holding_keep()
    lk.load_adapter(replaced, x_dir, adapter="slot")
    assert lk.load_adapter(replaced, y_dir, adapter="slot") == "slot"
    direct = holding_keep()
    lk.load_adapter(direct, y_dir, adapter="slot")

    got, want = described(replaced), described(direct)
    assert got.keys() == want.keys()
    for key in ("types", "grad", "adapters", "parts", "active", "configs"):
        assert got[key] == want[key], key
    assert got["state"].keys() == want["state"].keys()
    for k in want["state"]:
        assert torch.equal(got["state"][k], want["state"][k]), k
    assert lk.adapter_config(replaced, "slot") == REPLACEMENTS[field]  # read back as written, not x's
    with lk.use(replaced, "slot"), lk.use(direct, "slot"):
        replaced.eval(), direct.eval()
        assert torch.equal(replaced(IDS), direct(IDS))
        assert torch.equal(replaced(IDS), y_model.eval()(IDS))


def test_replacing_the_active_adapter_keeps_it_active(tmp_path):
    x_dir = lk.save_adapter(trained(), tmp_path / "x")
    y_dir = lk.save_adapter(trained(config=REPLACEMENTS["fewer modules"]), tmp_path / "y")
    model = fresh()
    lk.load_adapter(model, x_dir)
    lk.load_adapter(model, y_dir)
    assert lk.adapters(model) == ["default"] and lk.active_adapter(model) == "default"
    assert lk.adapter_paths(model, "default") == ["proj"]
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.conv, nn.Conv1d)  # unwrapped again


@pytest.mark.parametrize("field", ["rank", "modules to save", "dropout"])
def test_loading_into_a_deleted_adapters_parts_equals_a_fresh_load(tmp_path, field):
    """reuse=: the parts lk.delete_adapter returned are taken over where they fit (same path, shapes, dropout,
    dtype, device) and built new where not; the model ends up as after a plain load, listed in load order."""
    x_dir = lk.save_adapter(trained(), tmp_path / "x")
    y_dir = lk.save_adapter(with_trained_biases(trained(config=REPLACEMENTS[field])), tmp_path / "y")
    model = holding_keep()
    lk.load_adapter(model, x_dir, adapter="x")
    parts = lk.delete_adapter(model, "x")
    assert sorted(parts) == ["conv", "embed", "proj"] and all(isinstance(p, lk.LoraAdapter) for p in parts.values())
    for part in parts.values():  # what training may have left on them
        part.A.grad = torch.ones_like(part.A)
        part.B.requires_grad_(False)
    assert lk.load_adapter(model, y_dir, adapter="y", reuse=parts) == "y"
    assert all(p.grad is None for _, layer in lk.lora_layers(model) for p in layer.adapters["y"].parameters())
    direct = holding_keep()
    lk.load_adapter(direct, y_dir, adapter="y")

    got, want = described(model), described(direct)
    for key in ("types", "grad", "adapters", "parts", "active", "configs"):
        assert got[key] == want[key], key
    assert got["state"].keys() == want["state"].keys()
    for k in want["state"]:
        assert torch.equal(got["state"][k], want["state"][k]), k
    taken = {path for path, layer in lk.lora_layers(model)
             if layer.holds("y") and layer.adapters["y"] is parts.get(path)}
    fits = {"rank": {"conv"}, "modules to save": {"conv", "embed", "proj"}, "dropout": {"embed"}}[field]
    assert taken == fits  # rank: only conv keeps rank 2; dropout: only the embedding (which takes none) fits
    torch.testing.assert_close(model(IDS), direct(IDS), rtol=0, atol=0)


def test_reusing_parts_still_on_the_model_is_refused_and_changes_nothing(saved):
    _, directory = saved
    model = holding_keep()
    lk.load_adapter(model, directory, adapter="x")
    before = snapshot(model)
    on_model = {path: layer.adapters["x"] for path, layer in lk.lora_layers(model) if layer.holds("x")}
    with pytest.raises(lk.LoraError, match=r"reuse: the parts at \['embed', 'conv', 'proj'\] belong to adapters on "
                                           r"the model.*lk.delete_adapter"):
        lk.load_adapter(model, directory, adapter="y", reuse=on_model)
    assert_unchanged(model, before)


def test_loading_into_a_merged_model_is_refused_and_changes_nothing(saved):
    _, directory = saved
    model = trained(seed=0)
    lk.merge_(model)
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match="unmerge"):
        lk.load_adapter(model, directory)
    with pytest.raises(lk.LoraError, match="unmerge"):
        lk.load_adapter(model, directory, adapter="other")
    assert_unchanged(model, before)


# --- save and load are a symmetric pair ---------------------------------------------------------------
def test_the_config_and_name_written_are_the_ones_read_back(tmp_path):
    config = lk.LoraConfig(rank=4, alpha=8, targets=("proj", "con*"), rank_pattern={"conv": 2}, alpha_pattern={"pro*": 2},
                           dropout=0.1, modules_to_save=("head",), rslora=True)
    model = trained(config=config, adapter="sql")
    directory = lk.save_adapter(model, tmp_path / "a")
    other = fresh()
    assert lk.load_adapter(other, directory) == "sql"  # the name it was saved under
    assert lk.adapter_config(other, "sql") == config  # patterns as the user wrote them, not module paths


def test_a_config_without_lorakit_metadata_names_modules_exactly(saved):
    """A PEFT file (no lorakit_config) or a hand-edited one loads with PEFT's meaning, module by module."""
    _, directory = saved
    tensors = load_file(directory / WEIGHTS_FILE)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})  # as PEFT writes it
    model = fresh()
    assert lk.load_adapter(model, directory) == "default"
    config = lk.adapter_config(model, "default")
    assert config.targets == ("embed", "conv", "proj") and dict(config.rank_pattern) == {"conv": 2}


def test_an_edited_config_json_wins_over_the_stale_lorakit_config(saved):
    _, directory = saved
    raw = json.loads((directory / CONFIG_FILE).read_text())
    raw["lora_alpha"] = 32  # edited by hand after saving: the JSON is what PEFT would load
    (directory / CONFIG_FILE).write_text(json.dumps(raw))
    model = fresh()
    lk.load_adapter(model, directory)
    assert lk.adapter_config(model, "default").alpha == 32
    assert model.proj.adapters["default"].scale == 32 / 4


def test_metadata_cannot_overwrite_lorakits_own_keys(tmp_path):
    model = trained()
    for key in ("lorakit_config", "lorakit_checksum", "lorakit_format_version", "lorakit_base_fingerprint",
                "lorakit_adapter"):
        with pytest.raises(lk.LoraError, match=f"'{key}'.*lorakit's own keys"):
            lk.save_adapter(model, tmp_path / key, metadata={key: "x"})
        assert not (tmp_path / key).exists()


# --- damaged files -----------------------------------------------------------------------------------
def _data_start(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin: 8-byte header length, then the header."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_a_flipped_byte_in_the_tensor_data_is_caught_by_the_checksum(saved):
    _, directory = saved
    path = directory / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    position = _data_start(path) + 37  # inside A of the first tensor: a finite float either way
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    model = fresh()
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match="does not match the checksum"):
        lk.load_adapter(model, directory)
    assert_unchanged(model, before)
    other = fresh(seed=1)  # also the wrong base: the damage is still what is reported (the hash runs beside the plan)
    with pytest.raises(lk.LoraError, match="does not match the checksum") as err:
        lk.load_adapter(other, directory)
    assert err.value.__context__ is None or err.value.__suppress_context__


def test_a_file_without_a_checksum_still_loads(saved):
    model, directory = saved
    rewrite_weights(directory, lambda t: None)  # drops lorakit_checksum, as PEFT's files lack it
    other = fresh()
    lk.load_adapter(other, directory)
    assert torch.equal(other.eval()(IDS), model.eval()(IDS))


def _mutations(directory: Path, count: int, seed: int = 0):
    """`count` seeded ways to damage an adapter folder: flipped or truncated bytes in either file, config
    fields deleted or given a value of the wrong type."""
    generator = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=generator))  # noqa: E731
    weights, config = (directory / WEIGHTS_FILE).read_bytes(), json.loads((directory / CONFIG_FILE).read_text())
    wrong = [None, "x", [1], -1, 0, 1.5, True, {}, {"a": "b"}, [], "", float("nan"), "(", ["("]]
    for i in range(count):
        kind = i % 5
        files = {WEIGHTS_FILE: weights, CONFIG_FILE: json.dumps(config).encode()}
        if kind == 0:  # one flipped byte in the weights
            data = bytearray(weights)
            data[pick(len(data))] ^= 1 << pick(8)
            files[WEIGHTS_FILE] = bytes(data)
        elif kind == 1:  # truncated weights or config
            name = (WEIGHTS_FILE, CONFIG_FILE)[pick(2)]
            files[name] = files[name][:pick(len(files[name]))]
        elif kind == 2:  # a config field deleted
            changed = dict(config)
            del changed[sorted(changed)[pick(len(changed))]]
            files[CONFIG_FILE] = json.dumps(changed).encode()
        else:  # a config field retyped
            changed = dict(config)
            changed[sorted(changed)[pick(len(changed))]] = wrong[pick(len(wrong))]
            files[CONFIG_FILE] = json.dumps(changed).encode()
        yield i, files


def test_three_hundred_damaged_files_each_fail_cleanly_or_load_finite_tensors(saved, tmp_path):
    """Every damaged file is a LoraError with the model untouched, or loads finite tensors."""
    _, directory = saved
    outcomes = {"error": 0, "loaded": 0}
    for i, files in _mutations(directory, 300):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        model = holding_keep()
        before = snapshot(model)
        try:
            lk.load_adapter(model, folder, adapter="default")
        except lk.LoraError:
            assert_unchanged(model, before)
            outcomes["error"] += 1
        else:
            assert all(torch.isfinite(p).all() for p in model.parameters()), i
            outcomes["loaded"] += 1
    assert outcomes["error"] > 200 and sum(outcomes.values()) == 300, outcomes


def test_a_load_walks_the_model_once(saved):
    """Plan-then-apply reads one listing of the model's modules, without the adapters' insides; the undo
    record and the freezing reuse it (the old loader walked the model 20 times, then 3)."""
    _, directory = saved
    model = holding_keep()
    with counting_walks(model) as children:
        lk.load_adapter(model, directory)
    assert children.listed == 1, children.listed


@pytest.mark.parametrize("field, value", [
    ("lora_dropout", None), ("lora_dropout", "x"), ("lora_dropout", [1]), ("lora_dropout", 1.5),
    ("exclude_modules", -1), ("exclude_modules", [1]), ("exclude_modules", "("),
    ("target_modules", "("), ("target_modules", []), ("target_modules", 3),
    ("use_rslora", "yes"), ("fan_in_fan_out", 1), ("rank_pattern", {"conv": "2"}), ("rank_pattern", {"(": 2}),
    ("alpha_pattern", {"proj": None}), ("init_lora_weights", "pissa"), ("init_lora_weights", 3),
    ("modules_to_save", "head"), ("task_type", 7), ("r", 2.0), ("lora_alpha", "16"), ("bias", None),
])
def test_a_wrongly_typed_config_field_is_a_lora_error_naming_it(saved, field, value):
    """The review found these escaping as bare TypeError/ValueError with no promise about the model."""
    _, directory = saved
    rewrite_config(directory, lambda c: c.update({field: value}))
    model = holding_keep()
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=f"{field}={value!r}".replace("(", r"\(").replace("[", r"\[")):
        lk.load_adapter(model, directory)
    assert_unchanged(model, before)
