"""bitsandbytes' quantized linear layers as the planner sees them: stand-ins, built on fake tensors, that
hold what Linear4bit (nf4) and Linear8bitLt (int8) store, tensor for tensor, and create in forward and
backward what those create, so that a dry run counts a quantized base without bitsandbytes or weights.

What bitsandbytes (0.50) stores for an (out, in) weight of n = out * in values (`stored_tensors`):

    nf4   the weights, two per byte                                 ceil(n / 2) uint8
          one absmax scale per block of block_size weights          float32; double_quant: uint8, and
            the uint8 scales' own: one per 256 blocks (float32), an offset (float32), a code (256 float32)
          the NF4 code table                                        16 float32
    int8  the weights                                               n int8
          one scale per output row                                  out float32

What it computes with (`_Dequantized`): the input in the compute dtype, and the weight dequantized to a
dense (out, in) tensor in the compute dtype (beside the float32 scales it dequantizes first), once for the
forward and again for the input's gradient in backward, each freed as soon as its matmul is done. On CPU, LLM.int8's training path (bitsandbytes'
MatMul8bitFp) also keeps the layer's input until the step's graph is freed.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..core.precision import BasePrecision, linear_weight, register_stand_in

NF4_CODE = 16  # NF4's 16 levels, float32
ABSMAX_CODE = 256  # double quantization's 8-bit code for the block scales, float32
ABSMAX_BLOCK = 256  # block scales per float32 scale of their own (double quantization)


def stored_tensors(out_features: int, in_features: int, precision: BasePrecision) -> dict[str, tuple]:
    """name -> (shape, dtype) of every tensor bitsandbytes keeps for one quantized (out, in) weight (no bias)."""
    n = out_features * in_features
    if precision.base_dtype == "int8":
        return {"weight": ((out_features, in_features), torch.int8), "row_scales": ((out_features,), torch.float32)}
    assert precision.base_dtype == "nf4", precision
    blocks = math.ceil(n / precision.block_size)
    tensors = {"weight": (((n + 1) // 2, 1), torch.uint8), "code": ((NF4_CODE,), torch.float32)}
    if not precision.double_quant:
        return {**tensors, "absmax": ((blocks,), torch.float32)}
    return {**tensors, "absmax": ((blocks,), torch.uint8),
            "absmax_scales": ((math.ceil(blocks / ABSMAX_BLOCK),), torch.float32),
            "absmax_offset": ((), torch.float32), "absmax_code": ((ABSMAX_CODE,), torch.float32)}


def dequantization_scales(out_features: int, in_features: int, precision: BasePrecision) -> int:
    """How many float32 scales dequantizing the weight computes and holds beside the dense weight: the
    8-bit block scales of double quantization, LLM.int8's row scales (divided by 127)."""
    if precision.base_dtype == "int8":
        return out_features
    return math.ceil(out_features * in_features / precision.block_size) if precision.double_quant else 0


def stored_bytes(out_features: int, in_features: int, precision: BasePrecision) -> int:
    """Bytes bitsandbytes keeps for one quantized (out, in) weight (no bias)."""
    return sum(math.prod(shape) * dtype.itemsize
               for shape, dtype in stored_tensors(out_features, in_features, precision).values())


@register_stand_in
class QuantizedStandIn(nn.Linear):
    """A bitsandbytes quantized linear layer's stand-in: its tensors shaped and typed as bitsandbytes
    stores them (`weight` packed, the scales as buffers), frozen; its forward and backward allocate what
    bitsandbytes' do. Values are never computed: it is built and run on fake tensors only."""

    def __init__(self, out_features: int, in_features: int, has_bias: bool, precision: BasePrecision) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.kind = precision.torch_dtype, precision.base_dtype
        self.scales = dequantization_scales(out_features, in_features, precision)
        self.keeps_input = precision.base_dtype == "int8"
        for name, (shape, dtype) in stored_tensors(out_features, in_features, precision).items():
            tensor = torch.empty(shape, dtype=dtype)
            if name == "weight":
                self.weight = nn.Parameter(tensor, requires_grad=False)
            else:
                self.register_buffer(name, tensor)
        bias = torch.empty(out_features, dtype=self.compute_dtype) if has_bias else None
        self.bias = nn.Parameter(bias, requires_grad=False) if has_bias else None

    def dequantized(self) -> torch.Tensor:
        """The dense (out, in) weight bitsandbytes rebuilds for each matmul (shape and dtype only), and
        the float32 scales it computes beside it, freed on return."""
        scales = torch.empty(self.scales, dtype=torch.float32)  # noqa: F841 (alive while the weight is made)
        return torch.empty((self.out_features, self.in_features), dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Dequantized.apply(x.to(self.compute_dtype), self.bias, self).to(x.dtype)


class _Dequantized(torch.autograd.Function):
    """y = x @ dequantize(W).T + b, with a quantized layer's memory: the dense W lives only for its matmul."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: QuantizedStandIn) -> torch.Tensor:
        ctx.layer = layer
        if layer.keeps_input:
            ctx.input = x  # MatMul8bitFp's ctx.A: an attribute, kept until the graph is freed
        return F.linear(x, layer.dequantized(), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ ctx.layer.dequantized() if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


def stand_in_quantized_(model: nn.Module, precision: BasePrecision, keep: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Replace every linear layer that core.precision.convert_ would quantize (not those in `keep`, the
    output heads) with its QuantizedStandIn. Call under the fake mode the model was built in."""
    kept = {id(m) for module in keep for m in module.modules()}
    for path, module in list(model.named_modules()):
        weight = linear_weight(module) if id(module) not in kept else None
        if weight is not None:
            out_features, in_features = weight.shape
            model.set_submodule(path, QuantizedStandIn(out_features, in_features, module.bias is not None, precision))
    return model
