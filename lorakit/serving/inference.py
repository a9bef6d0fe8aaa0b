"""Using a trained adapter: load a base model with the right task head and the adapter on it, and generate.

    loaded = load_for_inference("smollm2-135m", adapter="out/run/adapter")  # task from the adapter
    texts = generate(loaded.model, loaded.tokenizer, ["Who made the heaven?"], max_new_tokens=40)

An adapter trained by `lorakit train` records its task, label names and base model in its
safetensors metadata (`lorakit_task`, `lorakit_label_names`, `lorakit_base_model`), so a
classifier gets a head with the right labels before the adapter's weights go in.
"""
from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..training.batches import padding_id
from ..training.datasets import TASKS
from ..errors import LoraError
from ..core.combine import CombineConfig
from ..core.combined import combine_adapters
from ..io.adapter_files import adapter_info, load_adapter, save_adapter
from ..io.files import check_out_folder, write_folder_atomically
from ..core.merge import merge_dense_
from ..core.precision import BasePrecision, requantize_
from ..zoo import HEADS, load_task_model, load_tokenizer, model_directory

DEFAULT_TASK = "causal-lm"


@dataclass(frozen=True)
class Loaded:
    """A model ready to run (eval mode), its tokenizer, and the task and labels it was built for."""

    model: nn.Module
    tokenizer: object
    task: str
    label_names: tuple[str, ...] | None


def adapter_task(adapter: str | os.PathLike | None, task: str | None = None) -> tuple[str, tuple[str, ...] | None]:
    """(task, label names) to run: the adapter's recorded ones, checked against an explicit `task`.

    With no adapter (or one without lorakit metadata) the task is `task`, else causal-lm.
    """
    if task is not None and task not in TASKS:
        raise LoraError(f"task={task!r}: must be one of {', '.join(TASKS)}")
    info = adapter_info(adapter) if adapter is not None else {}
    saved_task, labels = info.get("task"), info.get("label_names")
    if task is not None and saved_task is not None and task != saved_task:
        raise LoraError(f"task={task!r}: the adapter in {adapter} was trained for {saved_task!r}; "
                        f"drop the task option or pass task={saved_task!r}")
    return task or saved_task or DEFAULT_TASK, tuple(labels) if labels else None


def load_for_inference(model: str | os.PathLike, adapter: str | os.PathLike | None = None,
                       task: str | None = None, label_names=None,
                       base: BasePrecision = BasePrecision()) -> Loaded:
    """Base model `model` (bundled name or directory), stored in `base` precision, with its task head
    and, if given, `adapter` loaded.

    A classifier's labels come from the adapter's metadata, else from `label_names` (e.g. a data
    file's); a head not restored from the adapter is initialised with seed 0.
    """
    task, saved_labels = adapter_task(adapter, task)
    labels = saved_labels or (tuple(label_names) if label_names else None)
    if task == "classify" and not labels:
        raise LoraError(f"task='classify' needs label names: pass label_names, or an adapter that lorakit train "
                        f"wrote (its metadata names them); adapter={None if adapter is None else str(adapter)!r}")
    tokenizer = load_tokenizer(model)
    # A lorakit classify adapter holds its head, so transformers' "head newly initialised" report misleads;
    # a head the adapter does not supply is initialised with seed 0, leaving the caller's RNG as it was.
    with _transformers_errors_only(enabled=saved_labels is not None), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = load_task_model(model, task, labels if task == "classify" else None, base)
    if adapter is not None:
        load_adapter(network, adapter)
    return Loaded(network.eval(), tokenizer, task, labels if task == "classify" else None)


@contextmanager
def _transformers_errors_only(enabled: bool = True):
    from transformers.utils import logging

    level = logging.get_verbosity()
    if enabled:
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def prompt_texts(tokenizer, prompts: list[str], chat: bool = True) -> list[str]:
    """The texts the model continues: each prompt as a user turn of the chat template, if the
    tokenizer has one and `chat` is on; else the prompts as they are."""
    if not (chat and getattr(tokenizer, "chat_template", None)):
        return list(prompts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 40,
             temperature: float = 0.0, seed: int = 0, chat: bool = True) -> list[str]:
    """One completion per prompt, generated as one left-padded batch; temperature 0 is greedy."""
    if not prompts:
        raise LoraError("prompts=[]: give at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LoraError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer, e.g. 40")
    if not temperature >= 0:
        raise LoraError(f"temperature={temperature!r}: must be >= 0 (0: greedy)")
    texts = prompt_texts(tokenizer, prompts, chat)
    templated = texts != list(prompts)  # a chat template writes its own special tokens
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # new tokens follow every prompt directly
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    output = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            max_new_tokens=max_new_tokens, pad_token_id=padding_id(tokenizer), **sampling)
    new_tokens = output[:, batch["input_ids"].shape[1]:]  # (B, <= max_new_tokens)
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def merge_to_folder(model: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                    dtype: torch.dtype = torch.float32, force: bool = False, base: BasePrecision = BasePrecision(),
                    requantize: bool = False) -> tuple[Path, dict | None]:
    """Fold `adapter` into `model` and save a plain transformers model and tokenizer in `out`: (out, report).

    The base is loaded in `base` precision (the one the adapter was trained on); each adapted weight
    becomes round(W0 + dW), W0 dequantized if quantized, summed in float32 and rounded once to `dtype`.
    With requantize=True (a quantized base only) the merged weights are re-quantized to `base` and
    saved as their exact dequantized values, and the report gives the measured error that costs.
    The folder is written beside `out` and renamed into place: `out` is never half written.
    An `out` that already holds files is replaced only with force=True.
    """
    out = _check_merge_target(out, model, adapter, force)
    if requantize and not base.quantized:
        raise LoraError(f"requantize=True: base_dtype={base.base_dtype!r} is not quantized; re-quantizing "
                        "needs --base-dtype int8 or nf4")
    loaded = load_for_inference(model, adapter, base=base)
    plain = merge_dense_(loaded.model, dtype)
    report = requantize_(plain, base, keep=HEADS) if requantize else None

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)

    write_folder_atomically(out, write, force)
    return out, report


def combine_to_folder(model: str | os.PathLike, weights: dict[str, float], out: str | os.PathLike,
                      config: CombineConfig = CombineConfig(), name: str = "combined", force: bool = False) -> Path:
    """Combine the adapter folders `weights` names (folder -> weight) on base `model` by `config` and save the
    new adapter, in PEFT's layout, as `out` (written whole or not at all; replaced only with force=True)."""
    out = check_out_folder(out, force)
    tasks = {adapter_task(folder) for folder in weights}
    if len(tasks) > 1:
        raise LoraError(f"adapters: {', '.join(map(str, weights))} were trained for different tasks or labels "
                        f"({sorted(t for t, _ in tasks)}); combine adapters of one task")
    (task, labels), = tasks
    loaded = load_for_inference(model, task=task, label_names=labels)
    names = {}
    for i, folder in enumerate(weights):
        names[f"adapter_{i}"] = weights[folder]
        load_adapter(loaded.model, folder, adapter=f"adapter_{i}")
    options = {k: v for k, v in dataclasses.asdict(config).items() if k != "method"}
    combine_adapters(loaded.model, names, config.method, name, **options)
    meta = {"lorakit_task": task, "lorakit_base_model": str(model)}
    if labels:
        meta["lorakit_label_names"] = json.dumps(list(labels))
    return write_folder_atomically(out, lambda folder: save_adapter(loaded.model, folder, name, meta), force)


def _check_merge_target(out, model, adapter, force: bool) -> Path:
    out = check_out_folder(out, force)
    sources = {model_directory(model).resolve(), Path(adapter).resolve()}
    if out.resolve() in sources:
        raise LoraError(f"out={str(out)!r} is the folder being merged from; choose another folder")
    return out
