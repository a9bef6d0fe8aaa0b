"""The causal-LM training loss without the (batch, seq, vocab) logits: head and cross-entropy fused, by chunks.

A causal LM's plain loss holds the logits, their float32 log-softmax and, in backward, their
gradient: three (B, T, vocab) tensors, the largest in a LoRA step (3 x 98 MiB for GPT-2 at 4 x 128).
Here the model runs with its (frozen, linear) output head intercepted, so it computes nothing;
the captured final hidden states (B, T, d) then go through the head and cross-entropy a few rows
at a time, and the gradient with respect to the hidden states is computed in the same pass, so
no chunk's logits outlive it and the backward pass has nothing left to do but scale. The work is
that of the plain loss (one head product forward, one back). Models whose logits are more than
head(hidden) (soft-capped, scaled) are detected and get the plain loss, as do heads that train or
are not plain linear layers (full fine-tuning; LoRA on the head).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .batches import IGNORE_INDEX

CHUNK_BYTES = 64 * 2**20  # float32 logits per chunk at most: 256+ rows of a 50k vocabulary, full-speed matmuls

_POST_PROCESSED: set[type] = set()  # model classes whose logits are not head(hidden) verbatim


def summed_causal_lm_loss(model: nn.Module, batch: dict, bf16: bool = False, verify: bool = True) -> torch.Tensor:
    """Cross-entropy summed over target tokens (labels shifted by one; IGNORE_INDEX skipped), by chunks
    where the model's logits are its output head applied to its final hidden states.

    verify=False trusts that they are without looking at values (a dry run on fake tensors).
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model  # DDP runs the model it holds
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or type(inner) in _POST_PROCESSED or not _chunkable(head):
        return _plain_loss(_logits(model, batch, bf16), batch["labels"])
    with _intercepted(head) as seen:
        logits = _logits(model, batch, bf16)  # (B, 1, vocab): the sentinel, if the head was intercepted
    if "hidden" not in seen:
        return _plain_loss(logits, batch["labels"])  # the head was not called as expected: full logits
    if not _passed_through(logits, seen, batch["input_ids"].shape, verify):
        _POST_PROCESSED.add(type(inner))  # e.g. soft-capped or scaled logits: the plain loss from now on
        return _plain_loss(_logits(model, batch, bf16), batch["labels"])
    return _chunked_loss(head, seen["hidden"], batch["labels"], logits.shape[-1], bf16)


def _chunkable(head: nn.Module) -> bool:
    """A frozen linear head: its logits are x @ W.T + b and nothing upstream of them trains."""
    return isinstance(head, nn.Linear) and not any(p.requires_grad for p in head.parameters())


def _passed_through(logits: torch.Tensor, seen: dict, batch_shape: torch.Size, verify: bool) -> bool:
    """Whether the model took the head's input at every position and returned its output untouched."""
    if "sentinel" not in seen or seen["hidden"].shape[:2] != batch_shape or logits.shape != seen["sentinel"].shape:
        return False
    return not verify or torch.equal(logits.float(), seen["sentinel"].float())


def _logits(model: nn.Module, batch: dict, bf16: bool) -> torch.Tensor:
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T): position t predicts token t + 1; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _plain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: one cross-entropy over the whole (B, T, vocab) logits (no shifted copy of them)."""
    return F.cross_entropy(logits.float().flatten(0, 1), _targets(labels).flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


@contextlib.contextmanager
def _intercepted(head: nn.Module):
    """The head's first call: its input (B, T, d) is captured as seen["hidden"], it computes nothing,
    and it returns seen["sentinel"] (B, 1, vocab), known values that the model must pass through as is."""
    seen: dict[str, torch.Tensor] = {}

    def before(module, args):
        if seen or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return None
        seen["hidden"] = args[0]
        return (args[0][:, :0], *args[1:])  # (B, 0, d): no logits are formed

    def after(module, args, output):
        if "hidden" not in seen or "sentinel" in seen or not isinstance(output, torch.Tensor):
            return None
        vocab = output.shape[-1]
        seen["sentinel"] = torch.linspace(-20, 20, vocab, device=output.device).to(output.dtype).expand(
            output.shape[0], 1, vocab)
        return seen["sentinel"]

    handles = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _chunked_loss(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, vocab: int,
                  bf16: bool) -> torch.Tensor:
    count = hidden.shape[:-1].numel()
    chunks = -(-count // max(1, CHUNK_BYTES // (4 * vocab)))  # as few as the budget allows, of equal size
    rows = -(-count // max(1, chunks))
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        need_grad = torch.is_grad_enabled() and hidden.requires_grad  # no gradient work when evaluating
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, _targets(labels), rows, need_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W.T + b, y_i) over rows of `hidden` (B, T, d), `rows` at a time, W and b frozen.

    Per chunk, in one (rows, V) float32 buffer: logits z -> p = softmax(z) in place; loss +=
    max + log(sum exp(z - max)) - z[y]; dL/dh = (p - onehot(y)) @ W, zero for ignored targets.
    dL/dh (B, T, d) is all that is kept for backward, which only scales it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, need_grad):
        flat, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, d), (N,)
        grad = torch.empty_like(flat) if need_grad else None
        total = flat.new_zeros((), dtype=torch.float32)
        for start in range(0, flat.shape[0], rows):
            chunk = slice(start, start + rows)
            total = total + _chunk_cross_entropy(flat[chunk], weight, bias, targets[chunk],
                                                 None if grad is None else grad[chunk])
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).view(ctx.shape), None, None, None, None, None


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Summed cross-entropy of (rows, d) hidden states; dL/dh written into `grad` if given. Its one
    (rows, V) buffer is freed on return, before the next chunk's is made."""
    valid = (targets != IGNORE_INDEX)[:, None]  # (rows, 1)
    target = targets.clamp(min=0)[:, None]  # ignored rows point at class 0, then are zeroed
    z = F.linear(hidden, weight, bias).float()  # (rows, V) logits
    picked, top = z.gather(1, target), z.amax(dim=1, keepdim=True)  # (rows, 1) each
    sums = z.sub_(top).exp_().sum(dim=1, keepdim=True)  # z now holds exp(z - max)
    if grad is not None:
        probs = z.div_(sums).mul_(valid)  # softmax, in place
        probs.scatter_add_(1, target, -valid.to(probs.dtype))
        grad.copy_(probs.to(weight.dtype) @ weight)  # (rows, d)
    return ((top + sums.log() - picked) * valid).sum()
