"""One adapter on one layer: `LoraAdapter` (its A, B, dropout, scale and config) and its DoRA variant
`DoraAdapter` (plus a trained magnitude per output feature) and `ResidualAdapter` (PiSSA/OLoRA: its start taken out
of the base weight). core.layers holds them, one per adapter name.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import LoraConfig
from .init import plain_factors
from .lowrank import dora_linear, dora_norm, dora_output

if TYPE_CHECKING:
    from .layers import LoraLayer

_CREATION = itertools.count()  # a process-wide clock: adapters are listed in the order they were added


class LoraAdapter(nn.Module):
    """One adapter on one layer: update(x) = scale * B(A(dropout(x))), dW = scale * B @ A.

    A: (r, fan_in, *kernel), random; B: (d_out, r / groups, *ones), zero at creation; both in the config's
    adapter_dtype (float32 by default).
    `config` is the whole adapter's LoraConfig; `scale` is the one it gives this module's path.
    """

    def __init__(self, shape_a: tuple[int, ...], shape_b: tuple[int, ...], scale: float, dropout: float,
                 config: LoraConfig, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(shape_a, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(shape_b, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale
        self.config = config
        self.created = next(_CREATION)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def dropout_p(self) -> float:
        dropout = self.dropout
        return 0.0 if isinstance(dropout, nn.Identity) else getattr(dropout, "p", 0.0)  # Identity: no failed lookup

    def fits(self, kind: type[LoraAdapter], shape_a: tuple[int, ...], shape_b: tuple[int, ...], dropout: float,
             device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this module, once its adapter is deleted, can be renewed as a `kind` adapter (LoraAdapter or
        DoraAdapter, exactly) of these shapes, dropout, device and dtype."""
        A, B = self.A, self.B
        return (type(self) is kind and A.shape == shape_a and B.shape == shape_b and self.dropout_p == dropout
                and A.device == B.device == device and A.dtype == B.dtype == dtype)

    def renew_(self, scale: float, config: LoraConfig) -> LoraAdapter:
        """This module (of a deleted adapter) as a new adapter: its scale, config and creation time set, A and B
        trainable without a gradient; the caller fills A and B. Hooks on it stay."""
        # Plain attributes: set directly, as nn.Module.__init__ sets its own (Module.__setattr__'s checks for
        # parameters, modules and buffers cost microseconds each, and a cache renews 60 modules per load)
        vars(self).update(scale=scale, config=config, created=next(_CREATION))
        for factor in self.trained():
            if not factor.requires_grad:
                factor.requires_grad_(True)
            if factor.grad is not None:
                factor.grad = None
        return self

    def trained(self) -> tuple[nn.Parameter, ...]:
        """The parameters a file holds and training updates: A and B."""
        return self.A, self.B

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the plain LoRA this adapter is on the user's base weight: its own."""
        return self.A, self.B

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer's output with this adapter, given the base's `result` on `x`."""
        update = layer.lowrank(self.dropout(x), self.A, self.B, self.scale)
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


class DoraAdapter(LoraAdapter):
    """A DoRA adapter (Liu et al., 2024): W' = m * (W0 + dW) / ||W0 + dW||, the norm per output feature.

    magnitude m: (d_out,), trained, in the adapter dtype; ||W0|| at creation, so a fresh adapter is a no-op.
    Unmerged: y = g * (x W0^T + scale * B(A(x))) + bias, g = m / ||W0 + dW|| with the norm detached.
    With adapter dropout in training, as PEFT: y = base(x) + (g - 1) * x_d W0^T + g * scale * B(A(x_d)).
    """

    def __init__(self, shape_a: tuple[int, ...], shape_b: tuple[int, ...], scale: float, dropout: float,
                 config: LoraConfig, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(shape_a, shape_b, scale, dropout, config, device, dtype)
        self.magnitude = nn.Parameter(torch.ones(shape_b[0], device=device, dtype=dtype))

    def trained(self) -> tuple[nn.Parameter, ...]:
        return self.A, self.B, self.magnitude

    def factor(self, layer: LoraLayer) -> torch.Tensor:
        """g = m / ||W0 + dW|| (d_out,), the norm computed without a gradient."""
        with torch.no_grad():
            norm = dora_norm(layer.base_norms_sq(), layer.weight_times(self.A), self.A, self.B, self.scale)
        return self.magnitude / norm

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        base, factor = layer.base_layer, self.factor(layer)
        if self.training and self.dropout_p > 0:
            x = self.dropout(x)
            dropped = base(x)  # the base path again, on the dropped input (PEFT's semantics)
            dropped = dropped if base.bias is None else dropped - base.bias
            update = layer.lowrank(x, self.A, self.B, self.scale).to(result.dtype)
            return dora_output(result, update, factor, None, dropped)
        return dora_linear(x, self.A, self.B, self.scale, result, factor, base.bias)


class ResidualAdapter(LoraAdapter):
    """An adapter whose start was taken out of the base weight (init 'pissa' or 'olora', core.init).

    A0, B0 (buffers, not saved in state dicts) are its initial A and B; while it is on a layer, the layer's base
    weight holds W_res = W0 - scale * B0 @ A0, so the output starts equal to the base model's.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("A0", None, persistent=False)
        self.register_buffer("B0", None, persistent=False)

    def keep_initial_(self) -> None:
        """Remember A and B as they are now as the initial A0, B0."""
        self.A0, self.B0 = self.A.detach().clone(), self.B.detach().clone()

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([A; A0], [B, -B0]): rank 2r, the same scale, on the original W0 (core.init.plain_factors)."""
        return plain_factors(self.A, self.B, self.A0, self.B0)
