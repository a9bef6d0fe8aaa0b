"""lorakit.training.batches: padding and collate (checked against the tokenizer's own padding), the
loss-term count, and the resumable, DDP-sharded batch order (checked against the permutations laid end to end)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

import lorakit as lk
from lorakit.training.batches import IGNORE_INDEX, BatchStream, collate, padding_id, target_count
from lorakit.training.datasets import load_dataset
from words import CLASSIFY, jsonl, word_tokenizer, write


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


# --- collate, padding ---------------------------------------------------------------------------------------------
def test_collate_right_pads_causal_lm_with_no_loss_on_padding():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_classify_gives_one_label_per_example(tmp_path, tokenizer):
    path = write(tmp_path, "c.jsonl", jsonl(*({"text": t, "label": l} for t, l in CLASSIFY)))
    ds = load_dataset(path, "classify", tokenizer)
    batch = collate(ds.examples, padding_id(tokenizer))
    reference = tokenizer([t for t, _ in CLASSIFY], padding=True, return_tensors="pt")  # right-padded by default
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert batch["labels"].tolist() == [0, 1, 0, 1] and batch["labels"].dtype == torch.long


def test_ignore_index_is_the_label_torch_cross_entropy_skips():
    logits, labels = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 4, 5])
    masked = labels.clone()
    masked[[1, 3]] = IGNORE_INDEX
    kept = torch.tensor([0, 2, 4])
    torch.testing.assert_close(F.cross_entropy(logits, masked, reduction="sum"),
                               F.cross_entropy(logits[kept], labels[kept], reduction="sum"))


def test_target_count_is_the_number_of_terms_cross_entropy_averages_over():
    causal = collate([{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
                      {"input_ids": [8, 9], "labels": [8, 9]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0))
    shifted_logits, shifted_labels = logits[:, :-1].flatten(0, 1), causal["labels"][:, 1:].flatten()
    terms = F.cross_entropy(shifted_logits, shifted_labels, reduction="sum") / F.cross_entropy(
        shifted_logits, shifted_labels)  # reference: sum / mean
    assert target_count(causal) == round(terms.item()) == 3
    classify = collate([{"input_ids": [5, 6], "label": 1}, {"input_ids": [7], "label": 0}], pad_id=0)
    assert target_count(classify) == 2


def test_collate_rejects_empty_and_mixed_batches():
    with pytest.raises(lk.LoraError, match="at least one example"):
        collate([], 0)
    with pytest.raises(lk.LoraError, match="mix causal-lm"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "label": 0}], 0)


def test_padding_id_falls_back_to_eos(tokenizer):
    assert padding_id(tokenizer) == tokenizer.pad_token_id == 0
    assert padding_id(word_tokenizer(pad=False)) == 3
    no_tokens = type("NoSpecialTokens", (), {"pad_token_id": None, "eos_token_id": None})()
    with pytest.raises(lk.LoraError, match="neither a pad token nor an eos token"):
        padding_id(no_tokens)


# --- BatchStream -------------------------------------------------------------------------------------------------
def reference_batches(n: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The epochs' permutations laid end to end, cut into batches."""
    order: list[int] = []
    for epoch in range(steps * batch_size // n + 1):
        order += torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


@pytest.mark.parametrize("n, batch_size", [(10, 4), (12, 4), (3, 8)])
def test_batches_follow_seeded_epoch_permutations_across_epoch_ends(n, batch_size):
    stream = BatchStream(n, batch_size, seed=7)
    assert [stream.next_indices() for _ in range(9)] == reference_batches(n, batch_size, seed=7, steps=9)
    assert stream.state_dict() == {"epoch": 9 * batch_size // n, "position": 9 * batch_size % n}


def test_world_size_ranks_together_see_the_single_process_batches():
    single = BatchStream(10, 6, seed=1)
    ranks = [BatchStream(10, 6, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(7):
        shares = [stream.next_indices() for stream in ranks]
        assert [len(s) for s in shares] == [2, 2, 2]
        assert sum(shares, []) == single.next_indices()
    assert all(stream.state_dict() == single.state_dict() for stream in ranks)


def test_a_resumed_stream_continues_exactly(tmp_path):
    stream = BatchStream(10, 4, seed=2)
    for _ in range(3):
        stream.next_indices()
    (tmp_path / "state.json").write_text(json.dumps(stream.state_dict()))
    resumed = BatchStream(10, 4, seed=2)
    resumed.load_state_dict(json.loads((tmp_path / "state.json").read_text()))
    assert [resumed.next_indices() for _ in range(5)] == [stream.next_indices() for _ in range(5)]
    assert BatchStream(10, 4, seed=2).next_indices() != resumed.next_indices()  # not a restart from scratch


def test_batch_stream_rejects_bad_arguments_and_states():
    with pytest.raises(lk.LoraError, match=r"batch_size=6: must be a multiple of world_size=4"):
        BatchStream(10, 6, seed=0, rank=0, world_size=4)
    with pytest.raises(lk.LoraError, match=r"(?s)n_examples=0.*rank=2: must be an integer in \[0, world_size=2\)"):
        BatchStream(0, 4, seed=0, rank=2, world_size=2)
    stream = BatchStream(10, 4, seed=0)
    for bad in ({"epoch": 0, "position": 10}, {"epoch": -1, "position": 0}, {"epoch": 0}, {"epoch": 1.0, "position": 0}):
        with pytest.raises(lk.LoraError, match=r"BatchStream state .* from state_dict\(\) of a stream over the same 10"):
            stream.load_state_dict(bad)
    assert stream.state_dict() == {"epoch": 0, "position": 0}


