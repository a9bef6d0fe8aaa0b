"""Batches for training and evaluation: the ignored label, padding, `collate`, and the resumable batch order.

    stream = BatchStream(len(train.examples), batch_size=8, seed=0, rank=rank, world_size=world_size)
    batch = collate([train.examples[i] for i in stream.next_indices()], padding_id(tokenizer))
"""
from __future__ import annotations

import torch

from ..errors import LoraError, problems_error

IGNORE_INDEX = -100  # the label that torch's cross-entropy (and transformers' losses) skip


def padding_id(tokenizer) -> int:
    """The id to pad input_ids with: the tokenizer's pad token, else its eos token."""
    for name in ("pad_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, int):
            return token_id
    raise LoraError("the tokenizer has neither a pad token nor an eos token; set one, "
                    "e.g. tokenizer.pad_token = tokenizer.unk_token")


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of examples, right-padded: input_ids and attention_mask (B, T); labels (B, T) or (B,)."""
    if not examples:
        raise LoraError("collate needs at least one example")
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, : len(example["input_ids"])] = 1
    if all("labels" in e for e in examples):  # causal-lm: per-token labels, no loss on padding
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, : len(example["labels"])] = torch.tensor(example["labels"], dtype=torch.long)
    elif all("label" in e for e in examples):  # classify: one class index per example
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    else:
        raise LoraError("collate: the examples mix causal-lm ('labels') and classify ('label') examples")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_count(batch: dict) -> int:
    """The terms a batch's summed loss adds up: predicted tokens (causal-lm: labels shifted by one,
    IGNORE_INDEX skipped) or examples (classify)."""
    labels = batch["labels"]
    return int(labels.numel()) if labels.dim() == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum())


class BatchStream:
    """Which examples come next: the exact data position, for resuming and for DDP.

    Epoch e visits the examples in the order torch.randperm(n, seed + e); a global batch is the
    next batch_size indices of that order, running on into the next epoch when one ends, so every
    batch is full. With world_size W, rank r takes the r-th of W contiguous equal shares of each
    global batch: W processes together see exactly what one process would. The state (epoch,
    position in the epoch's order) is the same on every rank.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        problems = _stream_problems(n_examples, batch_size, seed, rank, world_size)
        if problems:
            raise problems_error("invalid BatchStream", problems)
        self.n_examples, self.batch_size, self.seed = n_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def next_indices(self) -> list[int]:
        """This rank's share of the next global batch (batch_size // world_size example indices)."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.n_examples - self.position)
            batch += self._order[self.position : self.position + take]
            self.position += take
            if self.position == self.n_examples:  # the epoch is over: roll into the next one
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        share = self.batch_size // self.world_size
        return batch[self.rank * share : (self.rank + 1) * share]

    def state_dict(self) -> dict:
        """{"epoch", "position"}: where the next global batch starts; the same on every rank."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from state_dict); checked in full before anything changes."""
        epoch, position = (state.get(k) if isinstance(state, dict) else None for k in ("epoch", "position"))
        if not (_is_int(epoch) and _is_int(position) and epoch >= 0 and 0 <= position < self.n_examples):
            raise LoraError(f"BatchStream state {state!r}: must be {{'epoch': int >= 0, 'position': int in "
                            f"[0, {self.n_examples})}} from state_dict() of a stream over the same "
                            f"{self.n_examples} examples")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_examples, generator=generator).tolist()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stream_problems(n_examples, batch_size, seed, rank, world_size) -> list[str]:
    p: list[str] = []
    if not _is_int(n_examples) or n_examples < 1:
        p.append(f"n_examples={n_examples!r}: must be a positive integer (the training set is empty?)")
    if not _is_int(batch_size) or batch_size < 1:
        p.append(f"batch_size={batch_size!r}: must be a positive integer, e.g. 8")
    if not _is_int(seed):
        p.append(f"seed={seed!r}: must be an integer")
    if not _is_int(world_size) or world_size < 1:
        p.append(f"world_size={world_size!r}: must be a positive integer (the number of processes)")
    elif _is_int(batch_size) and batch_size % world_size:
        p.append(f"batch_size={batch_size}: must be a multiple of world_size={world_size} (the global batch "
                 f"is split evenly), e.g. batch_size={max(1, batch_size // world_size) * world_size}")
    if _is_int(world_size) and (not _is_int(rank) or not 0 <= rank < world_size):
        p.append(f"rank={rank!r}: must be an integer in [0, world_size={world_size})")
    return p
