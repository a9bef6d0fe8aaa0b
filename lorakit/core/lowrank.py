"""The LoRA arithmetic: scale, the update dW = scale * B @ A, and the unmerged low-rank path.

core.layers (forward, merge, fold), core.mixed (mixed-adapter batches), core.config (scale) and
analysis.measures (dW of saved adapters) call these functions; nothing else multiplies B by A.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """alpha / rank, or alpha / sqrt(rank) for rank-stabilised LoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float, groups: int = 1) -> torch.Tensor:
    """dW = scale * B @ A in float32, one block per group.

    A: (r, fan_in, *kernel) with fan_in = in_features / groups; B: (d_out, r / groups, *ones).
    Returns (d_out, fan_in * prod(kernel)) in float32 (float64 if a factor is float64); callers
    reshape it to their weight layout.
    Groups make the update block-diagonal, so a grouped convolution can be merged exactly.
    """
    rank, d_out = A.shape[0], B.shape[0]
    acc = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)  # never below float32
    a = A.to(acc).reshape(groups, rank // groups, -1)  # (g, r/g, fan_in*k)
    b = B.to(acc).reshape(groups, d_out // groups, rank // groups)  # (g, out/g, r/g)
    return (scale * torch.bmm(b, a)).reshape(d_out, -1)


def padded_to_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, fan_in) and B (d_out, r) zero-padded to `rank` >= r: (rank, fan_in) and (d_out, rank).

    The added rows of A and columns of B are zero, so B @ A, and every output, is unchanged exactly.
    Returned as they are (no copy) when r == rank.
    """
    extra = rank - A.shape[0]
    if extra == 0:
        return A, B
    return F.pad(A, (0, 0, 0, extra)), F.pad(B, (0, extra))


def lowrank_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (x @ A.T) @ B.T without forming B @ A. x: (..., d_in) -> (..., d_out).

    Computed in A's dtype (the autocast dtype under autocast). When a gradient is wanted,
    _LowRankLinear keeps only x and the small hidden x @ A.T for the backward pass.
    """
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return _LowRankLinear.apply(x, A, B, scale)
    return _lowrank_linear_forward(x, A, B, scale)[2]


def _compute_dtype(x: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else A.dtype


def _lowrank_linear_forward(x, A, B, scale):
    """(x in the compute dtype, hidden = x @ A.T (..., r), scale * hidden @ B.T)."""
    dtype = _compute_dtype(x, A)
    x = x.to(dtype)
    hidden = x @ A.to(dtype).t()
    return x, hidden, (hidden * scale) @ B.to(dtype).t()


class _LowRankLinear(torch.autograd.Function):
    """lowrank_linear with a lean backward. Saved: x (for dA) and hidden (N, r) (for dB); A and B
    are parameters, alive anyway. Only the gradients some input needs are computed.

        g_hidden = scale * (g @ B);  dx = g_hidden @ A;  dA = g_hidden.T @ x;  dB = g.T @ (scale * hidden)
    """

    @staticmethod
    def forward(ctx, x, A, B, scale):
        x_c, hidden, out = _lowrank_linear_forward(x, A, B, scale)
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        ctx.save_for_backward(x_c if need_A else None, hidden if need_B else None, A, B)
        ctx.scale, ctx.dtype, ctx.x_dtype = scale, x_c.dtype, x.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, hidden, A, B = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        g = grad.to(ctx.dtype).reshape(-1, grad.shape[-1])  # (N, d_out)
        grad_x = grad_A = grad_B = None
        if need_B:
            grad_B = (g.t() @ (hidden.reshape(-1, hidden.shape[-1]) * ctx.scale)).to(B.dtype)  # (d_out, r)
        if need_x or need_A:
            g_hidden = (g @ B.to(ctx.dtype)) * ctx.scale  # (N, r)
            if need_A:
                grad_A = (g_hidden.t() @ x.reshape(-1, x.shape[-1])).to(A.dtype)  # (r, d_in)
            if need_x:
                grad_x = (g_hidden @ A.to(ctx.dtype)).reshape(*grad.shape[:-1], A.shape[1]).to(ctx.x_dtype)
        return grad_x, grad_A, grad_B, None


def lowrank_embedding(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B(A(ids)) for an embedding: A (r, num_embeddings) is a lookup table, B (dim, r)."""
    return (F.embedding(ids, A.t()) * scale) @ B.t()


def lowrank_conv(conv: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B(A(x)) for a convolution: A a conv like `conv` (same stride, padding, dilation, groups)
    with r out-channels, B a grouped 1x1 conv up to the base's out-channels."""
    hidden = conv._conv_forward(x.to(A.dtype), A, None)
    pointwise = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(conv.kernel_size)]
    return pointwise(hidden * scale, B, groups=conv.groups)


def lowrank_linear_routed(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor,
                          scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each example through its own adapter in two batched matmuls (no loop over adapters).

    x: (N, ..., d_in); A: (K, r, d_in) and B: (K, d_out, r), adapters stacked (smaller ranks
    zero-padded); index: (N,) the adapter slot of each example; scale: (N,) its scale (0: none).
    Returns (N, ..., d_out) = scale_n * (x_n @ A[index_n].T) @ B[index_n].T, or, given `out`
    (contiguous, (N, ..., d_out), A's dtype), adds that into `out` in place and returns it.
    """
    n, d_in = x.shape[0], x.shape[-1]
    tokens = x.to(A.dtype).reshape(n, -1, d_in)  # (N, T, d_in)
    # index_select, not A[index]: advanced indexing copies these slices ~5x slower on CPU
    hidden = torch.bmm(tokens, A.index_select(0, index).transpose(1, 2)) * scale.to(A.dtype)[:, None, None]  # (N, T, r)
    return _up_projection(hidden, B.index_select(0, index), x.shape[:-1], out)


def _up_projection(hidden: torch.Tensor, B: torch.Tensor, lead: torch.Size, out: torch.Tensor | None) -> torch.Tensor:
    """hidden (N, T, r) @ B (N, d_out, r).T -> (*lead, d_out); into `out` in place when given."""
    if out is not None:  # one fused pass over the activation instead of a new tensor plus an add
        out.view(hidden.shape[0], -1, B.shape[1]).baddbmm_(hidden, B.transpose(1, 2))
        return out
    return torch.bmm(hidden, B.transpose(1, 2)).reshape(*lead, B.shape[1])  # (N, T, d_out)


def lowrank_embedding_routed(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor,
                             scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example adapters for an embedding: A: (K, r, num_embeddings), B: (K, dim, r); ids: (N, ...).
    `out` as for lowrank_linear_routed."""
    n = ids.shape[0]
    flat = ids.reshape(n, -1)  # (N, T)
    hidden = A.transpose(1, 2)[index[:, None], flat] * scale.to(A.dtype)[:, None, None]  # (N, T, r)
    return _up_projection(hidden, B.index_select(0, index), ids.shape, out)


# --- DoRA (Liu et al., 2024): W' = m * (W0 + dW) / ||W0 + dW||, the norm per output feature -----------------
def dora_norm(base_sq: torch.Tensor, cross: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              scale: float) -> torch.Tensor:
    """||W0 + scale * B @ A|| per output row, (d_out,), without forming B @ A:

        ||W0_i||^2 + 2 scale <B_i, (W0 A^T)_i> + scale^2 <B_i, (B A A^T)_i>

    base_sq: (d_out,) ||W0_i||^2, constant while W0 is; cross: (d_out, r) = W0 @ A.T. A (r, fan_in) and
    B (d_out, r) as in delta_weight (groups = 1). Summed in float32 (float64 for float64 factors); a
    rounding below zero is clamped before the square root.
    """
    acc = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    a, b = A.to(acc).reshape(A.shape[0], -1), B.to(acc).reshape(B.shape[0], -1)
    gram = a @ a.t()  # (r, r)
    sq = base_sq.to(acc) + (b * (2 * scale * cross.to(acc) + scale * scale * (b @ gram))).sum(1)
    return sq.clamp_min(0).sqrt()


def dora_weight(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m * (W0 + dW) / ||W0 + dW|| for merged = W0 + dW as the (d_out, fan_in) update matrix, in merged's dtype."""
    norm = torch.linalg.vector_norm(merged, dim=1, keepdim=True)
    return (magnitude.to(merged.dtype)[:, None] / norm) * merged


def dora_output(result: torch.Tensor, update: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor | None,
                dropped: torch.Tensor | None = None) -> torch.Tensor:
    """A DoRA layer's output from the base's (`result`, bias included) and the low-rank `update`, both
    (..., d_out); `factor` g = m / ||W0 + dW|| (the norm detached), (d_out,) or broadcastable per example.

        y = g * (result - bias + update) + bias              (= x W'^T + bias)
        y = result + (g - 1) * dropped + g * update         (adapter dropout: as PEFT, `dropped` is
                                                             x_dropped W0^T, the base path on the dropped input)
    """
    factor = factor.to(result.dtype)
    if dropped is not None:
        return result + (factor - 1) * dropped + factor * update
    if torch.is_grad_enabled() and (result.requires_grad or update.requires_grad or factor.requires_grad):
        return _DoraOutput.apply(result, update, factor, bias)
    out = result + update
    if bias is None:
        return out.mul_(factor)
    return out.sub_(bias).mul_(factor).add_(bias)


class _DoraOutput(torch.autograd.Function):
    """y = g * z + bias with z = result - bias + update, saving only z (for dg) and g:

        d result = d update = g * dy;  dg = sum(dy * z) over tokens;  d bias = sum((1 - g) * dy)
    """

    @staticmethod
    def forward(ctx, result, update, factor, bias):
        z = result + update
        if bias is not None:
            z.sub_(bias)
        ctx.save_for_backward(z if ctx.needs_input_grad[2] else None, factor)
        ctx.has_bias = bias is not None
        return z * factor if bias is None else torch.addcmul(bias, z, factor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, factor = ctx.saved_tensors
        need_result, need_update, need_factor, need_bias = ctx.needs_input_grad
        grad_z = grad * factor if need_result or need_update or need_bias else None
        grad_factor = (grad * z).sum_to_size(factor.shape) if need_factor else None
        grad_bias = (grad - grad_z).sum_to_size(grad.shape[-1:]) if ctx.has_bias and need_bias else None
        return (grad_z if need_result else None), (grad_z if need_update else None), grad_factor, grad_bias


def dora_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, result: torch.Tensor,
                factor: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A DoRA linear layer's output g * (result - bias + scale * (x @ A.T) @ B.T) + bias, the low-rank path
    included: x (..., d_in), result = the base's output (..., d_out) with its bias, factor g (d_out,).

    Rearranged so that g costs no pass over the activations beyond the one LoRA's add makes:
    y = g * result + scale * (x @ A.T) @ (g * B).T + (1 - g) * bias, the last two in one addmm.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, result, factor, bias)):
        return _DoraLinear.apply(x, A, B, scale, result, factor, bias)
    return _dora_linear_forward(x, A, B, scale, result, factor, bias)[2]


def _dora_linear_forward(x, A, B, scale, result, factor, bias):
    """(x in the compute dtype, hidden = x @ A.T (N, r), y (..., d_out) in result's dtype)."""
    dtype = _compute_dtype(x, A)
    x_c = x.to(dtype)
    hidden = x_c.reshape(-1, x.shape[-1]) @ A.to(dtype).t()  # (N, r)
    g = factor.to(dtype)
    up = (B.to(dtype) * (g * scale)[:, None]).t()  # (r, d_out): scale and g folded into B
    out = hidden @ up if bias is None else torch.addmm((1 - g) * bias.to(dtype), hidden, up)
    out = out.to(result.dtype).addcmul_(result.reshape(out.shape), factor.to(result.dtype))
    return x_c, hidden, out.reshape(result.shape)


class _DoraLinear(torch.autograd.Function):
    """dora_linear with a lean backward. Saved: x and hidden (as _LowRankLinear), the base's result (for dg).

        dY_g = g * dY -> d result, and (x's part) scale * dY_g @ B @ A;   P = dY.T @ (scale * hidden)  (d_out, r)
        dA = (scale * dY_g @ B).T @ x;   dB = g * P;   dg = sum(dY * result) + rowsum(P * B) - bias * sum(dY)
        d bias (beyond the base's own) = (1 - g) * sum(dY)
    """

    @staticmethod
    def forward(ctx, x, A, B, scale, result, factor, bias):
        x_c, hidden, out = _dora_linear_forward(x, A, B, scale, result, factor, bias)
        need_x, need_A, need_B, _, need_result, need_factor, need_bias = ctx.needs_input_grad
        ctx.save_for_backward(x_c if need_A else None, hidden if (need_B or need_factor) else None,
                              result if need_factor else None, A, B, factor, bias)
        ctx.scale, ctx.x_dtype = scale, x.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, hidden, result, A, B, factor, bias = ctx.saved_tensors
        need_x, need_A, need_B, _, need_result, need_factor, need_bias = ctx.needs_input_grad
        dtype = A.dtype if x is None else x.dtype
        g = grad.reshape(-1, grad.shape[-1])  # (N, d_out)
        f = factor.to(g.dtype)
        grad_g = g * f
        grads = dict.fromkeys(("x", "A", "B", "result", "factor", "bias"))
        if need_result:
            grads["result"] = grad_g.reshape(grad.shape)
        if need_B or need_factor:
            P = g.to(dtype).t() @ (hidden * ctx.scale)  # (d_out, r)
            if need_B:
                grads["B"] = (P * factor.to(dtype)[:, None]).to(B.dtype)
        if need_factor:
            dg = (g * result.reshape(g.shape)).sum(0).to(P.dtype) + (P * B.to(P.dtype)).sum(1)
            grads["factor"] = (dg if bias is None else dg - bias.to(dg.dtype) * g.sum(0)).to(factor.dtype)
        if need_bias:
            grads["bias"] = ((1 - f) * g.sum(0)).to(bias.dtype)
        if need_x or need_A:
            g_hidden = (grad_g.to(dtype) @ B.to(dtype)) * ctx.scale  # (N, r)
            if need_A:
                grads["A"] = (g_hidden.t() @ x.reshape(-1, x.shape[-1])).to(A.dtype)
            if need_x:
                grads["x"] = (g_hidden @ A.to(dtype)).reshape(*grad.shape[:-1], A.shape[1]).to(ctx.x_dtype)
        return grads["x"], grads["A"], grads["B"], None, grads["result"], grads["factor"], grads["bias"]
