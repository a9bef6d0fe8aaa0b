"""lorakit.serving.prompts: the rows of a prompts file (checked against json.loads of its lines), and every
mistake named by file:line with its fix."""
from __future__ import annotations

import json

import pytest

import lorakit as lk
from lorakit.serving.prompts import PROMPT_EXAMPLE, load_prompts
from words import jsonl, write

ROWS = [{"prompt": "Who made the heaven?", "adapter": "kjv"}, {"prompt": "In the beginning"},
        {"prompt": "line one\nline two", "adapter": None}, {"prompt": "And God said", "adapter": "psalms"}]


def test_rows_are_read_in_order_with_absent_or_null_adapters_as_none(tmp_path):
    path = write(tmp_path, "p.jsonl", "\n" + jsonl(*ROWS[:2]) + "  \n" + jsonl(*ROWS[2:]))
    reference = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    expected = [{"prompt": r["prompt"], "adapter": r.get("adapter")} for r in reference]
    assert load_prompts(path) == expected
    assert load_prompts(path, {"kjv", "psalms", "other"}) == expected


def test_with_no_adapters_given_a_row_naming_one_is_an_error_naming_its_line(tmp_path):
    path = write(tmp_path, "p.jsonl", jsonl(*ROWS))
    with pytest.raises(lk.LoraError, match=r"p\.jsonl:1: adapter 'kjv' is not among the adapters given \[\]"):
        load_prompts(path, ())
    with pytest.raises(lk.LoraError, match=r"p\.jsonl:4: adapter 'psalms' is not among .*\['kjv'\].*NAME=DIR"):
        load_prompts(path, ["kjv"])
    assert [r["adapter"] for r in load_prompts(write(tmp_path, "q.jsonl", jsonl(*ROWS[1:3])), ())] == [None, None]


BAD_PROMPTS = [  # (content, message pattern)
    ("", r"b\.jsonl: no prompts; write one object per line, e.g. \{\"prompt\""),
    ("\n \n", r"b\.jsonl: no prompts"),
    (jsonl({"prompt": "a"}, {"text": "b"}), r"b\.jsonl:2: the field 'prompt' is missing"),
    (jsonl({"prompt": 3}), r"b\.jsonl:1: the field 'prompt' is 3, not a str"),
    (jsonl({"prompt": "  "}), r"b\.jsonl:1: the field 'prompt' is empty"),
    (jsonl({"prompt": "a", "adapter": ""}), r"b\.jsonl:1: the field 'adapter' is ''; give an adapter name or null"),
    (jsonl({"prompt": "a", "adapter": 7}), r"b\.jsonl:1: the field 'adapter' is 7"),
    ('{"prompt": "a"}\n{"prompt": }\n', r"b\.jsonl:2: not valid JSON .*e\.g\. " + PROMPT_EXAMPLE.replace("?", r"\?")),
    ('"a prompt"\n', r"b\.jsonl:1: a JSON str, not an object"),
    (b'{"prompt": "caf\xe9"}\n', r"b\.jsonl:1: not valid UTF-8"),
]


@pytest.mark.parametrize("content, pattern", BAD_PROMPTS)
def test_bad_prompts_files_name_the_line_and_the_fix(tmp_path, content, pattern):
    with pytest.raises(lk.LoraError, match=pattern):
        load_prompts(write(tmp_path, "b.jsonl", content))


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(lk.LoraError, match=r"prompts='.*nothing\.jsonl': file not found"):
        load_prompts(tmp_path / "nothing.jsonl")
