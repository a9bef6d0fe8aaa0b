"""Line-numbered records from text files: lines, JSONL objects, CSV rows and their required fields.

Every problem is a LoraError naming `file:line`, what is wrong and how to fix it; the data sets of
`lorakit train` and the prompts of `lorakit generate` are read through here.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import LoraError


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text without its line break) for every line; bad UTF-8 names its line."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
        except UnicodeDecodeError as e:
            raise LoraError(f"{path}:{number}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            "save the file as UTF-8") from None
    return lines


def jsonl_records(path: Path, lines: list[tuple[int, str]], example: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line, which must hold one JSON object."""
    records = []
    for number, text in lines:
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoraError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                            f"one JSON object, e.g. {example}") from None
        if not isinstance(record, dict):
            raise LoraError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; each line must be "
                            f"one JSON object, e.g. {example}")
        records.append((number, record))
    return records


def csv_records(path: Path, lines: list[tuple[int, str]]) -> list[tuple[int, dict]]:
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


def required_field(path: Path, number: int, record: dict, name: str, example: str, types=(str,)) -> object:
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
