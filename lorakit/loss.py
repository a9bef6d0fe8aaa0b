"""The causal-LM training loss without the (batch, seq, vocab) logits: head and cross-entropy by chunks.

A causal LM's plain loss holds the logits, their float32 log-softmax and, in backward, their
gradient: three (B, T, vocab) tensors, the largest in a LoRA step (3 x 98 MiB for GPT-2 at 4 x 128).
Here the model runs with its output head intercepted (it computes nothing); the captured final
hidden states (B, T, d) then go through the head and cross-entropy a few rows at a time, each
chunk recomputed in backward (activation checkpointing), so at most one chunk's logits exist at
once. Models whose logits are more than head(hidden) (soft-capped, scaled) are detected and get
the plain loss.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 16 * 2**20  # float32 logits per chunk
IGNORE = -100

_POST_PROCESSED: set[type] = set()  # model classes whose logits are not head(hidden) verbatim


def summed_causal_lm_loss(model: nn.Module, batch: dict, bf16: bool = False) -> torch.Tensor:
    """Cross-entropy summed over target tokens (labels shifted by one; -100 ignored), by chunks
    where the model's logits are its output head applied to its final hidden states."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or type(model) in _POST_PROCESSED:
        return _plain_loss(_logits(model, batch, bf16), batch["labels"])
    with _intercepted(head) as seen:
        logits = _logits(model, batch, bf16)  # (B, 1, vocab): the sentinel, if the head was intercepted
    if "hidden" not in seen or seen["hidden"].shape[:2] != batch["input_ids"].shape:
        return _plain_loss(logits, batch["labels"])  # the head was not called as expected: full logits
    if logits.shape != seen["sentinel"].shape or not torch.equal(logits.float(), seen["sentinel"].float()):
        _POST_PROCESSED.add(type(model))  # e.g. soft-capped or scaled logits: the plain loss from now on
        return _plain_loss(_logits(model, batch, bf16), batch["labels"])
    return _chunked_loss(head, seen["hidden"], batch["labels"], logits.shape[-1], bf16)


def _logits(model: nn.Module, batch: dict, bf16: bool) -> torch.Tensor:
    device = batch["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T): position t predicts token t + 1; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def _plain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: one cross-entropy over the whole (B, T, vocab) logits (no shifted copy of them)."""
    return F.cross_entropy(logits.float().flatten(0, 1), _targets(labels).flatten(), ignore_index=IGNORE,
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


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Summed cross-entropy of (rows, d) hidden states; the only (rows, vocab) logits alive."""
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = head(hidden)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _chunked_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocab: int,
                  bf16: bool) -> torch.Tensor:
    targets = _targets(labels).flatten()
    keep = targets != IGNORE
    rows, targets = hidden.flatten(0, 1)[keep], targets[keep]  # (n, d), (n,): only positions with a target
    size = max(1, CHUNK_BYTES // (4 * vocab))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], size):
        chunk = (head, rows[start:start + size], targets[start:start + size], bf16)
        if torch.is_grad_enabled():  # backward recomputes this chunk's logits instead of keeping them
            total = total + checkpoint(_chunk_loss, *chunk, use_reentrant=False)
        else:
            total = total + _chunk_loss(*chunk)
    return total
