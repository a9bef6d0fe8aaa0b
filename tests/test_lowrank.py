"""lorakit.lowrank: the scale, dW = scale * B @ A (grouped) and the unmerged low-rank path."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorakit as lk
import reference
from lorakit.lowrank import lowrank_linear


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
