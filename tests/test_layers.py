"""lorakit.core.layers: every LoRA layer type against reference.py, unmerged and merged, with gradients."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import lorakit as lk
import reference
from cases import DTYPES, EPS, EXAMPLES, Case, Holder, cases, f64, randomize_
from lorakit.core.layers import LoraConv, LoraConv1D, LoraEmbedding, LoraLinear

WRAPPER = {"linear": LoraLinear, "gpt2_conv1d": LoraConv1D, "embedding": LoraEmbedding,
           "conv1d": LoraConv, "conv2d": LoraConv, "conv3d": LoraConv}


def _bias(layer):
    return getattr(layer.base_layer, "bias", None)


def _operands(layer, x):
    """x, W, b, A, B in float64 (indices stay integers), scale alpha / rank = 2 (see Case.config)."""
    A, B = layer.adapters["default"].A, layer.adapters["default"].B
    return f64(x) if x.is_floating_point() else x, f64(layer.base_layer.weight), f64(_bias(layer)), f64(A), f64(B), 2.0


def _reference(case, layer, x):
    return case.reference(*_operands(layer, x))


def _bound(case, layer, x, ulps):
    """ulps eps of the output's magnitude: rounding error allowed in the layer's dtype."""
    return ulps * EPS[case.dtype] * case.magnitude(*_operands(layer, x))


@pytest.mark.parametrize("name", EXAMPLES)
def test_wraps_with_the_right_layer_and_adapter_shapes(name):
    case = EXAMPLES[name]
    model, layer = case.inject()
    assert type(layer) is WRAPPER[case.kind] and isinstance(layer, lk.LoraLayer)
    assert [path for path, _ in lk.lora_layers(model)] == ["layer"]
    W, A, B = layer.base_layer.weight, layer.adapters["default"].A, layer.adapters["default"].B
    # The reference's block-diagonal B @ A has as many entries as the weight.
    assert reference.update(A, B, 1.0, case.conv.get("groups", 1)).numel() == W.numel()
    assert A.shape[0] == case.rank and A.dtype == B.dtype == torch.float32
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0  # a fresh adapter is a no-op


@pytest.mark.parametrize("name", EXAMPLES)
def test_unmerged_and_merged_match_reference_in_float64(name):
    case = EXAMPLES[name]
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    model.double()
    x = case.input()
    x = x.double() if x.is_floating_point() else x
    expected = _reference(case, layer, x)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    lk.merge_(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", EXAMPLES)
def test_float32_matches_reference(name):
    case = EXAMPLES[name]
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    x = case.input()
    expected = _reference(case, layer, x)
    for merged in (False, True):
        if merged:
            lk.merge_(model)
        out = model(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EXAMPLES)
def test_gradients_flow_only_to_A_and_B_and_match_reference(name):
    case = EXAMPLES[name]
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    model.double()
    x = case.input()
    if x.is_floating_point():
        x = x.double().requires_grad_()
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (out * weights).sum().backward()

    A = layer.adapters["default"].A.detach().clone().requires_grad_()
    B = layer.adapters["default"].B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_() if x.is_floating_point() else x
    W, b = layer.base_layer.weight.detach(), _bias(layer)
    (case.reference(x_ref, W, None if b is None else b.detach(), A, B, 2.0) * weights).sum().backward()

    torch.testing.assert_close(layer.adapters["default"].A.grad, A.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.adapters["default"].B.grad, B.grad, rtol=1e-10, atol=1e-12)
    assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0
    if x.is_floating_point():
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for p_name, p in model.named_parameters():
        if p is not layer.adapters["default"].A and p is not layer.adapters["default"].B:
            assert not p.requires_grad and p.grad is None, p_name


def test_dropout_applies_to_the_adapter_input_only():
    case = EXAMPLES["linear"]
    model, layer = case.inject(dropout=0.5)
    randomize_(layer, "default", case.seed)
    x = case.input()
    W, b, A, B = layer.base_layer.weight, _bias(layer), layer.adapters["default"].A, layer.adapters["default"].B
    model.train()
    torch.manual_seed(123)
    out = model(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    expected = F.linear(x, W, b) + 2.0 * (dropped @ A.T) @ B.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, _reference(case, layer, x).float(), atol=1e-3)  # the mask did something
    model.eval()
    torch.testing.assert_close(model(x).double(), _reference(case, layer, x), rtol=1e-5, atol=1e-5)


def test_embedding_takes_no_dropout():
    case = EXAMPLES["embedding"]
    model, layer = case.inject(dropout=0.9)
    randomize_(layer, "default", case.seed)
    model.train()
    x = case.input()
    torch.testing.assert_close(model(x).double(), _reference(case, layer, x), rtol=1e-5, atol=1e-5)


def test_conv_respects_padding_mode():
    case = EXAMPLES["conv2d_groups"]
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular")
    model = Holder(base)
    lk.inject_(model, case.config(rank=2, alpha=4.0))
    layer = model.layer
    randomize_(layer, "default", 0)
    x = torch.randn(2, 4, 5, 5)
    padded = F.pad(x.double(), (1, 1, 1, 1), mode="circular")
    expected = reference.conv(padded, f64(base.weight), f64(base.bias), f64(layer.adapters["default"].A),
                               f64(layer.adapters["default"].B), 2.0, groups=2)
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_layer_reads_through_to_the_base_layer():
    model, layer = EXAMPLES["linear"].inject()
    assert layer.weight is layer.base_layer.weight
    assert (layer.in_features, layer.out_features) == (7, 5)
    with pytest.raises(AttributeError):
        layer.no_such_attribute


def test_gaussian_init():
    case = Case("linear", {"d_in": 400, "d_out": 3, "bias": True, "batch": (1,)}, 4, 0)
    _, layer = case.inject(init="gaussian")
    A = layer.adapters["default"].A
    assert abs(A.std().item() - 1 / 4) < 0.02 and torch.count_nonzero(layer.adapters["default"].B) == 0


def test_default_init_is_kaiming_uniform_like_linear():
    case = Case("linear", {"d_in": 400, "d_out": 3, "bias": True, "batch": (1,)}, 4, 0)
    _, layer = case.inject()
    A = layer.adapters["default"].A
    bound = 1 / 400 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in=400
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound


# --- properties over shapes, ranks and dtypes ------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(case=cases())
def test_fresh_adapter_is_a_no_op(case):
    base = case.base()
    x = case.input()
    expected = base(x)
    model, layer = case.inject()
    out = model(x)
    assert out.dtype == expected.dtype == case.dtype
    assert torch.equal(out, expected)


@settings(max_examples=60, deadline=None)
@given(case=cases(dtypes=(torch.float32,)))
def test_unmerged_output_matches_reference(case):
    model, layer = case.inject()
    randomize_(layer, "default", case.seed)
    x = case.input()
    error = (model(x).double() - _reference(case, layer, x)).abs()
    assert (error <= _bound(case, layer, x, ulps=8)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_runs_in_float32_and_returns_the_base_dtype(dtype):
    for case in EXAMPLES.values():
        case = Case(case.kind, case.dims, case.rank, case.seed, dtype, case.conv)
        model, layer = case.inject()
        randomize_(layer, "default", case.seed)
        x = case.input()
        out = model(x)
        assert out.dtype == dtype
        error = (out.double() - _reference(case, layer, x)).abs()
        assert (error <= _bound(case, layer, x, ulps=4)).all(), case.kind
