"""The frozen base's precision: float32, bfloat16, float16, or quantized to int8 (LLM.int8) or nf4
(QLoRA's 4-bit NormalFloat, optionally with double-quantized block scales).

The only module that knows the quantization library. bitsandbytes was chosen by measuring (one
2048x2048 layer, 1024 tokens, forward, 2-core AVX512 CPU): bitsandbytes NF4 22 ms, bfloat16 dense
24 ms, torchao NF4 46 ms; it also runs LLM.int8 on the same CPU and CUDA, and it is what
transformers' `BitsAndBytesConfig` and PEFT build, so a base a user quantized themselves is the
same kind of layer lorakit makes. A quantized layer is frozen: adapters train beside it in float32.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..errors import LoraError, problems_error
from .config import option

BASE_DTYPES = ("float32", "bfloat16", "float16", "int8", "nf4")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes on every backend
QUANTIZE_DEVICES = ("cpu", "cuda", "xpu")  # where bitsandbytes 0.50 has int8 and nf4 kernels
INSTALL = "pip install 'bitsandbytes>=0.50' (lorakit's pyproject installs it)"


@dataclass(frozen=True)
class BasePrecision:
    """How the frozen base is stored. For int8 and nf4 the linear layers are quantized (not the output
    head, nor modules trained in full) and the rest is stored in `compute_dtype`, which the quantized
    layers also compute in."""

    base_dtype: str = option("float32", "precision of the frozen base: float types, or int8 (LLM.int8) / nf4 (QLoRA's "
                             "4-bit NormalFloat) quantized with bitsandbytes", choices=BASE_DTYPES)
    block_size: int = option(64, "nf4: weights per absmax scale", choices=BLOCK_SIZES)
    double_quant: bool = option(True, "nf4: quantize the block scales too (QLoRA's double quantization)")
    compute_dtype: str = option("bfloat16", "int8/nf4: the dtype quantized layers compute in and the rest of the "
                                "base is stored in", choices=("bfloat16", "float16", "float32"))

    def __post_init__(self) -> None:
        p = []
        if self.base_dtype not in BASE_DTYPES:
            p.append(f"base_dtype={self.base_dtype!r}: must be one of {', '.join(BASE_DTYPES)}")
        if self.block_size not in BLOCK_SIZES or isinstance(self.block_size, bool):
            p.append(f"block_size={self.block_size!r}: must be one of {', '.join(map(str, BLOCK_SIZES))}")
        if not isinstance(self.double_quant, bool):
            p.append(f"double_quant={self.double_quant!r}: must be True or False")
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            p.append(f"compute_dtype={self.compute_dtype!r}: must be bfloat16, float16 or float32")
        if p:
            raise problems_error("invalid base precision", p)

    @property
    def quantized(self) -> bool:
        return self.base_dtype in ("int8", "nf4")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of everything not quantized."""
        return FLOAT_DTYPES[self.compute_dtype if self.quantized else self.base_dtype]

    def replace(self, **changes) -> "BasePrecision":
        return dataclasses.replace(self, **changes)


def require_bitsandbytes(dtype: str):
    """The bitsandbytes module, or a LoraError naming the choices that need no library."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraError(f"base_dtype={dtype!r} needs bitsandbytes, which is not installed: {INSTALL}; "
                        f"or choose one of {', '.join(FLOAT_DTYPES)}")
    import bitsandbytes  # the optional dependency, imported only where it is asked for

    return bitsandbytes


# --- what a layer is -------------------------------------------------------------------------------------
_STAND_INS: set[type] = set()  # layer types standing in for a quantized one on fake tensors: a `kind`, `dequantized()`


def register_stand_in(cls: type) -> type:
    """Have `cls` (training.plan_quantized's planner stand-in: attribute `kind`, method `dequantized()` giving the
    dense (out, in) weight) count as quantized here, so that code reading a base's dense weight works on it."""
    _STAND_INS.add(cls)
    return cls


def quantized_kind(module: nn.Module) -> str | None:
    """'nf4' / 'fp4' / 'int8' for a bitsandbytes quantized linear layer (lorakit's or the user's), else None."""
    if type(module) in _STAND_INS:
        return module.kind
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return getattr(weight, "quant_type", "nf4")
    if kind == "Int8Params" and not getattr(weight, "has_fp16_weights", True):
        return "int8"
    return None


def is_quantized(module: nn.Module | torch.Tensor) -> bool:
    """A bitsandbytes quantized linear layer, or its quantized weight."""
    if isinstance(module, torch.Tensor):
        return _is_quantized_tensor(module)
    return quantized_kind(module) is not None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes with, as a dense (out, in) tensor: dequantized for a quantized layer
    (in its compute dtype), the weight itself otherwise."""
    kind = quantized_kind(module)
    if kind is None:
        return module.weight
    if type(module) in _STAND_INS:
        return module.dequantized()
    bnb = require_bitsandbytes(kind)
    weight = module.weight
    state = weight.quant_state if kind != "int8" else None
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit weight for its AVX512 kernel on the first CPU inference forward; read the
        # standard layout back without touching the layer (bitsandbytes' own inverse, as its state_dict does)
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(state))
        return bnb.functional.dequantize_4bit(data, state).reshape(module.out_features, module.in_features)
    if kind == "int8":
        scales = weight.SCB if weight.SCB is not None else module.state.SCB  # moved to the state by a forward
        return weight.data.float() * scales.float()[:, None] / 127
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).reshape(module.out_features,
                                                                                 module.in_features)


def precision_of(model: nn.Module) -> str:
    """The base precision a model holds: 'nf4' or 'int8' if any layer is quantized so, else the dtype
    of most of its floating-point parameters."""
    return precision_among(model.modules())


def precision_among(modules: Iterable[nn.Module]) -> str:
    """precision_of for these modules (with their own parameters; each module and parameter counted once)."""
    modules = list(dict.fromkeys(modules))
    kinds = {quantized_kind(m) for m in modules} - {None}
    if kinds:
        return "nf4" if "nf4" in kinds else sorted(kinds)[0]
    counts: dict[torch.dtype, int] = {}
    params = {id(p): p for m in modules for p in m._parameters.values() if p is not None}
    for p in params.values():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return next((name for name, d in FLOAT_DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


# --- converting a base -----------------------------------------------------------------------------------
@torch.no_grad()
def convert_(model: nn.Module, precision: BasePrecision, keep: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Store the frozen base in `precision`, layer by layer (each layer's float weight is freed as its
    converted copy takes its place, so the whole model is never held twice).

    Quantized precisions replace every nn.Linear (and transformers' Conv1D) except those in `keep`
    (output heads) and cast everything else, `keep` included, to the compute dtype; float precisions
    cast every floating-point parameter and buffer. Returns the model.
    """
    bnb = require_bitsandbytes(precision.base_dtype) if precision.quantized else None
    kept_modules = {id(m) for module in keep for m in module.modules()}
    linears = [(path, module, linear_weight(module)) for path, module in model.named_modules()
               if bnb is not None and id(module) not in kept_modules and linear_weight(module) is not None]
    devices = sorted({str(weight.device) for _, _, weight in linears if weight.device.type not in QUANTIZE_DEVICES})
    if devices:
        raise LoraError(f"base_dtype={precision.base_dtype!r}: bitsandbytes quantizes on {', '.join(QUANTIZE_DEVICES)}, "
                        f"not on {', '.join(devices)}; move the model there first (model.to('cpu')), or choose one "
                        f"of {', '.join(FLOAT_DTYPES)}")
    for path, module, weight in linears:  # each float weight is freed as its quantized layer replaces it
        model.set_submodule(path, _quantized_linear(bnb, module, weight, precision))
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() and not _is_quantized_tensor(tensor):
            tensor.data = tensor.data.to(precision.torch_dtype)
    return model


def _is_quantized_tensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ in ("Params4bit", "Int8Params")


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a linear layer lorakit quantizes: nn.Linear, or transformers' Conv1D (GPT-2),
    which stores it transposed; None for anything else."""
    if type(module) is nn.Linear:
        return module.weight.data
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return module.weight.data.t()
    return None


def _quantized_linear(bnb, linear: nn.Module, weight: torch.Tensor, precision: BasePrecision) -> nn.Module:
    """A frozen bitsandbytes layer computing what `linear` (weight (out, in)) computes, up to quantization error."""
    has_bias, device = linear.bias is not None, weight.device
    out_features, in_features = weight.shape
    # bitsandbytes quantizes int8 from float16 (its own cast); nf4 from the compute dtype, as transformers does
    weight = weight.to(torch.float16 if precision.base_dtype == "int8" else precision.torch_dtype).contiguous()
    if precision.base_dtype == "nf4":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias,
                                  compute_dtype=precision.torch_dtype, compress_statistics=precision.double_quant,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                         blocksize=precision.block_size,
                                         compress_statistics=precision.double_quant).to(device)
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data.to(precision.torch_dtype), requires_grad=False)
    guard_cpu_repacking_(layer)
    return layer.train(linear.training)


def guard_cpu_repacking_(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' 4-bit layers on CPU on their dequantize-and-matmul path. On the first CPU forward
    without grad bitsandbytes repacks a 4-bit weight for an AVX512 inference kernel and, doing so, rounds
    the block scales to bfloat16 for good (and fails outright for small layers): the base would change
    under a training run at its first evaluation, and a resumed run would differ from an uninterrupted
    one. Returns the model."""
    for module in model.modules():
        if quantized_kind(module) in ("nf4", "fp4"):
            module.support_avx512bf16_for_cpu = False
    return model


def from_pretrained_kwargs(precision: BasePrecision, keep: list[str]) -> dict:
    """Keyword arguments for transformers' `from_pretrained` that store the base in `precision` as it
    loads, tensor by tensor (bitsandbytes quantizes each linear weight as it arrives), never holding
    the whole model in float32. `keep` names modules left unquantized (output and classifier heads).

    transformers' loader quantizes with 64-weight blocks; for another block size, load in the compute
    dtype and convert_ (the base is then held once in that dtype while it converts).
    """
    if not precision.quantized:
        return {"dtype": precision.torch_dtype}
    require_bitsandbytes(precision.base_dtype)
    import transformers

    nf4 = precision.base_dtype == "nf4"
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=nf4, load_in_8bit=not nf4, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=precision.double_quant, bnb_4bit_compute_dtype=precision.torch_dtype,
        llm_int8_skip_modules=list(keep))
    return {"dtype": precision.torch_dtype, "quantization_config": config}


@torch.no_grad()
def requantize_(model: nn.Module, precision: BasePrecision, keep: tuple[str, ...] = ()) -> dict:
    """Round every linear weight of a dense model (but modules named in `keep`) to what `precision` can
    store: quantize, then dequantize in place, so the weights stay dense and load back into `precision`
    unchanged (without double quantization; with it, up to the block scales' own 8-bit rounding).
    Returns the measured cost: each layer's ||W_requantized - W|| / ||W||, mean and max."""
    bnb = require_bitsandbytes(precision.base_dtype)
    errors = []
    for path, module in list(model.named_modules()):
        weight = linear_weight(module)
        if weight is None or any(path == k or path.endswith("." + k) for k in keep):
            continue
        layer = _quantized_linear(bnb, module, weight, precision)
        rounded = dense_weight(layer).to(weight.dtype)
        errors.append(((rounded.float() - weight.float()).norm() / weight.float().norm().clamp_min(1e-30)).item())
        weight.copy_(rounded)  # `weight` is a view of the module's own (Conv1D's transposed) weight
    if not errors:
        raise LoraError("requantize: the model has no linear layer to quantize")
    return {"base_dtype": precision.base_dtype, "layers": len(errors),
            "mean_relative_error": sum(errors) / len(errors), "max_relative_error": max(errors)}


@torch.no_grad()
def to_dense_dtype_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a model that holds no quantized layer any more to `dtype`, and drop the marks transformers'
    loader left on it (its quantizer, config.quantization_config), so it saves and loads as a plain model."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    for name in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if name in vars(model):
            delattr(model, name)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return model
