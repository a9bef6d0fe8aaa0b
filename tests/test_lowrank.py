"""lorakit.core.lowrank: the scale, dW = scale * B @ A (grouped) and the unmerged low-rank path."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit as lk
import reference
from lorakit.core.lowrank import lowrank_linear, padded_to_rank


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (8, 16.0), (16, 8.0), (3, 7.5), (64, 128)])
def test_lora_scale_is_alpha_over_rank(rank, alpha):
    assert lk.lora_scale(rank, alpha) == alpha / rank
    assert lk.lora_scale(rank, alpha, rslora=False) == alpha / rank


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 16.0), (16, 8.0), (3, 7.5), (64, 128)])
def test_lora_scale_rslora_is_alpha_over_sqrt_rank(rank, alpha):
    assert lk.lora_scale(rank, alpha, rslora=True) == pytest.approx(alpha / math.sqrt(rank), rel=1e-15)
    if rank > 1:
        assert lk.lora_scale(rank, alpha, rslora=True) != lk.lora_scale(rank, alpha)


def _factors(seed, rank, d_out, fan_in, kernel=(), groups=1, dyadic=False, dtype=torch.float32):
    """A (r, fan_in, *kernel) and B (d_out, r/groups, *ones), as lorakit documents them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(rank, fan_in, *kernel), (d_out, rank // groups, *(1,) * len(kernel))]
    if dyadic:
        return [(torch.randint(-15, 16, s, generator=g) / 16).to(dtype) for s in shapes]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def test_delta_weight_matches_reference_linear():
    A, B = _factors(0, rank=4, d_out=6, fan_in=5)
    dW = lk.delta_weight(A, B, 0.5)
    assert dW.shape == (6, 5) and dW.dtype == torch.float32
    torch.testing.assert_close(dW, reference.update(A, B, 0.5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dW.double(), 0.5 * B.double() @ A.double(), rtol=1e-6, atol=1e-6)


def test_delta_weight_is_exact_for_exactly_representable_factors():
    # k/16 entries: every product and partial sum is exact in float32, in any summation order.
    A, B = _factors(1, rank=6, d_out=7, fan_in=9, dyadic=True)
    assert torch.equal(lk.delta_weight(A, B, 2.0), reference.update(A, B, 2.0))


@pytest.mark.parametrize("rank, to", [(2, 5), (3, 3)])
def test_padding_to_a_larger_rank_leaves_the_update_exactly_as_it_was(rank, to):
    A, B = _factors(3, rank=rank, d_out=6, fan_in=5)
    A2, B2 = padded_to_rank(A, B, to)
    assert A2.shape == (to, 5) and B2.shape == (6, to)
    assert torch.equal(A2[:rank], A) and torch.equal(B2[:, :rank], B)
    assert not A2[rank:].any() and not B2[:, rank:].any()
    # rank 2: each entry sums two nonzero products, plus zeros: one rounding, in any summation order
    assert torch.equal(reference.update(A2, B2, 0.5), reference.update(A, B, 0.5))
    assert (A2 is A and B2 is B) == (rank == to)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_delta_weight_is_float32_for_low_precision_factors(dtype):
    A, B = _factors(2, rank=8, d_out=5, fan_in=7, dyadic=True, dtype=dtype)
    dW = lk.delta_weight(A, B, 1.0)
    assert dW.dtype == torch.float32
    # Summed in float32, not in the factors' dtype: equals the float32 reference exactly.
    assert torch.equal(dW, reference.update(A.float(), B.float(), 1.0))


def test_delta_weight_keeps_float64_factors_in_float64():
    A, B = _factors(3, rank=5, d_out=4, fan_in=6, dtype=torch.float64)
    dW = lk.delta_weight(A, B, 1.0 / 3)
    assert dW.dtype == torch.float64
    torch.testing.assert_close(dW, reference.update(A, B, 1.0 / 3), rtol=1e-14, atol=1e-15)


def test_delta_weight_groups_is_block_diagonal():
    groups, rank, d_out, fan_in, kernel = 3, 6, 9, 2, (2, 2)
    A, B = _factors(3, rank, d_out, fan_in, kernel, groups)
    dW = lk.delta_weight(A, B, 1.5, groups=groups)
    assert dW.shape == (d_out, fan_in * 4)
    torch.testing.assert_close(dW, reference.update(A, B, 1.5, groups), rtol=1e-6, atol=1e-6)
    # Group j's outputs depend only on group j's rank-components of A and B.
    A2 = A.clone()
    A2[rank // groups:] = 0  # keep only group 0's components
    rows = d_out // groups
    assert torch.equal(lk.delta_weight(A2, B, 1.5, groups)[rows:], torch.zeros(d_out - rows, fan_in * 4))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.integers(1, 4), rank_per_group=st.integers(1, 4),
       out_per_group=st.integers(1, 4), fan_in=st.integers(1, 5),
       kernel=st.lists(st.integers(1, 3), max_size=3), scale=st.floats(0.01, 100),
       dyadic=st.booleans())
def test_delta_weight_property(seed, groups, rank_per_group, out_per_group, fan_in, kernel, scale, dyadic):
    rank, d_out = groups * rank_per_group, groups * out_per_group
    A, B = _factors(seed, rank, d_out, fan_in, tuple(kernel), groups, dyadic)
    dW = lk.delta_weight(A, B, scale, groups)
    expected = reference.update(A.double(), B.double(), scale, groups)
    assert dW.dtype == torch.float32 and dW.shape == expected.shape
    torch.testing.assert_close(dW.double(), expected, rtol=1e-5, atol=1e-5 * scale)


def test_lowrank_linear_equals_x_times_delta_transposed():
    A, B = _factors(4, rank=3, d_out=4, fan_in=6)
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(5))
    out = lowrank_linear(x, A, B, 0.25)
    assert out.shape == (2, 5, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, x @ reference.update(A, B, 0.25).T, rtol=1e-5, atol=1e-6)
    # Low-precision inputs are lifted to the factors' dtype before the product.
    assert lowrank_linear(x.bfloat16(), A, B, 0.25).dtype == torch.float32


# --- the lean backward of lowrank_linear (_LowRankLinear) --------------------------------------
def _plain_lowrank(x, A, B, scale):
    """The formula lowrank_linear differentiates by hand, left to autograd."""
    return ((x.to(A.dtype) @ A.t()) * scale) @ B.t()


def _leaves(seed, dtype, needs=(True, True, True), shape=(2, 5, 6), rank=3, d_out=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    A = torch.randn(rank, shape[-1], generator=g, dtype=dtype)
    B = torch.randn(d_out, rank, generator=g, dtype=dtype)
    return [t.requires_grad_(need) for t, need in zip((x, A, B), needs)]


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False),
                                   (False, False, True), (True, True, False)])
def test_lowrank_linear_gradcheck_float64(needs):
    x, A, B = _leaves(6, torch.float64, needs)
    assert torch.autograd.gradcheck(lambda *t: lowrank_linear(*t, 0.7), (x, A, B))


@pytest.mark.parametrize("shape", [(7, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_lowrank_linear_gradients_equal_the_plain_formula(shape):
    x, A, B = _leaves(7, torch.float32, shape=shape)
    grad = torch.randn(*shape[:-1], 4, generator=torch.Generator().manual_seed(8))
    ours = torch.autograd.grad(lowrank_linear(x, A, B, 1.5), (x, A, B), grad)
    plain = torch.autograd.grad(_plain_lowrank(x, A, B, 1.5), (x, A, B), grad)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lowrank_linear_under_bfloat16_autocast_matches_the_plain_formula():
    x, A, B = _leaves(9, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, plain = lowrank_linear(x, A, B, 2.0), _plain_lowrank(x, A, B, 2.0)
    assert ours.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(ours, plain)  # the same three bfloat16 operations
    grad = torch.ones_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, A, B), grad), torch.autograd.grad(plain, (x, A, B), grad)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def _saved_tensors(fn):
    """Storages autograd keeps for backward while `fn()` runs: {data_ptr: (shape, nbytes)}."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_lowrank_linear_saves_only_the_input_and_the_small_hidden():
    x, A, B = _leaves(10, torch.float32, needs=(False, True, True), shape=(4, 16, 32), rank=2, d_out=24)
    _, saved = _saved_tensors(lambda: lowrank_linear(x, A, B, 0.5))
    params = {A.untyped_storage().data_ptr(), B.untyped_storage().data_ptr()}
    activations = sorted(shape for ptr, (shape, _) in saved.items() if ptr not in params)
    assert activations == [(4, 16, 2), (4, 16, 32)]  # hidden = x @ A.T, and x itself
    assert x.untyped_storage().data_ptr() in saved  # x as it is, not a copy


def test_lowrank_linear_without_gradients_saves_nothing():
    x, A, B = _leaves(11, torch.float32, needs=(False, False, False))
    out, saved = _saved_tensors(lambda: lowrank_linear(x, A, B, 0.5))
    assert saved == {} and not out.requires_grad
    torch.testing.assert_close(out, _plain_lowrank(x, A, B, 0.5), rtol=0, atol=0)


def test_lora_layer_with_dropout_zero_runs_no_dropout_in_training():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model = torch.nn.Sequential(torch.nn.Linear(32, 24))
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("0",), dropout=0.0))
    model.train()
    x = torch.randn(4, 16, 32)
    with Ops() as ops:
        model(x).sum().backward()
    assert not [n for n in ops.names if "dropout" in n or "bernoulli" in n]
    _, saved = _saved_tensors(lambda: model(x))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert sum(n for ptr, (_, n) in saved.items() if ptr not in params) == x.numel() * 4 + 4 * 16 * 2 * 4  # x, hidden
