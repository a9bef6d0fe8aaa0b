"""A tiny hand-written LoRA that the tests trust, written without looking at lorakit's layers.

Every function takes the frozen weight W (in the base layer's own layout), the adapter's A and
B (in the shapes lorakit documents) and the scale s, and returns the adapted weight or output.
"""
import torch
import torch.nn.functional as F


def update(A, B, s, groups=1):
    """s * B @ A per group, stacked block-diagonally: (out, in/g * prod(kernel)) in A's dtype."""
    out, r = B.shape[0], A.shape[0]
    blocks = [B[j * out // groups:(j + 1) * out // groups].reshape(out // groups, r // groups)
              @ A[j * r // groups:(j + 1) * r // groups].reshape(r // groups, -1) for j in range(groups)]
    return s * torch.cat(blocks)


def linear(x, W, b, A, B, s):
    return x @ (W + update(A, B, s)).T + (0 if b is None else b)


def conv1d_gpt2(x, W, b, A, B, s):  # transformers' Conv1D stores W as (in, out)
    return x @ (W + update(A, B, s).T) + b


def embedding(idx, W, A, B, s):
    return F.embedding(idx, W + update(A, B, s).T)


def conv(x, W, b, A, B, s, stride=1, padding=0, dilation=1, groups=1):
    """F.convNd with weight W + s * dW, W: (out, in/g, *kernel), dW block-diagonal per group."""
    conv_nd = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[W.dim()]
    weight = W + update(A, B, s, groups).reshape(W.shape)
    return conv_nd(x, weight, b, stride=stride, padding=padding, dilation=dilation, groups=groups)


def dora_weight(W, A, B, s, m):
    """DoRA (Liu et al., 2024, eq. 5 with sec. 4.3): W' = m * V / ||V||_c, V = W + s B A (W: (out, in)), the
    norm per output row treated as a constant (no gradient through it)."""
    V = W + update(A, B, s)
    return m[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True).detach()


def dora_linear(x, W, b, A, B, s, m):
    return x @ dora_weight(W, A, B, s, m).T + (0 if b is None else b)
