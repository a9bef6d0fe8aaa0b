"""Data sets for `lorakit train` and `lorakit eval`: example files read and tokenised per task, and split.

    ds = load_dataset("data/kjv_sample.txt", "causal-lm", tokenizer, max_length=256)
    train, evaluation = split_dataset(ds, eval_fraction=0.1, seed=0)

File formats, chosen by extension and content:
  .txt    causal-lm: paragraphs (separated by blank lines) are examples
  .jsonl  causal-lm: {"text": ...} or {"prompt": ..., "response": ...} per line (loss on the response only)
          classify:  {"text": ..., "label": ...} per line
  .csv    classify:  a header row with the columns text,label
Every problem in a file is a LoraError naming `file:line`, what is wrong and how to fix it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import LoraError, problems_error
from .batches import IGNORE_INDEX
from .records import csv_records, jsonl_records, read_lines, required_field

TASKS = ("causal-lm", "classify")
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
    lines = read_lines(path)
    if path.suffix.lower() == ".txt":
        examples = _text_examples(_paragraphs(lines), tokenizer, max_length)
    elif task == "causal-lm":
        examples = _causal_jsonl_examples(path, jsonl_records(path, lines, TEXT_EXAMPLE), tokenizer, max_length)
    else:
        is_jsonl = path.suffix.lower() == ".jsonl"
        records = jsonl_records(path, lines, TEXT_EXAMPLE) if is_jsonl else csv_records(path, lines)
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


# --- arguments -----------------------------------------------------------------------------------------
def _check_arguments(path: Path, task, max_length, label_names) -> None:
    p: list[str] = []
    if task not in TASKS:
        p.append(f"task={task!r}: must be one of {', '.join(map(repr, TASKS))}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
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


def _example_line(path: Path, task: str) -> str:
    if path.suffix.lower() == ".csv":
        return 'a header row "text,label" and then rows like "a small domestic cat,noun.animal"'
    if path.suffix.lower() == ".txt":
        return "a paragraph of text"
    return TEXT_EXAMPLE if task == "causal-lm" else CLASSIFY_EXAMPLE


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
        texts = [required_field(path, number, record, "text", TEXT_EXAMPLE) for number, record in records]
        return _text_examples(texts, tokenizer, max_length)
    examples = []
    for number, record in records:
        prompt = required_field(path, number, record, "prompt", CHAT_EXAMPLE)
        response = required_field(path, number, record, "response", CHAT_EXAMPLE)
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
    pairs = [(number, required_field(path, number, record, "text", CLASSIFY_EXAMPLE),
              required_field(path, number, record, "label", CLASSIFY_EXAMPLE, (str, int)))
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


def sample_dataset(ds: Dataset, count: int, seed: int) -> Dataset:
    """A seeded random `count` of ds's examples, kept in file order (count=0: all of them)."""
    n = len(ds.examples)
    if count > n:
        raise LoraError(f"train_examples={count}: {ds.source} has only {n} training example(s) after the held-out "
                        "split; use at most that many, or 0 for all")
    if count == 0:
        return ds
    chosen = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:count])
    return replace(ds, examples=[e for i, e in enumerate(ds.examples) if i in chosen])
