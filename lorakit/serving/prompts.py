"""Prompts files for `lorakit generate --prompts`: one JSON object per line, each naming its adapter or none.

    {"prompt": "Who made the heaven?", "adapter": "kjv"}   # "adapter": null or absent: the base model
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Collection

from ..errors import LoraError
from ..training.records import jsonl_records, read_lines, required_field

PROMPT_EXAMPLE = '{"prompt": "Who made the heaven?"}'


def load_prompts(path: str | os.PathLike, adapters: Collection[str] | None = None) -> list[dict]:
    """The records of a JSONL prompts file: {"prompt": str} per non-blank line, plus an optional
    {"adapter": str | null} naming the adapter to generate that row with; given `adapters`, a row
    naming any other adapter is an error that names its line."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"prompts={str(path)!r}: file not found")
    records = []
    for number, record in jsonl_records(path, read_lines(path), PROMPT_EXAMPLE):
        prompt = required_field(path, number, record, "prompt", PROMPT_EXAMPLE)
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
