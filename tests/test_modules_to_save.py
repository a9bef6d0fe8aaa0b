"""lorakit.core.modules_to_save: modules trained in full with an adapter (one copy per adapter), their
switching, disabling, deleting, merging and unloading, their files, and PEFT interop both ways."""
import copy
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit as lk
from cases import same, snapshot
from lorakit.io.peft import CONFIG_FILE, WEIGHTS_FILE

IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 19]])
# Against the reference: F.linear's kernel (so its last bit) depends on whether the weight
# requires grad, which differs between a frozen original and a trainable copy. A wrong head is off by ~1.
CLOSE = dict(rtol=1e-6, atol=1e-6)


class Tagger(nn.Module):
    """A frozen body (embedding, linear, batch norm) and a head to train in full."""

    def __init__(self, seed: int = 0, aux_head: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        if aux_head:
            self.aux_head = nn.Linear(8, 2)  # a name that ends with "head" too (PEFT matches by suffix)
        with torch.no_grad():  # non-trivial running statistics, as after training
            self.norm.running_mean.normal_()
            self.norm.running_var.uniform_(0.5, 2.0)
        self.eval()

    def body(self, ids):  # (B, T) -> (B, T, 8)
        h = torch.relu(self.proj(self.embed(ids)))
        return self.norm(h.transpose(1, 2)).transpose(1, 2)

    def forward(self, ids):  # (B, T) -> (B, T, 3)
        return self.head(self.body(ids))


@torch.no_grad()
def out(model: nn.Module) -> torch.Tensor:
    """The model's output on IDS, without autograd (whose kernels may round differently)."""
    return model(IDS)


@torch.no_grad()
def head_output(base: Tagger, weight, bias) -> torch.Tensor:
    """The reference: the untouched base body, then a linear head with the given weights."""
    return F.linear(base.body(IDS), weight, bias)


@torch.no_grad()
def randomise_(module_or_tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    is_tensor = isinstance(module_or_tensor, torch.Tensor)
    for p in [module_or_tensor] if is_tensor else module_or_tensor.parameters():
        p.add_(torch.randn(p.shape, generator=g))


SAVE_HEAD = lk.LoraConfig(rank=2, alpha=4, targets=("proj",), modules_to_save=("head",))


@pytest.fixture
def two_heads():
    """Adapters 'a' and 'b' each with a trained head copy, 'c' with none; LoRA B stays zero, so the
    output depends on the head only."""
    base = Tagger()
    model = copy.deepcopy(base)
    lk.inject_(model, SAVE_HEAD, "a")
    lk.inject_(model, SAVE_HEAD, "b")
    lk.inject_(model, SAVE_HEAD.replace(modules_to_save=()), "c")
    randomise_(model.head.copies["a"], 1)
    randomise_(model.head.copies["b"], 2)
    return model, base


def expected(model, base, adapter):
    head = model.head.copies[adapter] if adapter in model.head.copies else base.head
    return head_output(base, head.weight, head.bias)


# --- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [("",), ("head", 3), None, "all-linear", ("all-linear",)])
def test_config_names_a_bad_modules_to_save(value):
    with pytest.raises(lk.LoraError, match=r"1 problem\(s\)\n  - modules_to_save=.*e\.g\. modules_to_save=\('classifier',\)"):
        lk.LoraConfig(modules_to_save=value)


def test_config_normalises_and_round_trips_modules_to_save():
    cfg = lk.LoraConfig(modules_to_save="classifier")
    assert cfg.modules_to_save == ("classifier",) and lk.LoraConfig().modules_to_save == ()
    assert lk.LoraConfig(modules_to_save=["a", "b.*"]).modules_to_save == ("a", "b.*")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["modules_to_save"] == ["classifier"] and lk.LoraConfig(**data) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# --- injection ------------------------------------------------------------------------------------
def test_inject_wraps_with_a_trainable_copy_and_keeps_the_original_frozen():
    base = Tagger()
    model = copy.deepcopy(base)
    assert lk.inject_(model, SAVE_HEAD) == ["proj"]  # the LoRA paths
    assert lk.resolve_modules_to_save(model, SAVE_HEAD) == ["head"]
    wrapper = model.head
    assert isinstance(wrapper, lk.ModuleToSave) and [p for p, _ in lk.saved_modules(model)] == ["head"]
    original, head_copy = wrapper.original_module, wrapper.copies["default"]
    assert head_copy is not original and type(head_copy) is nn.Linear
    assert all(not p.requires_grad for p in original.parameters())
    assert all(p.requires_grad for p in head_copy.parameters())
    for name, p in head_copy.named_parameters():
        assert torch.equal(p, getattr(base.head, name)) and p.data_ptr() != getattr(original, name).data_ptr()
    assert torch.equal(out(model), out(base))  # a fresh copy (and LoRA B = 0) changes nothing
    lora = sum(p.numel() for _, layer in lk.lora_layers(model) for p in layer.parameters() if p.requires_grad)
    trainable, total = lk.parameter_counts(model)
    assert trainable == lora + 8 * 3 + 3
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    assert wrapper.out_features == 3 and wrapper.weight is head_copy.weight  # attributes of the module in use


def test_all_linear_leaves_the_modules_to_save_to_their_copies():
    model = Tagger()
    lk.inject_(model, lk.LoraConfig(targets="all-linear", modules_to_save=("head",)))
    assert lk.adapter_paths(model, "default") == ["proj"] and isinstance(model.head, lk.ModuleToSave)
    lk.inject_(model, lk.LoraConfig(targets="all-linear"), "other")  # the wrapper stays off LoRA for later adapters
    assert lk.adapter_paths(model, "other") == ["proj"]


def test_bias_all_trains_the_copy_not_the_original():
    model = Tagger()
    lk.inject_(model, SAVE_HEAD.replace(bias="all"))
    assert model.proj.base_layer.bias.requires_grad and model.norm.bias.requires_grad
    assert not model.head.original_module.bias.requires_grad and model.head.copies["default"].bias.requires_grad


def test_training_updates_only_the_active_copy_and_the_adapter(two_heads):
    model, base = two_heads
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    copy_b = {name: p.detach().clone() for name, p in model.head.copies["b"].named_parameters()}
    copy_a = {name: p.detach().clone() for name, p in model.head.copies["a"].named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS).square().mean().backward()
    assert model.head.original_module.weight.grad is None
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    for name, p in model.head.copies["a"].named_parameters():  # the active adapter's copy trained
        assert not torch.equal(p, copy_a[name]), name
    for name, p in model.head.copies["b"].named_parameters():  # the other copy did not
        assert torch.equal(p, copy_b[name]), name
    assert not torch.equal(model.proj.adapters["a"].B, torch.zeros_like(model.proj.adapters["a"].B))


# --- switching, disabled, delete, merge, unload ------------------------------------------------------
def test_the_active_adapters_copy_runs(two_heads):
    model, base = two_heads
    assert not torch.equal(expected(model, base, "a"), expected(model, base, "b"))
    for name in ("b", "a", "c", "b"):
        lk.set_active(model, name)
        assert model.head.active_adapter == name
        torch.testing.assert_close(out(model), expected(model, base, name), **CLOSE)
    lk.set_active(model, None)
    torch.testing.assert_close(out(model), out(base), **CLOSE)
    lk.set_active(model, "a")
    with lk.use(model, "b"):
        torch.testing.assert_close(out(model), expected(model, base, "b"), **CLOSE)
        with lk.use(model, "c"):  # "c" has no copy: the original head runs
            torch.testing.assert_close(out(model), out(base), **CLOSE)
    torch.testing.assert_close(out(model), expected(model, base, "a"), **CLOSE)


def test_disabled_runs_the_original_and_restores(two_heads):
    model, base = two_heads
    before_out = out(model)
    with lk.disabled(model):
        assert model.head.in_use is model.head.original_module and model.head.weight is model.head.original_module.weight
        torch.testing.assert_close(out(model), out(base), **CLOSE)
    torch.testing.assert_close(out(model), before_out, rtol=0, atol=0)
    lk.merge_(model, "b")
    with lk.disabled(model):
        torch.testing.assert_close(out(model), out(base), **CLOSE)
    torch.testing.assert_close(out(model), expected(model, base, "b"), **CLOSE)


def test_merge_leaves_copies_as_they_are(two_heads):
    model, base = two_heads
    randomise_(model.proj.adapters["b"].B, 3)  # a real low-rank update this time
    lk.set_active(model, "b")
    unmerged = out(model)
    weights = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    lk.merge_(model, "b")
    assert isinstance(model.head, lk.ModuleToSave) and model.head.active_adapter == "b"
    for n, p in model.head.named_parameters():
        assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(out(model), unmerged, rtol=1e-5, atol=1e-5)
    lk.unmerge_(model)
    lk.merge_(model, "a")  # merging another adapter switches the copies too
    assert model.head.active_adapter == "a"


def test_delete_adapter_removes_its_copy_and_unwraps_when_none_is_left(two_heads):
    model, base = two_heads
    original = model.head.original_module
    lk.delete_adapter(model, "a")  # the active one: none is active afterwards
    assert list(model.head.copies) == ["b"] and model.head.active_adapter is None
    torch.testing.assert_close(out(model), out(base), **CLOSE)
    lk.set_active(model, "b")
    torch.testing.assert_close(out(model), expected(model, base, "b"), **CLOSE)
    lk.delete_adapter(model, "c")
    assert isinstance(model.head, lk.ModuleToSave)
    lk.delete_adapter(model, "b")
    assert model.head is original and not list(lk.saved_modules(model)) and lk.adapters(model) == []
    assert [(p, type(m)) for p, m in model.named_modules()] == [(p, type(m)) for p, m in base.named_modules()]
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("merge", [True, False])
def test_unload(two_heads, merge):
    model, base = two_heads
    lk.set_active(model, "b")
    head_b, original = model.head.copies["b"], model.head.original_module
    before_out = out(model)
    lk.unload_(model, merge=merge)
    assert not list(lk.saved_modules(model)) and not list(lk.lora_layers(model))
    assert model.head is (head_b if merge else original)
    torch.testing.assert_close(out(model), before_out if merge else out(base), **CLOSE)


def test_unload_with_merge_of_an_adapter_without_a_copy_keeps_the_original(two_heads):
    model, base = two_heads
    lk.set_active(model, "c")
    original = model.head.original_module
    lk.unload_(model, merge=True)
    assert model.head is original


def test_a_model_with_copies_deep_copies(two_heads):
    model, base = two_heads
    clone = copy.deepcopy(model)
    assert clone.head.copies["a"] is not model.head.copies["a"]
    lk.set_active(clone, "b")
    torch.testing.assert_close(out(clone), expected(model, base, "b"), **CLOSE)
    assert model.head.active_adapter == "a"


# --- errors: each names the field, the value and the fix, and changes nothing ------------------------
def bert_cls(seed: int = 0):
    """A tiny BertForSequenceClassification shaped like MiniLM, with a fresh 3-label head."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


INJECT_ERRORS = {
    "no match": (lk.LoraConfig(targets=("proj",), modules_to_save=("haed",)),
                 r"modules_to_save: 'haed' matches no module; closest module names: head"),
    "also a target": (lk.LoraConfig(targets=("proj", "head"), modules_to_save=("head",)),
                      r"modules_to_save: 'head' is the LoRA target 'head'; .* add 'head' to exclude or drop it "
                      r"from modules_to_save"),
    "reported with target problems": (lk.LoraConfig(targets=("prj",), modules_to_save=("hed",)),
                                      r"targets and modules_to_save: 2 problem\(s\)"),
}


@pytest.mark.parametrize("case", sorted(INJECT_ERRORS))
def test_inject_errors_change_nothing(case):
    config, pattern = INJECT_ERRORS[case]
    model = Tagger()
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=pattern):
        lk.inject_(model, config)
    assert same(before, snapshot(model))


def test_a_module_to_save_cannot_become_a_lora_target_or_the_reverse():
    model = Tagger()
    lk.inject_(model, SAVE_HEAD, "a")
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=r"targets: 'head' overlaps 'head', a module to save of adapter\(s\) "
                                           r"\['a'\]; add it to exclude"):
        lk.inject_(model, lk.LoraConfig(targets=("head",)), "b")
    with pytest.raises(lk.LoraError, match=r"modules_to_save: 'proj' overlaps 'proj', which has LoRA adapter\(s\) "
                                           r"\['a'\]; drop it from modules_to_save"):
        lk.inject_(model, lk.LoraConfig(targets=("embed",), modules_to_save=("proj",)), "b")
    assert same(before, snapshot(model))


@pytest.mark.parametrize("saved, pattern", [
    (("encoder.layer",), r"'bert.encoder.layer' is a ModuleList, which has no forward of its own to call"),
    (("bert.pooler", "pooler.dense"), r"'bert.pooler.dense' lies inside 'bert.pooler', also a module to save; "
                                      r"name only one of them"),
    (("attention",), r"modules_to_save: 'bert.encoder.layer.0.attention' overlaps the LoRA target "
                     r"'bert.encoder.layer.0.attention.self.query'"),
])
def test_modules_to_save_that_cannot_work_are_refused(saved, pattern):
    model = bert_cls()
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=pattern):
        lk.inject_(model, lk.LoraConfig(targets=("query",), modules_to_save=saved))
    assert same(before, snapshot(model))


# --- files: round trip, keys, strict transactional loading ------------------------------------------
SAVE_BOTH = lk.LoraConfig(rank=2, alpha=4, targets=("proj", "embed"), modules_to_save=("norm", "head"))


def trained(config=SAVE_BOTH, adapter="default") -> Tagger:
    model = Tagger()
    lk.inject_(model, config, adapter)
    for i, (_, wrapper) in enumerate(lk.saved_modules(model)):
        randomise_(wrapper.copies[adapter], 10 + i)
    with torch.no_grad():
        model.norm.copies[adapter].running_mean.add_(1.0)  # buffers are saved with the copy too
    for i, (_, layer) in enumerate(lk.lora_layers(model)):
        randomise_(layer.adapters[adapter].B, 20 + i)
    return model


@pytest.fixture
def saved_dir(tmp_path):
    model = trained()
    return model, lk.save_adapter(model, tmp_path / "adapter")


def test_files_hold_the_copies_under_peft_key_names(saved_dir):
    _, directory = saved_dir
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["modules_to_save"] == ["norm", "head"] and config["task_type"] is None
    keys = set(load_file(directory / WEIGHTS_FILE))
    whole = {k for k in keys if "lora_" not in k}
    assert whole == {f"base_model.model.{k}" for k in (
        "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
        "head.weight", "head.bias")}


def test_round_trip_gives_identical_outputs(saved_dir):
    model, directory = saved_dir
    other = Tagger()
    lk.load_adapter(other, directory)
    torch.testing.assert_close(out(other), out(model), rtol=0, atol=0)
    assert lk.adapter_config(other, "default").modules_to_save == ("norm", "head")
    assert [p for p, _ in lk.saved_modules(other)] == ["norm", "head"]
    assert all(p.requires_grad for p in other.head.copies["default"].parameters())
    assert not any(p.requires_grad for p in other.head.original_module.parameters())
    with lk.disabled(other):
        torch.testing.assert_close(out(other), out(Tagger()), **CLOSE)


def test_load_into_an_existing_adapter_and_under_a_second_name(saved_dir, tmp_path):
    model, directory = saved_dir
    other = Tagger()
    lk.inject_(other, SAVE_BOTH)
    lk.load_adapter(other, directory)  # fills the existing copies
    torch.testing.assert_close(out(other), out(model), rtol=0, atol=0)
    second = trained(adapter="b")
    lk.save_adapter(second, tmp_path / "b", adapter="b")
    lk.load_adapter(other, tmp_path / "b", adapter="b")
    assert list(other.head.copies) == ["default", "b"]
    with lk.use(other, "b"):
        torch.testing.assert_close(out(other), out(second), rtol=0, atol=0)
    torch.testing.assert_close(out(other), out(model), rtol=0, atol=0)


def rewrite(directory, change) -> None:
    tensors = load_file(directory / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})


BAD = {
    "missing copy key": (lambda t: t.pop("base_model.model.head.bias"), r"missing key 'base_model.model.head.bias'"),
    "wrong copy shape": (lambda t: t.update({"base_model.model.head.weight": torch.zeros(2, 8)}),
                         r"key 'base_model.model.head.weight' has shape \[2, 8\], the model needs \[3, 8\]"),
    "copy key of another module": (lambda t: t.update({"base_model.model.proj.weight": torch.zeros(8, 8)}),
                                   r"unexpected key 'base_model.model.proj.weight'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("existing", [False, True], ids=["plain", "already-injected"])
def test_bad_files_raise_and_leave_the_model_untouched(saved_dir, case, existing):
    _, directory = saved_dir
    change, pattern = BAD[case]
    rewrite(directory, change)
    model = Tagger()
    if existing:
        lk.inject_(model, SAVE_BOTH)
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=pattern):
        lk.load_adapter(model, directory)
    assert same(before, snapshot(model))


@pytest.mark.parametrize("existing", [False, True], ids=["plain", "already-injected"])
def test_a_failure_while_copying_the_head_rolls_back(saved_dir, monkeypatch, existing):
    _, directory = saved_dir
    model = Tagger()
    if existing:
        lk.inject_(model, SAVE_BOTH)
        randomise_(model.head.copies["default"], 5)
    before = snapshot(model)
    real_copy = torch.Tensor.copy_

    def failing_copy(self, src, *args, **kwargs):
        if tuple(self.shape) == (3, 8):  # the head's weight: after the LoRA factors and the norm
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("simulated failure")
        return real_copy(self, src, *args, **kwargs)

    calls = []
    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    with pytest.raises(RuntimeError, match="simulated"):
        lk.load_adapter(model, directory)
    monkeypatch.undo()
    assert calls
    assert same(before, snapshot(model))


def test_modules_to_save_in_a_file_that_picks_a_lora_module_is_refused(saved_dir):
    _, directory = saved_dir
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["modules_to_save"] = ["norm", "head", "roj"]  # PEFT: LoRA stays on proj, yet "proj" ends with "roj"
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    model = Tagger()
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=r"modules_to_save=\['norm', 'head', 'roj'\] picks 'proj', which is "
                                           r"also adapted with LoRA"):
        lk.load_adapter(model, directory)
    assert same(before, snapshot(model))


@pytest.mark.parametrize("value", [{"head": 1}, [3], [""], ["head("]])
def test_a_bad_modules_to_save_field_is_named(saved_dir, value):
    _, directory = saved_dir
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["modules_to_save"] = value
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(lk.LoraError, match=r"modules_to_save=.*: must be null or a list of module names"):
        lk.load_adapter(Tagger(), directory)


def test_a_name_peft_would_match_twice_cannot_be_saved(tmp_path):
    model = Tagger(aux_head=True)
    lk.inject_(model, SAVE_HEAD)
    assert lk.resolve_modules_to_save(Tagger(aux_head=True), SAVE_HEAD) == ["head"]  # lorakit matches at a '.'
    with pytest.raises(lk.LoraError, match=r"modules_to_save: PEFT picks modules to save by plain name suffix, so "
                                           r"\['head'\] would also pick \['aux_head'\]"):
        lk.save_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- PEFT interop on a sequence classifier ----------------------------------------------------------
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; the two libraries only order the same sums differently
EFFECT = 1e-2


def bert_ids(model) -> torch.Tensor:
    return torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


@torch.no_grad()
def randomise_trainable_(model, seed: int) -> list[str]:
    """New random values for every trainable tensor (LoRA A and B, head copies, trained biases)."""
    g = torch.Generator().manual_seed(seed)
    names = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
            names.append(name)
    return names


def peft_warnings(caught) -> list[str]:
    return [f"{w.category.__name__}: {w.message}" for w in caught if "/peft/" in w.filename.replace("\\", "/")]


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


# (lorakit config, how PEFT must see the classifier: "copy" = lorakit's trained copy, "same" = an
# untrained copy of the original (no modules_to_save), "lora" = a LoRA layer, no task type)
LK_CASES = {
    "classifier": (lk.LoraConfig(rank=4, alpha=8, targets=("query", "value"), modules_to_save=("classifier",)), "copy"),
    "classifier-bias-all": (lk.LoraConfig(rank=4, alpha=8, targets=("query", "value"), bias="all",
                                          modules_to_save=("classifier",)), "copy"),
    "all-linear+classifier": (lk.LoraConfig(rank=2, alpha=4, targets="all-linear", modules_to_save=("classifier",)), "copy"),
    "pooler+classifier": (lk.LoraConfig(rank=4, alpha=8, targets=("query", "value"),
                                        modules_to_save=("bert.pooler", "classifier")), "copy"),
    "no-modules-to-save": (lk.LoraConfig(rank=4, alpha=8, targets=("query", "value")), "same"),
    "all-linear-no-modules-to-save": (lk.LoraConfig(rank=2, alpha=4, targets="all-linear"), "lora"),
}


@pytest.mark.parametrize("case", list(LK_CASES))
def test_lorakit_adapter_loads_in_peft(peft, case, tmp_path):
    """save_adapter -> PeftModel.from_pretrained: no warnings, no missing or unexpected keys, the same
    logits; PEFT's merge_and_unload equals lk.unload_(merge=True)."""
    config, head = LK_CASES[case]
    base = bert_cls()
    ids = bert_ids(base)
    model = copy.deepcopy(base)
    lk.inject_(model, config)
    model.eval()
    trained_names = randomise_trainable_(model, seed=2)
    assert any(".copies.default." in n for n in trained_names) == (head == "copy")
    ours = logits(model, ids)
    assert (ours - logits(base, ids)).abs().max() > EFFECT
    lk.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert written["task_type"] == (None if head == "lora" else "SEQ_CLS")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert peft_warnings(caught) == []
    torch.testing.assert_close(logits(theirs_model, ids), ours, **TOL)
    classifier = theirs_model.base_model.model.classifier
    if head == "lora":
        assert isinstance(classifier, peft.tuners.lora.LoraLayer)
    else:
        assert isinstance(classifier, peft.utils.other.ModulesToSaveWrapper)
        expected_head = model.classifier.copies["default"] if head == "copy" else base.classifier
        torch.testing.assert_close(classifier.modules_to_save["default"].weight, expected_head.weight, rtol=0, atol=0)
    check = peft.get_peft_model(copy.deepcopy(base), peft.PeftConfig.from_pretrained(tmp_path))
    result = check.load_adapter(tmp_path, adapter_name="default")
    assert (list(result.missing_keys), list(result.unexpected_keys)) == ([], [])

    merged_theirs = logits(theirs_model.merge_and_unload(), ids)
    torch.testing.assert_close(logits(lk.unload_(model, merge=True), ids), merged_theirs, **TOL)


@pytest.mark.parametrize("case", list(LK_CASES))
def test_lorakit_seq_cls_adapter_round_trips_in_lorakit(case, tmp_path):
    config, _ = LK_CASES[case]
    base = bert_cls()
    ids = bert_ids(base)
    model = copy.deepcopy(base)
    lk.inject_(model, config)
    randomise_trainable_(model, seed=2)
    lk.save_adapter(model, tmp_path)
    other = copy.deepcopy(base)
    lk.load_adapter(other, tmp_path)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=0)


def test_lorakit_writes_the_keys_peft_writes(peft, tmp_path):
    """The same adapter saved by both libraries: the same tensor names."""
    base = bert_cls()
    model = copy.deepcopy(base)
    lk.inject_(model, lk.LoraConfig(rank=4, alpha=8, targets=("query", "value"), modules_to_save=("classifier",)))
    lk.save_adapter(model, tmp_path / "ours")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                       task_type="SEQ_CLS"))
    theirs.save_pretrained(tmp_path / "theirs")
    keys = set(load_file(tmp_path / "ours" / WEIGHTS_FILE))
    assert keys == set(load_file(tmp_path / "theirs" / WEIGHTS_FILE))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


# PEFT configs on the sequence classifier: SEQ_CLS adds the classifier itself; modules_to_save names it
PEFT_CASES = {
    "seq-cls": dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "seq-cls-all-linear": dict(r=2, lora_alpha=4, target_modules="all-linear", task_type="SEQ_CLS"),
    "seq-cls-bias-all": dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all"),
    "explicit": dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "pooler": dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS",
                   modules_to_save=["pooler"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.filterwarnings("ignore:Careful, disabling adapter layers with bias")  # PEFT's note, expected here
def test_peft_adapter_loads_in_lorakit(peft, case, tmp_path):
    """get_peft_model + save_pretrained -> lk.load_adapter: the same logits, adapted and disabled,
    the same modules saved, and lk.merge_ equals PEFT's merge_and_unload."""
    base = bert_cls()
    ids = bert_ids(base)
    theirs_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**PEFT_CASES[case])).eval()
    randomise_trainable_(theirs_model, seed=3)
    theirs = logits(theirs_model, ids)
    assert (theirs - logits(base, ids)).abs().max() > EFFECT
    with theirs_model.disable_adapter():
        theirs_disabled = logits(theirs_model, ids)
    theirs_saved = [p for p, m in theirs_model.base_model.model.named_modules()
                    if isinstance(m, peft.utils.other.ModulesToSaveWrapper)]
    theirs_lora = [p for p, m in theirs_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    theirs_model.save_pretrained(tmp_path)

    model = copy.deepcopy(base)
    lk.load_adapter(model, tmp_path)
    assert [p for p, _ in lk.saved_modules(model)] == theirs_saved and "classifier" in theirs_saved
    assert lk.adapter_paths(model, "default") == theirs_lora
    torch.testing.assert_close(logits(model, ids), theirs, **TOL)
    with lk.disabled(model):
        torch.testing.assert_close(logits(model, ids), theirs_disabled, **TOL)
    merged_theirs = logits(theirs_model.merge_and_unload(), ids)
    lk.merge_(model)
    torch.testing.assert_close(logits(model, ids), merged_theirs, **TOL)


def test_two_peft_classifiers_switch_in_lorakit(peft, tmp_path):
    """Two SEQ_CLS adapters, each with its own head, loaded into one model: switching picks each head."""
    base = bert_cls()
    ids = bert_ids(base)
    expected = {}
    for seed, name in ((4, "one"), (5, "two")):
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                                           task_type="SEQ_CLS")).eval()
        randomise_trainable_(theirs, seed=seed)
        expected[name] = logits(theirs, ids)
        theirs.save_pretrained(tmp_path / name)
    model = copy.deepcopy(base)
    for name in expected:
        lk.load_adapter(model, tmp_path / name, adapter=name)
    assert list(model.classifier.copies) == ["one", "two"]
    for name in ("two", "one", "two"):
        lk.set_active(model, name)
        torch.testing.assert_close(logits(model, ids), expected[name], **TOL)


def test_a_seq_cls_file_without_modules_to_save_still_loads_its_classifier(peft, tmp_path):
    """task_type SEQ_CLS makes PEFT save the classifier even where modules_to_save is null; lorakit
    reads the file the same way."""
    base = bert_cls()
    ids = bert_ids(base)
    model = copy.deepcopy(base)
    lk.inject_(model, lk.LoraConfig(rank=4, alpha=8, targets=("query", "value"), modules_to_save=("classifier",)))
    randomise_trainable_(model, seed=6)
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["modules_to_save"] = None
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    other = copy.deepcopy(base)
    lk.load_adapter(other, tmp_path)
    assert [p for p, _ in lk.saved_modules(other)] == ["classifier"]
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), **TOL)
