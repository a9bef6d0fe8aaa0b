"""Training data for `lorakit train`: reading example files, splitting, batching, and the resumable batch order.

    ds = load_dataset("data/kjv_sample.txt", "causal-lm", tokenizer, max_length=256)
    train, evaluation = split_dataset(ds, eval_fraction=0.1, seed=0)
    stream = BatchStream(len(train.examples), batch_size=8, seed=0, rank=rank, world_size=world_size)
    batch = collate([train.examples[i] for i in stream.next_indices()], padding_id(tokenizer))

File formats, chosen by extension and content:
  .txt    causal-lm: paragraphs (separated by blank lines) are examples
  .jsonl  causal-lm: {"text": ...} or {"prompt": ..., "response": ...} per line (loss on the response only)
          classify:  {"text": ..., "label": ...} per line
  .csv    classify:  a header row with the columns text,label
Every problem in a file is a LoraError naming `file:line`, what is wrong and how to fix it.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection

import torch

from ..errors import LoraError, problems_error

TASKS = ("causal-lm", "classify")
IGNORE_INDEX = -100  # the label that torch's cross-entropy (and transformers' losses) skip
FORMATS = {".txt": ("causal-lm",), ".jsonl": ("causal-lm", "classify"), ".csv": ("classify",)}
TEXT_EXAMPLE = '{"text": "In the beginning ..."}'
CHAT_EXAMPLE = '{"prompt": "Say hello.", "response": "Hello!"}'
CLASSIFY_EXAMPLE = '{"text": "a small domestic cat", "label": "noun.animal"}'


@dataclass(frozen=True)
class Dataset:
    """Tokenised examples of one task, ready for `collate`.

    causal-lm: {"input_ids": [...], "labels": [...]}, labels == input_ids except IGNORE_INDEX where no loss
    classify:  {"input_ids": [...], "label": class index into label_names}
    """

    task: str
    examples: list[dict]
    label_names: tuple[str, ...] | None
    source: str  # the file it came from, for messages


def load_dataset(path, task: str, tokenizer, max_length: int = 256,
                 label_names: tuple[str, ...] | list[str] | None = None) -> Dataset:
    """Read and tokenise a data file for `task` (see the module docstring for the formats)."""
    path = Path(path)
    _check_arguments(path, task, max_length, label_names)
    formats = FORMATS.get(path.suffix.lower())
    if formats is None:
        raise LoraError(f"{path}: unknown extension {path.suffix!r}; use .txt or .jsonl for causal-lm, "
                        ".jsonl or .csv for classify")
    if task not in formats:
        fix = "use .txt or .jsonl" if task == "causal-lm" else 'use .jsonl or .csv with "text" and "label"'
        raise LoraError(f"{path}: a {path.suffix} file cannot hold {task} data; {fix}")
    lines = _read_lines(path)
    if path.suffix.lower() == ".txt":
        examples = _text_examples(_paragraphs(lines), tokenizer, max_length)
    elif task == "causal-lm":
        examples = _causal_jsonl_examples(path, _jsonl_records(path, lines), tokenizer, max_length)
    else:
        records = _jsonl_records(path, lines) if path.suffix.lower() == ".jsonl" else _csv_records(path, lines)
        examples, label_names = _classify_examples(path, records, tokenizer, max_length, label_names)
    if not examples:
        raise LoraError(f"{path}: no examples (the file is empty, blank, or holds only one-token texts); "
                        f"add at least one example, e.g. {_example_line(path, task)}")
    return Dataset(task, examples, tuple(label_names) if task == "classify" else None, str(path))


def split_dataset(ds: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, eval): a seeded random eval_fraction of the examples held out, both kept in file order."""
    n = len(ds.examples)
    if not isinstance(eval_fraction, (int, float)) or isinstance(eval_fraction, bool) or not 0 <= eval_fraction < 1:
        raise LoraError(f"eval_fraction={eval_fraction!r}: must be a number in [0, 1), e.g. 0.1 (0 = no eval set)")
    n_eval = 0 if eval_fraction == 0 else max(1, round(n * eval_fraction))
    if n_eval >= n and n_eval > 0:
        raise LoraError(f"eval_fraction={eval_fraction}: {ds.source} has only {n} example(s), too few to hold "
                        "any out for eval; use eval_fraction=0 or more data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:n_eval])
    train = [e for i, e in enumerate(ds.examples) if i not in held_out]
    evaluation = [e for i, e in enumerate(ds.examples) if i in held_out]
    return replace(ds, examples=train), replace(ds, examples=evaluation)


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


# --- arguments -----------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(path: Path, task, max_length, label_names) -> None:
    p: list[str] = []
    if task not in TASKS:
        p.append(f"task={task!r}: must be one of {', '.join(map(repr, TASKS))}")
    if not _is_int(max_length) or max_length < 2:
        p.append(f"max_length={max_length!r}: must be an integer >= 2 (tokens per example), e.g. 256")
    if label_names is not None and task != "classify":
        p.append(f"label_names={label_names!r}: only for task='classify'; leave it out for {task!r}")
    elif label_names is not None and (isinstance(label_names, str) or not label_names
                                      or not all(isinstance(n, str) and n for n in label_names)
                                      or len(set(label_names)) != len(label_names)):
        p.append(f"label_names={label_names!r}: must be a non-empty sequence of distinct non-empty strings, "
                 "e.g. ('negative', 'positive')")
    if not path.is_file():
        p.append(f"path={str(path)!r}: no such file")
    if p:
        raise problems_error("invalid load_dataset arguments", p)


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


# --- prompts for generation -------------------------------------------------------------------------
PROMPT_EXAMPLE = '{"prompt": "Who made the heaven?"}'


def load_prompts(path: str | os.PathLike, adapters: Collection[str] | None = None) -> list[dict]:
    """The records of a JSONL prompts file: {"prompt": str} per non-blank line, plus an optional
    {"adapter": str | null} naming the adapter to generate that row with; given `adapters`, a row
    naming any other adapter is an error that names its line."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"prompts={str(path)!r}: file not found")
    records = []
    for number, record in _jsonl_records(path, _read_lines(path)):
        prompt = _field(path, number, record, "prompt", PROMPT_EXAMPLE)
        adapter = record.get("adapter")
        if adapter is not None and not (isinstance(adapter, str) and adapter.strip()):
            raise LoraError(f"{path}:{number}: the field 'adapter' is {adapter!r}; give an adapter name or null")
        if adapter is not None and adapters is not None and adapter not in adapters:
            raise LoraError(f"{path}:{number}: adapter {adapter!r} is not among the adapters given "
                            f"{sorted(adapters)!r}; fix the name, write null for the base model, or give its "
                            "folder with --adapter NAME=DIR")
        records.append({"prompt": prompt, "adapter": adapter})
    if not records:
        raise LoraError(f"{path}: no prompts; write one object per line, e.g. {PROMPT_EXAMPLE}")
    return records


# --- reading files -------------------------------------------------------------------------------------
def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text without its line break) for every line; bad UTF-8 names its line."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
        except UnicodeDecodeError as e:
            raise LoraError(f"{path}:{number}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            "save the file as UTF-8") from None
    return lines


def _example_line(path: Path, task: str) -> str:
    if path.suffix.lower() == ".csv":
        return 'a header row "text,label" and then rows like "a small domestic cat,noun.animal"'
    if path.suffix.lower() == ".txt":
        return "a paragraph of text"
    return TEXT_EXAMPLE if task == "causal-lm" else CLASSIFY_EXAMPLE


def _jsonl_records(path: Path, lines: list[tuple[int, str]]) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line, which must hold one JSON object."""
    records = []
    for number, text in lines:
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                            f"one JSON object, e.g. {TEXT_EXAMPLE}") from None
        if not isinstance(record, dict):
            raise LoraError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; each line must be "
                            f"one JSON object, e.g. {TEXT_EXAMPLE}")
        records.append((number, record))
    return records


def _csv_records(path: Path, lines: list[tuple[int, str]]) -> list[tuple[int, dict]]:
    """(starting line number, {"text", "label"}) for each CSV row after the text,label header."""
    if not lines:
        return []
    numbers = [number for number, _ in lines]
    reader = csv.reader(text for _, text in lines)
    try:
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in ("text", "label") if name not in header]
        if missing:
            raise LoraError(f"{path}:1: the header row {','.join(header)!r} lacks the column(s) "
                            f"{', '.join(missing)}; the first row must name the columns, e.g. text,label")
        records, start = [], reader.line_num
        for row in reader:
            number, start = numbers[start], reader.line_num  # a quoted field may span lines
            if not row:
                continue
            if len(row) != len(header):
                raise LoraError(f"{path}:{number}: {len(row)} field(s) where the header has {len(header)}; "
                                "quote a text that holds commas, e.g. \"a small, domestic cat\",noun.animal")
            records.append((number, dict(zip(header, row))))
    except csv.Error as e:
        raise LoraError(f"{path}:{numbers[reader.line_num - 1]}: bad CSV ({e}); check the quoting") from None
    return records


def _field(path: Path, number: int, record: dict, name: str, example: str, types=(str,)) -> object:
    """record[name], which must exist, be of `types`, and (for text) not be blank."""
    if name not in record:
        raise LoraError(f"{path}:{number}: the field {name!r} is missing; each line needs it, e.g. {example}")
    value = record[name]
    if not isinstance(value, types) or isinstance(value, bool):
        wanted = " or ".join(t.__name__ for t in types)
        raise LoraError(f"{path}:{number}: the field {name!r} is {value!r}, not a {wanted}; e.g. {example}")
    if isinstance(value, str) and not value.strip():
        raise LoraError(f"{path}:{number}: the field {name!r} is empty; give it some text or drop the line")
    return value


# --- causal-lm -------------------------------------------------------------------------------------------
def _paragraphs(lines: list[tuple[int, str]]) -> list[str]:
    """The text's paragraphs: runs of non-blank lines, joined by newlines."""
    paragraphs, current = [], []
    for _, text in lines + [(0, "")]:
        if text.strip():
            current.append(text)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return paragraphs


def _ids(tokenizer, text: str, special_tokens: bool) -> list[int]:
    """The token ids of text, untruncated (verbose=False: no warning past the model's max length)."""
    return list(tokenizer(text, add_special_tokens=special_tokens, verbose=False)["input_ids"])


def _text_examples(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """Each text tokenised and cut into consecutive chunks of max_length; loss on every token."""
    examples = []
    for text in texts:
        ids = _ids(tokenizer, text, special_tokens=True)
        for start in range(0, len(ids), max_length):
            chunk = ids[start : start + max_length]
            if len(chunk) >= 2:  # a lone token has nothing to predict (the model shifts labels)
                examples.append({"input_ids": chunk, "labels": list(chunk)})
    return examples


def _causal_jsonl_examples(path: Path, records: list[tuple[int, dict]], tokenizer, max_length: int) -> list[dict]:
    """{"text"} records as plain text, or {"prompt", "response"} records with loss on the response only."""
    kinds = [(number, _record_kind(path, number, record)) for number, record in records]
    for number, kind in kinds:
        if kind != kinds[0][1]:
            raise LoraError(f"{path}:{number}: a {kind} record in a file whose first record (line {kinds[0][0]}) "
                            f"is {kinds[0][1]}; use one kind per file: every line {TEXT_EXAMPLE} or every "
                            f"line {CHAT_EXAMPLE}")
    if not records or kinds[0][1] == "text":
        texts = [_field(path, number, record, "text", TEXT_EXAMPLE) for number, record in records]
        return _text_examples(texts, tokenizer, max_length)
    examples = []
    for number, record in records:
        prompt = _field(path, number, record, "prompt", CHAT_EXAMPLE)
        response = _field(path, number, record, "response", CHAT_EXAMPLE)
        prompt_ids, response_ids = _prompt_response_ids(tokenizer, prompt, response)
        if not response_ids:
            raise LoraError(f"{path}:{number}: the response {response!r} has no tokens and the tokenizer no "
                            "eos token, so there is nothing to learn; give a longer response")
        prompt_ids, response_ids = _truncate(prompt_ids, response_ids, max_length)
        examples.append({"input_ids": prompt_ids + response_ids,
                         "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids})
    return examples


def _record_kind(path: Path, number: int, record: dict) -> str:
    """'text' or 'prompt/response': which causal-lm format a JSONL record is in."""
    has_text, has_chat = "text" in record, "prompt" in record or "response" in record
    if has_text == has_chat:
        found = "both" if has_text else "neither"
        raise LoraError(f"{path}:{number}: a causal-lm record needs a 'text' field or 'prompt' and 'response' "
                        f"fields, and this one has {found} (keys {sorted(record)}); e.g. {TEXT_EXAMPLE} or "
                        f"{CHAT_EXAMPLE}")
    return "text" if has_text else "prompt/response"


def _prompt_response_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """The token ids of the prompt part (no loss) and of the response part (loss)."""
    eos = [tokenizer.eos_token_id] if isinstance(getattr(tokenizer, "eos_token_id", None), int) else []
    if not getattr(tokenizer, "chat_template", None):
        prompt_ids = _ids(tokenizer, prompt + "\n", special_tokens=True)
        return prompt_ids, _ids(tokenizer, response, special_tokens=False) + eos
    user = {"role": "user", "content": prompt}
    prompt_ids = _chat_ids(tokenizer, [user], add_generation_prompt=True)
    full_ids = _chat_ids(tokenizer, [user, {"role": "assistant", "content": response}], add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids) :]
    # The template renders the prompt differently once a reply follows: tokenise the reply alone.
    return prompt_ids, _ids(tokenizer, response, special_tokens=False) + eos


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids if isinstance(ids, list) else ids["input_ids"])  # transformers 5 returns a BatchEncoding


def _truncate(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """At most max_length tokens, keeping at least one response token: cut the response's end first,
    then the prompt's start (the end of the prompt, next to the response, matters most)."""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    kept_prompt = prompt_ids[-(max_length - 1) :] if len(prompt_ids) >= max_length else prompt_ids
    return kept_prompt, response_ids[: max_length - len(kept_prompt)]


# --- classify ----------------------------------------------------------------------------------------------
def _classify_examples(path: Path, records: list[tuple[int, dict]], tokenizer, max_length: int,
                       label_names) -> tuple[list[dict], tuple[str, ...]]:
    """{"input_ids", "label": class index} per record, and the label names the indices refer to."""
    pairs = [(number, _field(path, number, record, "text", CLASSIFY_EXAMPLE),
              _field(path, number, record, "label", CLASSIFY_EXAMPLE, (str, int)))
             for number, record in records]
    if label_names is None:
        labels = {label for _, _, label in pairs}
        numeric = all(isinstance(label, int) for label in labels)  # 2 before 10, not after
        label_names = tuple(str(label) for label in sorted(labels, key=int if numeric else str))
    index = {name: i for i, name in enumerate(label_names)}
    examples = []
    for number, text, label in pairs:
        if str(label) not in index:
            raise LoraError(f"{path}:{number}: label {label!r} is not one of the label names "
                            f"{', '.join(label_names)}; fix the label or add it to label_names")
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        examples.append({"input_ids": ids, "label": index[str(label)]})
    return examples, tuple(label_names)
