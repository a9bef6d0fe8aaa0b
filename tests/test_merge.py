"""lorakit.core.merge: merge_/unmerge_/unload_, and the merge properties over every layer type and dtype."""
import copy

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import lorakit as lk
import reference
from cases import EPS, Toy, cases, f64, factors_of, randomize_, randomize_model_, toy_reference

IDX = torch.tensor([[1, 5, 2, 12, 0], [3, 3, 7, 9, 11]])
TARGETS = ("embed", "q_proj", "v_proj", "conv", "lm_head")


def _toy(**config):
    model = Toy()
    base = copy.deepcopy(model)
    lk.inject_(model, lk.LoraConfig(**{"rank": 2, "alpha": 4.0, "targets": TARGETS, **config}))
    randomize_model_(model, 0)
    return model, base


# --- properties over shapes, ranks and dtypes ------------------------------------------------

def _weights(layer):
    return layer.base_layer.weight, getattr(layer.base_layer, "bias", None)


def _factors(layer):
    return layer.adapters["default"].A, layer.adapters["default"].B


@settings(max_examples=80, deadline=None)
@given(case=cases())
def test_merged_output_equals_unmerged_output(case):
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    x = case.input()
    unmerged = model(x)
    lk.merge_(model)
    merged = model(x)
    W0, b = layer.original_weight, _weights(layer)[1]
    x64 = f64(x) if x.is_floating_point() else x
    # Each path rounds W0 + dW (or its two terms) once or twice: a few eps of the output's magnitude.
    bound = 4 * EPS[case.dtype] * case.magnitude(x64, f64(W0), f64(b), *map(f64, _factors(layer)), 2.0)
    assert merged.dtype == unmerged.dtype == case.dtype
    assert ((merged.double() - unmerged.double()).abs() <= bound).all()


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_merged_weight_is_w0_plus_float32_delta_rounded_once(case):
    # Entries k/16 and scale 2: the reference dW is exact in float32 whatever the summation order,
    # so W0 + dW summed in float32 and rounded once has exactly one right answer.
    model, layer = case.inject()
    randomize_(layer, "default", case.seed, dyadic=True)
    W0 = layer.base_layer.weight.detach().clone()
    dW = case.update_layout(reference.update(*_factors(layer), 2.0, case.conv.get("groups", 1)), W0)
    lk.merge_(model)
    assert layer.base_layer.weight.dtype == case.dtype
    assert torch.equal(layer.base_layer.weight, (W0.float() + dW).to(case.dtype))


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_merged_weight_with_random_factors(case):
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    W0 = layer.base_layer.weight.detach().clone()
    dW = layer.delta_weight("default")
    dW_ref = case.update_layout(reference.update(*map(f64, _factors(layer)), 2.0, case.conv.get("groups", 1)), W0)
    assert dW.dtype == torch.float32
    torch.testing.assert_close(dW.double(), dW_ref, rtol=1e-5, atol=1e-5)
    lk.merge_(model)
    assert torch.equal(layer.base_layer.weight, (W0.float() + dW).to(case.dtype))


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_unmerge_restores_w_bit_exactly_after_many_cycles(case):
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    x = case.input()
    W0 = layer.base_layer.weight.detach().clone()
    unmerged = model(x)
    lk.merge_(model)
    merged_weight, merged_out = layer.base_layer.weight.detach().clone(), model(x)
    for _ in range(7):
        lk.unmerge_(model)
        assert torch.equal(layer.base_layer.weight, W0) and lk.merged_adapter(model) is None
        assert torch.equal(model(x), unmerged)
        lk.merge_(model)
        assert torch.equal(layer.base_layer.weight, merged_weight)
        assert torch.equal(model(x), merged_out)
    lk.unmerge_(model)
    assert torch.equal(layer.base_layer.weight, W0)
    assert layer.base_layer.weight.dtype == case.dtype


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_merge_is_idempotent(case):
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    W0 = layer.base_layer.weight.detach().clone()
    lk.merge_(model)
    once = layer.base_layer.weight.detach().clone()
    lk.merge_(model)
    lk.merge_(model, "default")
    assert torch.equal(layer.base_layer.weight, once)
    lk.unmerge_(model)
    assert torch.equal(layer.base_layer.weight, W0)


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_merged_forward_is_the_base_path_only(case):
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    x = case.input()
    lk.merge_(model)

    def no_lowrank(*args, **kwargs):
        raise AssertionError("the low-rank path ran while merged")

    layer.lowrank = no_lowrank
    assert torch.equal(model(x), layer.base_layer(x))


# --- merge_ / unmerge_ on a model --------------------------------------------------------------

def test_merge_of_a_whole_model_matches_reference():
    model, base = _toy()
    expected = toy_reference(base, IDX, factors_of(model, "default", lambda path: 2.0))
    torch.testing.assert_close(model(IDX).double(), expected, rtol=1e-5, atol=1e-5)
    lk.merge_(model)
    assert lk.merged_adapter(model) == "default"
    assert all(layer.merged_adapter == "default" for _, layer in lk.lora_layers(model))
    torch.testing.assert_close(model(IDX).double(), expected, rtol=1e-5, atol=1e-5)
    lk.unmerge_(model)
    assert lk.merged_adapter(model) is None
    for path, _ in lk.lora_layers(model):
        assert torch.equal(model.get_submodule(path).base_layer.weight, base.get_submodule(path).weight)


def test_merge_names_an_adapter_and_makes_it_active():
    model, base = _toy()
    lk.inject_(model, lk.LoraConfig(rank=4, alpha=4.0, targets=("k_proj", "v_proj")), adapter="other")
    randomize_model_(model, 1)
    assert lk.active_adapter(model) == "default"
    lk.merge_(model, "other")
    assert lk.merged_adapter(model) == "other" and lk.active_adapter(model) == "other"
    expected = toy_reference(base, IDX, factors_of(model, "other", lambda path: 1.0))
    torch.testing.assert_close(model(IDX).double(), expected, rtol=1e-5, atol=1e-5)
    # Layers without "other" keep their weights and run the base path.
    assert torch.equal(model.q_proj.base_layer.weight, base.q_proj.weight)


def test_merge_errors_name_the_bad_value():
    model, _ = _toy()
    with pytest.raises(lk.LoraError, match=r"adapter='nope'.*\['default'\]"):
        lk.merge_(model, "nope")
    lk.set_active(model, None)
    with pytest.raises(lk.LoraError, match=r"adapter=None"):
        lk.merge_(model)
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("k_proj",)), adapter="other")
    lk.merge_(model, "default")
    before = {p: layer.base_layer.weight.clone() for p, layer in lk.lora_layers(model)}
    with pytest.raises(lk.LoraError, match=r"adapter='other'.*'default' is already merged"):
        lk.merge_(model, "other")
    assert lk.merged_adapter(model) == "default"
    assert all(torch.equal(layer.base_layer.weight, before[p]) for p, layer in lk.lora_layers(model))


def test_unmerge_without_a_merge_is_a_no_op():
    model, _ = _toy()
    out = model(IDX)
    lk.unmerge_(model)
    assert torch.equal(model(IDX), out) and lk.merged_adapter(model) is None


def test_merge_does_not_accumulate_training_graph():
    model, _ = _toy()
    lk.merge_(model)
    assert all(not layer.base_layer.weight.requires_grad for _, layer in lk.lora_layers(model))
    assert all(layer.base_layer.weight.grad_fn is None for _, layer in lk.lora_layers(model))


# --- unload_ ----------------------------------------------------------------------------------

def _assert_plain(model, base):
    assert not list(lk.lora_layers(model))
    assert [(p, type(m)) for p, m in model.named_modules()] == [(p, type(m)) for p, m in base.named_modules()]
    assert model.state_dict().keys() == base.state_dict().keys()


def test_unload_with_merge_folds_the_active_adapter():
    model, base = _toy()
    expected = model(IDX)
    reference_out = toy_reference(base, IDX, factors_of(model, "default", lambda path: 2.0))
    assert lk.unload_(model, merge=True) is model
    _assert_plain(model, base)
    torch.testing.assert_close(model(IDX), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(IDX).double(), reference_out, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.q_proj.weight, base.q_proj.weight)
    assert torch.equal(model.k_proj.weight, base.k_proj.weight)  # not a target


def test_unload_with_merge_keeps_a_merged_adapter_bit_for_bit():
    model, base = _toy()
    lk.merge_(model)
    merged = {p: layer.base_layer.weight.clone() for p, layer in lk.lora_layers(model)}
    out = model(IDX)
    lk.unload_(model)
    _assert_plain(model, base)
    assert all(torch.equal(model.get_submodule(p).weight, w) for p, w in merged.items())
    assert torch.equal(model(IDX), out)


@pytest.mark.parametrize("merged", [False, True])
def test_unload_without_merge_gives_back_the_base_model(merged):
    model, base = _toy()
    if merged:
        lk.merge_(model)
    lk.unload_(model, merge=False)
    _assert_plain(model, base)
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model(IDX), base(IDX))


def test_unload_with_no_active_adapter_changes_no_weight():
    model, base = _toy()
    lk.set_active(model, None)
    lk.unload_(model, merge=True)
    _assert_plain(model, base)
    assert torch.equal(model(IDX), base(IDX))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unload_in_low_precision_rounds_once(dtype):
    model, _ = _toy()
    model.to(dtype)
    expected = {p: (layer.base_layer.weight.float() + layer.delta_weight("default")).to(dtype)
                for p, layer in lk.lora_layers(model)}
    lk.unload_(model)
    assert all(torch.equal(model.get_submodule(p).weight, w) for p, w in expected.items())
    assert all(isinstance(model.get_submodule(p), (nn.Linear, nn.Embedding, nn.Conv1d)) for p in expected)
