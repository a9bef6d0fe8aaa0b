"""LoRA layers: wrappers that hold a frozen base layer and any number of named low-rank adapters.

    y = base(x) + scale * B(A(dropout(x)))        (unmerged; W0 + dW is never formed)
    y = base(x) with W0 <- W0 + dW                (merged; the base path only)

A DoRA adapter (`DoraAdapter`, LoraConfig(dora=True)) adds a trained magnitude m per output feature:
W' = m * (W0 + dW) / ||W0 + dW||, applied unmerged as g * (x W0^T + scale * B(A(x))) + bias with
g = m / ||W0 + dW|| (the norm detached, as in the paper's section 4.3 and PEFT).

Each adapter on a layer is one `LoraAdapter` module (core.adapter_parts: its A, B, dropout, scale, config) held in
the layer's `adapters` ModuleDict, so adapters of different ranks coexist, train independently,
and can be stacked per example for mixed-adapter batches; a variant adds a field or a subclass
(ResidualAdapter: PiSSA/OLoRA, whose start the layer takes out of its base weight while it holds it).
Which layer types can be adapted is decided by the table `LAYER_TYPES`.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from .adapter_parts import DoraAdapter, LoraAdapter, ResidualAdapter
from .config import RESIDUAL_INITS, LoraConfig
from .init import principal_factors, residual_weight, restored_weight
from .lowrank import (delta_weight, dora_weight, lowrank_conv, lowrank_embedding, lowrank_embedding_routed,
                      lowrank_linear, lowrank_linear_routed)
from .precision import dense_weight, guard_cpu_repacking_, is_quantized


class LoraLayer(nn.Module):
    """Base class: the adapters, forward, merge and unmerge. Subclasses give the geometry."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()  # name -> LoraAdapter
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self.routing = None  # a mixed.Routing while inside lk.mixed_batch: one adapter per example
        # The exact pre-merge weight while merged: unmerge restores it bit for bit.
        self.register_buffer("base_backup", None, persistent=False)
        self._base_sq = None  # DoRA: (weight, its _version, ||W0 row||^2), recomputed when W0 changes
        guard_cpu_repacking_(base_layer)  # a quantized base stays exactly what it was quantized to
        self.train(base_layer.training)

    # --- geometry, given by subclasses -------------------------------------------------------
    groups = 1
    dora = False  # whether DoRA adapters work here (weight_times defined)
    lowrank_routed = None  # (x, A_stack, B_stack, index, scale) -> update; None: no mixed batches
    takes_dropout = True  # False where the input is not a float tensor (embedding indices)

    @classmethod
    def adapter_shapes(cls, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for an adapter of this rank on `base`."""
        raise TypeError(f"{cls.__name__} must define adapter_shapes")

    def lowrank(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """scale * B(A(x)) for this layer type, without forming B @ A."""
        raise TypeError(f"{type(self).__name__} must define lowrank")

    def weight_times(self, A: torch.Tensor) -> torch.Tensor:
        """W0 @ A.T, (d_out, r), for DoRA's norm; A: (r, fan_in)."""
        raise TypeError(f"{type(self).__name__} does not support DoRA")

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """(d_out, fan_in*k) float32 update -> the base weight's own layout."""
        return delta.reshape(self.base_layer.weight.shape)

    @staticmethod
    def as_update_matrix(weight: torch.Tensor) -> torch.Tensor:
        """A base weight in its own layout -> the (d_out, fan_in*k) matrix that B @ A adds to
        (the inverse of to_weight_layout)."""
        return weight.reshape(weight.shape[0], -1)

    # --- adapters ------------------------------------------------------------------------------
    @classmethod
    def new_adapter(cls, base: nn.Module, path: str, config: LoraConfig,
                    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                    reuse: nn.Module | None = None) -> LoraAdapter:
        """A new adapter for the module at `path`, with the rank, scale, dropout and init `config` gives
        that path; not yet attached to any layer. Fresh (a no-op: B = 0), or holding a copy of `factors`
        (A, B; e.g. read from a file) in the adapter's own dtype and device. Built in `reuse`, a deleted
        adapter's module, where it fits (LoraAdapter.fits): the same adapter, without allocating one."""
        rank = config.rank_for(path)
        shape_a, shape_b = cls.adapter_shapes(base, rank)
        dropout = config.dropout if cls.takes_dropout else 0.0
        dtype, device, scale = getattr(torch, config.adapter_dtype), base.weight.device, config.scale_for(path)
        residual = factors is None and config.init in RESIDUAL_INITS
        if residual:  # A, B from W0 itself; the layer puts the residual in the base weight when attached (put)
            assert cls in (LoraLinear, LoraConv1D), "core.inject refuses other layers for init pissa/olora"
            factors = principal_factors(cls.as_update_matrix(dense_weight(base)), rank, scale, config.init,
                                        config.init_niter)
            kind = ResidualAdapter
        else:
            kind = DoraAdapter if config.dora else LoraAdapter
        if isinstance(reuse, LoraAdapter) and reuse.fits(kind, shape_a, shape_b, dropout, device, dtype):
            adapter = reuse.renew_(scale, config)
        else:
            adapter = kind(shape_a, shape_b, scale, dropout, config, device, dtype)
        if factors is not None:  # (A, B), and a DoRA adapter's magnitude
            for param, value in zip(adapter.trained(), factors, strict=True):
                param.detach().copy_(value)  # detached: no autograd for the copy (as under no_grad)
            if residual:
                adapter.keep_initial_()  # in the adapter's dtype: W_res + scale * B0 @ A0 is W0 to float32 rounding
        else:
            with torch.no_grad():
                adapter.B.zero_()  # a reused module's B holds its old values
                # A drawn in float32 whatever the adapter's dtype: the same A, rounded
                A = adapter.A if dtype == torch.float32 else torch.empty_like(adapter.A, dtype=torch.float32)
                cls.init_A(A, config.init, rank)
                adapter.A.copy_(A)
                if config.dora:  # ||W0 + dW|| with B = 0, computed as the forward computes it: g = 1 exactly
                    adapter.magnitude.copy_(cls.row_norms_sq(base).sqrt())
        return adapter.train(base.training)  # an eval model stays eval

    @classmethod
    def row_norms_sq(cls, base: nn.Module) -> torch.Tensor:
        """||W0_i||^2 per output feature, (d_out,), in float32 (float64 for a float64 weight)."""
        weight = cls.as_update_matrix(dense_weight(base)).detach()
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        return (weight * weight).sum(1)

    def base_norms_sq(self) -> torch.Tensor:
        """row_norms_sq of this layer's base, kept while the base weight is the same tensor at the same version."""
        weight, cached = self.base_layer.weight, self._base_sq
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            with torch.no_grad():
                cached = (weight, weight._version, self.row_norms_sq(self.base_layer))
            vars(self)["_base_sq"] = cached  # a plain attribute (Module.__setattr__ is slow)
        return cached[2]

    @staticmethod
    def init_A(A: torch.Tensor, init: str, rank: int) -> None:
        """Random A (B is zero, so a fresh adapter is a no-op)."""
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / rank)
        else:  # "default": what nn.Linear does for its own weight
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    # --- the follower protocol (adapters.Follower; shared with ModuleToSave) ---------------------
    def holds(self, name: str) -> bool:
        return name in self.adapters

    def put(self, name: str, adapter: LoraAdapter) -> None:
        """Attach `adapter` as `name` (replacing any adapter of that name); a ResidualAdapter's start is taken
        out of the base weight: W0 <- W_res."""
        if isinstance(adapter, ResidualAdapter):
            self._set_base_matrix(residual_weight(self.as_update_matrix(self.original_weight), adapter.A0,
                                                  adapter.B0, adapter.scale))
        self.adapters[name] = adapter

    def drop(self, name: str) -> LoraAdapter:
        """Remove adapter `name` (its A, B, dropout, scale and config) and return it; a ResidualAdapter's start
        goes back into the base weight (W0 restored, core.init.restored_weight)."""
        adapter = self.adapters.pop(name)
        if isinstance(adapter, ResidualAdapter):
            self._set_base_matrix(self.as_update_matrix(self.user_weight_with(adapter)))
        return adapter

    @torch.no_grad()
    def _set_base_matrix(self, matrix: torch.Tensor) -> None:
        """Write a (d_out, fan_in) matrix into the (unmerged, dense) base weight, in its own layout."""
        assert self.merged_adapter is None and not is_quantized(self.base_layer)
        weight = self.base_layer.weight
        weight.copy_(self.to_weight_layout(matrix).to(weight.dtype))

    @property
    def residual(self) -> ResidualAdapter | None:
        """The adapter whose start was taken out of the base weight, if this layer holds one."""
        return next((a for a in self.adapters.values() if isinstance(a, ResidualAdapter)), None)

    @property
    def user_weight(self) -> torch.Tensor:
        """The weight the user's model had here before lorakit changed it: original_weight, with the start a
        residual-init adapter took out of it put back (to W_res's rounding: core.init.restored_weight)."""
        return self.user_weight_with(self.residual)

    def user_weight_with(self, adapter: ResidualAdapter | None) -> torch.Tensor:
        """original_weight with `adapter`'s start (if any) put back, in the base weight's layout."""
        weight = self.original_weight
        if adapter is None:
            return weight
        restored = restored_weight(self.as_update_matrix(weight), adapter.A0, adapter.B0, adapter.scale)
        return self.to_weight_layout(restored)

    @property
    def empty(self) -> bool:
        return not self.adapters

    @property
    def wrapped(self) -> nn.Module:
        return self.base_layer

    @property
    def parts(self) -> nn.ModuleDict:
        """Each adapter's own part here: its LoraAdapter."""
        return self.adapters

    def rank(self, name: str) -> int:
        return self.adapters[name].rank

    def delta_weight(self, name: str) -> torch.Tensor:
        """dW of adapter `name` in float32 (float64 for float64 factors), in the base weight's layout."""
        adapter = self.adapters[name]
        return self.to_weight_layout(delta_weight(adapter.A, adapter.B, adapter.scale, self.groups))

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged_adapter is not None:
            return result
        if self.disabled or (self.routing is None and not self.holds(self.active_adapter)):
            return self._user_base(x, result)
        if self.routing is not None:
            return self.routing.apply(self, x, result)
        return self.adapters[self.active_adapter].output(self, x, result)

    def _user_base(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The user's base layer's output: `result` (the base path), plus the start a residual-init adapter took
        out of the base weight (W_res x + scale * B0 A0 x = W0 x)."""
        adapter = self.residual
        if adapter is None:
            return result
        return result + self.lowrank(x, adapter.A0, adapter.B0, adapter.scale).to(result.dtype)

    # --- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W0 <- round(W0 + dW), dW summed in float32 and rounded once; W0 kept for unmerge."""
        assert not is_quantized(self.base_layer), "merge_ refuses quantized bases before it gets here"
        weight = self.base_layer.weight
        self.base_backup = weight.detach().clone()
        weight.copy_(self.merged_weight(name))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the exact pre-merge weight."""
        self.base_layer.weight.copy_(self.base_backup)
        self.base_backup = None
        self.merged_adapter = None

    @torch.no_grad()
    def fold(self, name: str | None) -> nn.Module:
        """The base layer with adapter `name` merged in for good (None: the user's, a residual-init adapter's
        start put back)."""
        if self.merged_adapter is not None:
            self.base_backup = None
            self.merged_adapter = None
        elif name is not None and self.holds(name):
            assert not is_quantized(self.base_layer), "unload_ refuses quantized bases before it gets here"
            self.base_layer.weight.copy_(self.merged_weight(name))
        elif self.residual is not None:
            self.base_layer.weight.copy_(self.user_weight)
        return self.base_layer

    def merged_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """round(W0 + dW): summed in float32 (float64 for a float64 weight), rounded once to `dtype`
        (default: W0's). W0 is the dequantized weight of a quantized base."""
        weight = self.original_weight
        delta = self.delta_weight(name).to(weight.device)
        acc = torch.promote_types(weight.dtype, delta.dtype)
        merged = weight.to(acc) + delta.to(acc)
        adapter = self.adapters[name]
        if isinstance(adapter, DoraAdapter):  # m * (W0 + dW) / ||W0 + dW||, per output feature
            merged = self.to_weight_layout(dora_weight(self.as_update_matrix(merged), adapter.magnitude))
        return merged.to(dtype or weight.dtype)

    def effective_delta(self, name: str) -> torch.Tensor:
        """What adapter `name` adds to W0 once merged, as the (d_out, fan_in*k) update matrix in float64:
        dW for LoRA; m * (W0 + dW) / ||W0 + dW|| - W0 for DoRA (not low-rank: it rescales W0's rows)."""
        weight = self.as_update_matrix(self.original_weight).double()
        merged = weight + self.as_update_matrix(self.delta_weight(name).to(weight.device)).double()
        adapter = self.adapters[name]
        if isinstance(adapter, DoraAdapter):
            merged = dora_weight(merged, adapter.magnitude)
        return merged - weight

    @property
    def original_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter, dense (dequantized for a quantized base)."""
        return self.base_backup if self.merged_adapter is not None else dense_weight(self.base_layer)

    def __getattr__(self, name: str):
        # Let code that reads e.g. `layer.weight` or `layer.in_features` see the base layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}, merged={self.merged_adapter!r}"


class LoraLinear(LoraLayer):
    """nn.Linear, weight (d_out, d_in): A (r, d_in), B (d_out, r)."""

    lowrank_routed = staticmethod(lowrank_linear_routed)
    dora = True

    @classmethod
    def adapter_shapes(cls, base, rank):
        return (rank, base.in_features), (base.out_features, rank)

    def lowrank(self, x, A, B, scale):
        return lowrank_linear(x, A, B, scale)

    def weight_times(self, A):
        base = self.base_layer
        if is_quantized(base):  # the base itself on A's r rows, minus its bias: never dequantized
            out = base(A)
            return (out if base.bias is None else out - base.bias).t()
        weight = base.weight
        return weight @ A.to(weight.dtype).t()

    def to_weight_layout(self, delta):
        # (d_out, d_in) from the layer, not its weight: a quantized weight is stored packed.
        return delta.reshape(self.base_layer.out_features, self.base_layer.in_features)


class LoraConv1D(LoraLayer):
    """transformers' Conv1D (GPT-2), weight stored fan-in x fan-out: dW is transposed on merge."""

    lowrank_routed = staticmethod(lowrank_linear_routed)
    dora = True

    @classmethod
    def adapter_shapes(cls, base, rank):
        d_in, d_out = base.weight.shape
        return (rank, d_in), (d_out, rank)

    def lowrank(self, x, A, B, scale):
        return lowrank_linear(x, A, B, scale)

    def weight_times(self, A):
        weight = self.base_layer.weight  # (d_in, d_out)
        return (A.to(weight.dtype) @ weight).t()

    def to_weight_layout(self, delta):
        return delta.t()

    @staticmethod
    def as_update_matrix(weight):
        return weight.t()


class LoraEmbedding(LoraLayer):
    """nn.Embedding, weight (num_embeddings, dim): A (r, num_embeddings), B (dim, r). No dropout."""

    takes_dropout = False
    lowrank_routed = staticmethod(lowrank_embedding_routed)

    @classmethod
    def adapter_shapes(cls, base, rank):
        return (rank, base.num_embeddings), (base.embedding_dim, rank)

    @staticmethod
    def init_A(A, init, rank):
        # A is a lookup table here, not a projection: unit-variance rows (gaussian: 1/r).
        nn.init.normal_(A, std=1.0 / rank if init == "gaussian" else 1.0)

    def lowrank(self, x, A, B, scale):
        return lowrank_embedding(x, A, B, scale)

    def to_weight_layout(self, delta):
        return delta.t()

    @staticmethod
    def as_update_matrix(weight):
        return weight.t()


class LoraConv(LoraLayer):
    """nn.Conv1d/2d/3d: A is a conv like the base (r out-channels), B a 1x1 conv; both grouped
    like the base, so dW is block-diagonal per group and merges exactly. rank % groups == 0."""

    @property
    def groups(self):
        return self.base_layer.groups

    @classmethod
    def adapter_shapes(cls, base, rank):
        conv = base
        ones = (1,) * len(conv.kernel_size)
        return (rank, conv.in_channels // conv.groups, *conv.kernel_size), (conv.out_channels, rank // conv.groups, *ones)

    def lowrank(self, x, A, B, scale):
        return lowrank_conv(self.base_layer, x, A, B, scale)


def _layer_types() -> dict[type, type[LoraLayer]]:
    table: dict[type, type[LoraLayer]] = {
        nn.Linear: LoraLinear,
        nn.Embedding: LoraEmbedding,
        nn.Conv1d: LoraConv,
        nn.Conv2d: LoraConv,
        nn.Conv3d: LoraConv,
    }
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain PyTorch models
        pass
    else:
        table[Conv1D] = LoraConv1D
    return table


LAYER_TYPES = _layer_types()


def layer_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA wrapper for this module's type (subclasses included), or None if unsupported."""
    for cls in type(module).__mro__:
        if cls in LAYER_TYPES:
            return LAYER_TYPES[cls]
    return None


def supported_type_names() -> str:
    return ", ".join(sorted({cls.__name__ for cls in LAYER_TYPES}))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(path, layer) for every LoRA layer in the model, in module order."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module
