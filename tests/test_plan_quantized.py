"""lorakit.training.plan_quantized: the planner's stand-ins for bitsandbytes' quantized layers, against
bitsandbytes itself: the bytes a quantized layer keeps (counted over every tensor it holds), and the bytes
its forward and backward create (counted with LiveBytes, on the real layer and on the fake stand-in)."""
import warnings

import pytest
import torch
from torch import nn

from lorakit.core.precision import BasePrecision, convert_
from lorakit.training.plan import _FakeMode
from lorakit.training.plan_trace import LiveBytes
from lorakit.training.plan_quantized import QuantizedStandIn, stand_in_quantized_, stored_bytes
from memory import held_bytes

bnb = pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*kernels.*")

PRECISIONS = [BasePrecision(base_dtype="nf4"), BasePrecision(base_dtype="nf4", double_quant=False),
              BasePrecision(base_dtype="nf4", block_size=256), BasePrecision(base_dtype="nf4", compute_dtype="float16"),
              BasePrecision(base_dtype="int8")]
IDS = ["nf4", "nf4-single-quant", "nf4-block256", "nf4-fp16", "int8"]


def quantized_layer(out_features: int, in_features: int, precision: BasePrecision, bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return convert_(nn.Sequential(nn.Linear(in_features, out_features, bias=bias)), precision)[0]


@pytest.mark.parametrize("shape", [(1536, 576), (37, 100)], ids=["smollm2-mlp", "odd"])
@pytest.mark.parametrize("precision", PRECISIONS, ids=IDS)
def test_stored_bytes_are_what_bitsandbytes_keeps(precision, shape):
    layer = quantized_layer(*shape, precision)  # no bias: stored_bytes counts the weight's
    assert held_bytes(layer) == stored_bytes(*shape, precision)
    layer.train()(torch.randn(2, shape[1], dtype=precision.torch_dtype))  # int8 moves its scales to the layer's state
    assert held_bytes(layer) == stored_bytes(*shape, precision)
    with _FakeMode():
        stand_in = QuantizedStandIn(*shape, False, precision)
    assert sum(t.untyped_storage().nbytes() for t in [*stand_in.parameters(), *stand_in.buffers()]) == \
        stored_bytes(*shape, precision)


def step_bytes(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[int, int, int]:
    """(peak bytes created during the forward, bytes still alive after it, peak during the backward) of
    layer(x + 0) then backward(grad); the input x + 0 is the step's own, dropped after the forward."""
    with LiveBytes() as forward:
        y = layer(x + 0)  # alive after the forward only if the layer keeps it for its backward
    with LiveBytes() as backward:
        y.backward(grad)
    return forward.peak, forward.live, backward.peak


@pytest.mark.parametrize("precision", PRECISIONS, ids=IDS)
def test_the_stand_in_creates_what_the_quantized_layer_creates(precision):
    """A wide layer on few tokens, so that the dense weight rebuilt for each matmul dominates."""
    (out_features, in_features), tokens, dtype = (1024, 512), (2, 4), precision.torch_dtype
    dense = 2 * out_features * in_features  # the dequantized weight, in the 16-bit compute dtype
    x = torch.randn(*tokens, in_features, dtype=dtype, requires_grad=True)
    real = step_bytes(quantized_layer(out_features, in_features, precision, bias=True).train(), x,
                      torch.ones(*tokens, out_features, dtype=dtype))
    fake_mode = _FakeMode()
    with fake_mode:
        stand_in = QuantizedStandIn(out_features, in_features, True, precision)
        fake_x = torch.empty(*tokens, in_features, dtype=dtype, requires_grad=True)
        fake_grad = torch.empty(*tokens, out_features, dtype=dtype)
        fake = step_bytes(stand_in, fake_x, fake_grad)
    output, given = 2 * tokens[0] * tokens[1] * out_features, 2 * tokens[0] * tokens[1] * in_features
    assert real[1] == fake[1] == output + (given if precision.base_dtype == "int8" else 0), (fake, real)  # kept: int8
    assert real[2] >= dense and abs(fake[2] - real[2]) <= 0.02 * real[2], (fake, real)  # backward dequantizes
    if precision.base_dtype == "int8":
        assert real[0] >= dense and abs(fake[0] - real[0]) <= 0.02 * real[0], (fake, real)
    else:  # nf4's forward dequantizes inside one op (gemm_4bit), whose own tensors LiveBytes cannot see: the profiler can
        inside = hidden_dequantization_bytes(quantized_layer(out_features, in_features, precision, bias=True).train(), x)
        assert real[0] < dense <= inside and abs(fake[0] - (real[0] + inside)) <= 0.05 * dense, (fake, real, inside)


def hidden_dequantization_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes bitsandbytes' 4-bit dequantization allocates during the layer's forward, as torch's profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiled:
        layer(x)
    return sum(e.cpu_memory_usage for e in profiled.events() if e.name == "bitsandbytes::dequantize_4bit")


def test_stand_ins_replace_the_linear_layers_convert_quantizes():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    precision = BasePrecision(base_dtype="nf4")
    configs = [LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100), GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)]
    for config, cls in zip(configs, [LlamaForCausalLM, GPT2LMHeadModel]):
        real = cls(config)
        convert_(real, precision, keep=(real.lm_head,))
        with _FakeMode():
            fake = cls(config)
            stand_in_quantized_(fake, precision, keep=(fake.lm_head,))
        quantized = {path for path, m in real.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert quantized == {path for path, m in fake.named_modules() if isinstance(m, QuantizedStandIn)}
        for path in quantized:
            assert (real.get_submodule(path).out_features, real.get_submodule(path).in_features) == \
                (fake.get_submodule(path).out_features, fake.get_submodule(path).in_features)
