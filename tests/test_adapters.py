"""lorakit.core.adapters: several named adapters on one model; switching, use, disabled, delete."""
import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.core.adapters import followers, temporarily
from lorakit.core.identity import surface
from cases import Toy, factors_of, randomize_model_, toy_reference

IDX = torch.tensor([[1, 5, 2, 12, 0], [3, 3, 7, 9, 11]])
CONFIGS = {
    "a": lk.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "embed")),
    "b": lk.LoraConfig(rank=2, alpha=1.0, targets=("k_proj", "v_proj", "conv", "lm_head")),
    "c": lk.LoraConfig(rank=1, alpha=3.0, targets="all-linear", rslora=True),
}
SCALE = {"a": 2.0, "b": 0.5, "c": 3.0}  # alpha / rank; c: alpha / sqrt(rank)


@pytest.fixture
def model_and_base():
    model = Toy()
    base = copy.deepcopy(model)
    for name, config in CONFIGS.items():
        lk.inject_(model, config, adapter=name)
    randomize_model_(model, 0)
    return model, base


def expected(model, base, name):
    return toy_reference(base, IDX, factors_of(model, name, lambda path: SCALE[name]))


def assert_matches(model, base, name):
    torch.testing.assert_close(model(IDX).double(), expected(model, base, name), rtol=1e-5, atol=1e-5)


def test_adapters_have_their_own_targets_ranks_and_configs(model_and_base):
    model, _ = model_and_base
    assert lk.adapters(model) == ["a", "b", "c"]
    assert lk.active_adapter(model) == "a"  # the first injected stays active
    assert lk.adapter_paths(model, "a") == ["embed", "q_proj", "v_proj"]
    assert lk.adapter_paths(model, "b") == ["k_proj", "v_proj", "conv", "lm_head"]
    assert lk.adapter_paths(model, "c") == ["q_proj", "k_proj", "v_proj", "o_proj"]  # all-linear: no head
    assert model.v_proj.adapters["a"].A.shape == (4, 8) and model.v_proj.adapters["b"].A.shape == (2, 8)
    assert model.v_proj.adapters["c"].scale == pytest.approx(3.0 / math.sqrt(1))
    for name, config in CONFIGS.items():
        assert lk.adapter_config(model, name) == config


def test_set_active_switches_between_adapters(model_and_base):
    model, base = model_and_base
    for name in ("b", "c", "a", "c"):
        lk.set_active(model, name)
        assert lk.active_adapter(model) == name
        assert_matches(model, base, name)
    lk.set_active(model, None)
    assert lk.active_adapter(model) is None
    assert torch.equal(model(IDX), base(IDX))


def test_switching_copies_no_weights(model_and_base):
    model, _ = model_and_base
    before = [(p, p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    for name in ("b", "c", None, "a"):
        lk.set_active(model, name)
        with lk.use(model, "b"):
            model(IDX)
    after = list(model.parameters())
    assert len(after) == len(before)
    for (p, ptr, value), q in zip(before, after):
        assert p is q and q.data_ptr() == ptr and torch.equal(q, value)


def test_use_restores_the_previous_adapter_even_when_the_body_raises(model_and_base):
    model, base = model_and_base
    out = model(IDX)
    with lk.use(model, "b") as used:
        assert used is model and lk.active_adapter(model) == "b"
        assert_matches(model, base, "b")
        with lk.use(model, None):
            assert torch.equal(model(IDX), base(IDX))
        assert lk.active_adapter(model) == "b"
    assert lk.active_adapter(model) == "a" and torch.equal(model(IDX), out)
    with pytest.raises(RuntimeError, match="boom"):
        with lk.use(model, "c"):
            raise RuntimeError("boom")
    assert lk.active_adapter(model) == "a" and torch.equal(model(IDX), out)


def test_disabled_runs_the_base_and_restores_even_when_the_body_raises(model_and_base):
    model, base = model_and_base
    out = model(IDX)
    with lk.disabled(model) as plain:
        assert plain is model
        assert torch.equal(model(IDX), base(IDX))
        with lk.disabled(model):
            assert torch.equal(model(IDX), base(IDX))
        assert torch.equal(model(IDX), base(IDX))  # the inner exit kept the outer state
    assert torch.equal(model(IDX), out)
    with pytest.raises(RuntimeError, match="boom"):
        with lk.disabled(model):
            raise RuntimeError("boom")
    assert not any(layer.disabled for _, layer in lk.lora_layers(model))
    assert lk.active_adapter(model) == "a" and torch.equal(model(IDX), out)


@pytest.mark.parametrize("raises", [False, True])
def test_disabled_while_merged_unmerges_then_merges_again(model_and_base, raises):
    model, base = model_and_base
    lk.merge_(model, "b")
    merged = {p: layer.base_layer.weight.detach().clone() for p, layer in lk.lora_layers(model)}
    out = model(IDX)
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with lk.disabled(model):
            assert lk.merged_adapter(model) is None
            for path, layer in lk.lora_layers(model):
                assert torch.equal(layer.base_layer.weight, base.get_submodule(path).weight), path
            assert torch.equal(model(IDX), base(IDX))
            if raises:
                raise RuntimeError("boom")
    assert lk.merged_adapter(model) == "b" and lk.active_adapter(model) == "b"
    for path, layer in lk.lora_layers(model):
        assert torch.equal(layer.base_layer.weight, merged[path]), path
    assert torch.equal(model(IDX), out)
    assert_matches(model, base, "b")


def test_delete_adapter(model_and_base):
    model, base = model_and_base
    conv, head = model.conv.base_layer, model.lm_head.base_layer
    out_a = model(IDX)
    lk.delete_adapter(model, "b")
    assert lk.adapters(model) == ["a", "c"]
    # conv and lm_head carried only "b": they are their own plain base layers again.
    assert model.conv is conv and model.lm_head is head
    assert type(model.conv) is nn.Conv1d and type(model.lm_head) is nn.Linear
    assert "b" not in model.v_proj.adapters and not model.v_proj.holds("b")
    assert torch.equal(model(IDX), out_a)

    lk.delete_adapter(model, "a")  # the active one: none is active afterwards
    assert lk.adapters(model) == ["c"] and lk.active_adapter(model) is None
    assert type(model.embed) is nn.Embedding
    assert torch.equal(model(IDX), base(IDX))
    lk.set_active(model, "c")
    assert_matches(model, base, "c")

    lk.delete_adapter(model, "c")
    assert not list(lk.lora_layers(model)) and lk.adapters(model) == []
    assert [(p, type(m)) for p, m in model.named_modules()] == [(p, type(m)) for p, m in base.named_modules()]
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_errors_name_the_bad_value_and_change_nothing(model_and_base):
    model, _ = model_and_base
    out = model(IDX)
    for call in (lambda: lk.set_active(model, "nope"), lambda: lk.use(model, "nope").__enter__(),
                 lambda: lk.delete_adapter(model, "nope"), lambda: lk.adapter_config(model, "nope")):
        with pytest.raises(lk.LoraError, match=r"adapter='nope' is not in this model; its adapters are \['a', 'b', 'c'\]"):
            call()
    assert lk.adapters(model) == ["a", "b", "c"] and lk.active_adapter(model) == "a"
    assert torch.equal(model(IDX), out)
    assert issubclass(lk.LoraError, ValueError)


def test_switching_or_deleting_while_merged_is_refused(model_and_base):
    model, _ = model_and_base
    lk.merge_(model, "b")
    out = model(IDX)
    with pytest.raises(lk.LoraError, match=r"adapter='a'.*'b' merged.*unmerge_"):
        lk.set_active(model, "a")
    with pytest.raises(lk.LoraError, match=r"adapter='c'.*'b' merged"):
        with lk.use(model, "c"):
            pass
    with pytest.raises(lk.LoraError, match=r"adapter='b' is merged.*unmerge_"):
        lk.delete_adapter(model, "b")
    assert lk.merged_adapter(model) == "b" and lk.active_adapter(model) == "b"
    assert torch.equal(model(IDX), out)
    with lk.use(model, "b"):  # the merged adapter itself is fine
        assert torch.equal(model(IDX), out)
    lk.delete_adapter(model, "a")  # so is deleting another one
    assert lk.adapters(model) == ["b", "c"] and torch.equal(model(IDX), out)


def test_no_adapters():
    model = Toy()
    assert lk.adapters(model) == [] and lk.active_adapter(model) is None and lk.merged_adapter(model) is None
    with pytest.raises(lk.LoraError, match=r"adapter='x'.*\[\].*inject_"):
        lk.set_active(model, "x")
    with lk.disabled(model):
        pass


def test_a_model_with_adapters_deep_copies(model_and_base):
    model, base = model_and_base
    lk.merge_(model, "c")
    clone = copy.deepcopy(model)
    assert lk.adapters(clone) == ["a", "b", "c"] and lk.merged_adapter(clone) == "c"
    assert torch.equal(clone(IDX), model(IDX))
    lk.unmerge_(clone)
    lk.set_active(clone, "b")
    assert_matches(clone, base, "b")
    assert lk.merged_adapter(model) == "c"  # the original is independent


@pytest.mark.parametrize("name", ["half", "train", "to", "keys"])
def test_adapter_names_that_are_torch_attributes_are_refused(name):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(lk.LoraError, match=f"adapter='{name}' is the name of a torch module attribute"):
        lk.inject_(model, lk.LoraConfig(targets=("0",)), name)
    assert lk.adapters(model) == [] and isinstance(model[0], nn.Linear)


def test_followers_share_one_protocol_and_temporarily_restores_each_value():
    """LoRA layers and modules to save answer the same questions; delete_adapter, disabled and
    mixed_batch rely on it."""
    model = Toy()
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("q_proj", "v_proj"), modules_to_save=("lm_head",)))
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("q_proj",)), adapter="second")
    found = followers(model)
    assert [path for path, _ in found] == ["q_proj", "v_proj", "lm_head"]
    q, v, head = (m for _, m in found)
    assert q.holds("second") and not v.holds("second") and head.holds("default") and not head.holds("second")
    assert q.wrapped is q.base_layer and head.wrapped is head.original_module and not head.empty
    v.active_adapter, head.disabled = "default", False
    with temporarily([q, v, head], "disabled", True):
        assert q.disabled and v.disabled and head.disabled
    assert (q.disabled, v.disabled, head.disabled) == (False, False, False)
    head.drop("default")
    assert head.empty and not head.holds("default")


def test_surface_is_named_modules_without_the_insides_of_followers():
    """Against named_modules itself: every module outside a follower, followers included, in module order, a
    module reached twice listed once (here a linear layer both wrapped and registered again elsewhere)."""
    model = Toy()
    model.alias = model.o_proj  # one module at two paths
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("q_proj", "o_proj"), modules_to_save=("lm_head",)))
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("q_proj",)), adapter="second")
    followers_at = [p + "." for p, m in model.named_modules() if isinstance(m, (lk.LoraLayer, lk.ModuleToSave))]
    expected = [(p, m) for p, m in model.named_modules() if not p.startswith(tuple(followers_at))]
    assert list(surface(model)) == expected
    assert "alias" not in dict(expected)  # o_proj's base layer, reached first inside the wrapper
