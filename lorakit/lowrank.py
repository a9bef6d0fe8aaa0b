"""The LoRA arithmetic: scale, the update dW = scale * B @ A, and the unmerged low-rank path.

Every other module (layers, merge, export, analysis) calls these functions; nothing else
multiplies B by A.
"""
from __future__ import annotations

import math

import torch


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


def lowrank_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (x @ A.T) @ B.T without forming B @ A. x: (..., d_in) -> (..., d_out)."""
    return ((x.to(A.dtype) @ A.t()) * scale) @ B.t()


def lowrank_linear_routed(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor,
                          scale: torch.Tensor) -> torch.Tensor:
    """Each example through its own adapter in two batched matmuls (no loop over adapters).

    x: (N, ..., d_in); A: (K, r, d_in) and B: (K, d_out, r), adapters stacked (smaller ranks
    zero-padded); index: (N,) the adapter slot of each example; scale: (N,) its scale (0: none).
    Returns (N, ..., d_out) = scale_n * (x_n @ A[index_n].T) @ B[index_n].T.
    """
    n, d_in = x.shape[0], x.shape[-1]
    tokens = x.to(A.dtype).reshape(n, -1, d_in)  # (N, T, d_in)
    hidden = torch.bmm(tokens, A[index].transpose(1, 2)) * scale.to(A.dtype)[:, None, None]  # (N, T, r)
    out = torch.bmm(hidden, B[index].transpose(1, 2))  # (N, T, d_out)
    return out.reshape(*x.shape[:-1], B.shape[1])


def lowrank_embedding_routed(ids: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """Per-example adapters for an embedding: A: (K, r, num_embeddings), B: (K, dim, r); ids: (N, ...)."""
    n = ids.shape[0]
    flat = ids.reshape(n, -1)  # (N, T)
    hidden = A.transpose(1, 2)[index[:, None], flat] * scale.to(A.dtype)[:, None, None]  # (N, T, r)
    out = torch.bmm(hidden, B[index].transpose(1, 2))  # (N, T, dim)
    return out.reshape(*ids.shape, B.shape[1])
