"""lorakit.training.datasets: file formats, loss masks, error messages (file:line) and splits.

The fast tests use a tiny word-level tokenizer (tests/words.py, no model); the reference for every
tokenisation is the tokenizer itself, called directly on the text the module should have used.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import lorakit as lk
from lorakit.training.batches import IGNORE_INDEX
from lorakit.training.datasets import TASKS, Dataset, load_dataset, split_dataset
from lorakit.zoo import cache_root, load_bundled
from words import CLASSIFY, SHIFTY_CHAT, WORDS, ids, jsonl, word_tokenizer, write

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


# --- causal-lm: plain text and {"text"} ---------------------------------------------------------------------
def test_txt_paragraphs_are_examples_with_loss_on_every_token(tmp_path, tokenizer):
    path = write(tmp_path, "t.txt", "the cat sat\non the mat\n\n  \n\nhello there\n\n\nhow are you\n")
    ds = load_dataset(path, "causal-lm", tokenizer)
    paragraphs = ["the cat sat\non the mat", "hello there", "how are you"]
    examples = [{"input_ids": ids(tokenizer, p), "labels": ids(tokenizer, p)} for p in paragraphs]
    assert ds == Dataset("causal-lm", examples, None, str(path))


def test_long_text_is_cut_into_consecutive_chunks_of_max_length(tmp_path, tokenizer):
    text = " ".join(WORDS * 3)  # 54 words + <s> = 55 tokens
    ds = load_dataset(write(tmp_path, "t.txt", text), "causal-lm", tokenizer, max_length=16)
    chunks = [e["input_ids"] for e in ds.examples]
    assert [len(c) for c in chunks] == [16, 16, 16, 7]
    assert sum(chunks, []) == ids(tokenizer, text)
    assert all(e["labels"] == e["input_ids"] for e in ds.examples)


def test_a_one_token_tail_chunk_is_dropped_as_it_has_nothing_to_predict(tmp_path, tokenizer):
    text = " ".join(WORDS[:8])  # <s> + 8 words = 9 tokens
    ds = load_dataset(write(tmp_path, "t.txt", text), "causal-lm", tokenizer, max_length=8)
    assert [e["input_ids"] for e in ds.examples] == [ids(tokenizer, text)[:8]]


def test_jsonl_text_records_load_like_paragraphs(tmp_path, tokenizer):
    paragraphs = ["the cat sat\non the mat", "hello there", "how are you"]
    from_txt = load_dataset(write(tmp_path, "t.txt", "\n\n".join(paragraphs)), "causal-lm", tokenizer, max_length=4)
    from_jsonl = load_dataset(write(tmp_path, "t.jsonl", jsonl(*({"text": p} for p in paragraphs)) + "\n"),
                              "causal-lm", tokenizer, max_length=4)
    assert from_jsonl.examples == from_txt.examples and len(from_txt.examples) == 4  # 7 tokens -> 4 + 3


def test_the_kjv_sample_loads_as_causal_lm():
    lines = (DATA / "kjv_sample.txt").read_text().splitlines()
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ds = load_dataset(DATA / "kjv_sample.txt", "causal-lm", tokenizer, max_length=256)
    everything = ids(tokenizer, "\n".join(lines))  # no blank lines: the whole file is one paragraph
    assert len(ds.examples) == -(-len(everything) // 256) > 10
    assert sum((e["input_ids"] for e in ds.examples), []) == everything
    assert tokenizer.unk_token_id not in everything


# --- causal-lm: {"prompt", "response"} --------------------------------------------------------------------------
def chat_dataset(tmp_path, tokenizer, prompt="say hello", response="hello there", max_length=256) -> dict:
    path = write(tmp_path, "chat.jsonl", jsonl({"prompt": prompt, "response": response}))
    [example] = load_dataset(path, "causal-lm", tokenizer, max_length=max_length).examples
    return example


def test_chat_template_masks_the_prompt_and_the_generation_prompt(tmp_path, tokenizer):
    example = chat_dataset(tmp_path, tokenizer)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello there"}])["input_ids"]
    assert example["input_ids"] == full
    assert example["labels"] == [IGNORE_INDEX] * 5 + ids(tokenizer, "hello there </s>", special=False)
    assert tokenizer.decode(example["input_ids"][:5]) == "<|user|> say hello </s> <|assistant|>"


def test_a_template_whose_prompt_is_no_prefix_falls_back_to_prompt_then_response(tmp_path):
    tokenizer = word_tokenizer(chat_template=SHIFTY_CHAT)
    example = chat_dataset(tmp_path, tokenizer)
    prompt = ids(tokenizer, "<|last|> <|last|> say hello </s> <|assistant|>", special=False)
    response = ids(tokenizer, "hello there", special=False) + [tokenizer.eos_token_id]
    assert example == {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def test_without_a_chat_template_the_prompt_is_followed_by_a_newline_and_the_response_by_eos(tmp_path):
    tokenizer = word_tokenizer(chat_template=None)
    example = chat_dataset(tmp_path, tokenizer, prompt="how are you", response="fine thanks")
    prompt, response = ids(tokenizer, "how are you\n"), ids(tokenizer, "fine thanks", special=False) + [3]
    assert example == {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def test_a_response_with_no_tokens_and_no_eos_is_an_error(tmp_path):
    tokenizer = word_tokenizer(chat_template=None)
    tokenizer.eos_token = None
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("~", "")  # "~" tokenises to nothing
    with pytest.raises(lk.LoraError, match=r"chat\.jsonl:1: the response '~~' has no tokens"):
        chat_dataset(tmp_path, tokenizer, response="~~")


def test_truncation_cuts_the_response_end_first(tmp_path, tokenizer):
    response = "the big red dog sat on the mat"
    example = chat_dataset(tmp_path, tokenizer, response=response, max_length=8)
    assert example["input_ids"] == chat_dataset(tmp_path, tokenizer, response=response)["input_ids"][:8]
    assert example["labels"] == [IGNORE_INDEX] * 5 + ids(tokenizer, "the big red", special=False)


def test_truncation_keeps_the_prompt_end_and_one_response_token(tmp_path, tokenizer):
    example = chat_dataset(tmp_path, tokenizer, prompt="the big red dog sat on the mat", max_length=6)
    assert example["input_ids"] == ids(tokenizer, "on the mat </s> <|assistant|> hello", special=False)
    assert example["labels"] == [IGNORE_INDEX] * 5 + ids(tokenizer, "hello", special=False)


# --- classify ------------------------------------------------------------------------------------------------------
def test_classify_jsonl_and_csv_agree_and_label_names_are_sorted(tmp_path, tokenizer):
    from_jsonl = load_dataset(write(tmp_path, "c.jsonl", jsonl(*({"text": t, "label": l} for t, l in CLASSIFY))),
                              "classify", tokenizer)
    rows = "".join(f"{t},{l}\n" for t, l in CLASSIFY)
    from_csv = load_dataset(write(tmp_path, "c.csv", "text,label\n" + rows), "classify", tokenizer)
    expected = [{"input_ids": ids(tokenizer, t), "label": ["pet", "thing"].index(l)} for t, l in CLASSIFY]
    assert from_jsonl.examples == from_csv.examples == expected
    assert from_jsonl.label_names == from_csv.label_names == ("pet", "thing")


def test_given_label_names_fix_the_class_indices(tmp_path, tokenizer):
    path = write(tmp_path, "c.jsonl", jsonl(*({"text": t, "label": l} for t, l in CLASSIFY)))
    ds = load_dataset(path, "classify", tokenizer, label_names=["thing", "pet", "other"])
    assert [e["label"] for e in ds.examples] == [1, 0, 1, 0] and ds.label_names == ("thing", "pet", "other")


def test_integer_labels_sort_as_numbers(tmp_path, tokenizer):
    path = write(tmp_path, "c.jsonl", jsonl(*({"text": "the cat", "label": n} for n in (10, 2, 1, 2))))
    ds = load_dataset(path, "classify", tokenizer)
    assert ds.label_names == ("1", "2", "10") and [e["label"] for e in ds.examples] == [2, 1, 0, 1]


def test_classify_texts_are_truncated_to_max_length(tmp_path, tokenizer):
    ds = load_dataset(write(tmp_path, "c.jsonl", jsonl({"text": " ".join(WORDS), "label": "x"})), "classify",
                      tokenizer, max_length=5)
    assert ds.examples[0]["input_ids"] == ids(tokenizer, " ".join(WORDS))[:5]


def test_csv_quoted_fields_may_hold_commas_quotes_and_newlines(tmp_path, tokenizer):
    path = write(tmp_path, "c.csv", 'label,id,text\npet,1,"the cat, the dog"\nthing,2,"a ""red""\nmat"\n')
    ds = load_dataset(path, "classify", tokenizer)
    assert ds.examples == [{"input_ids": ids(tokenizer, "the cat, the dog"), "label": 0},
                           {"input_ids": ids(tokenizer, 'a "red"\nmat'), "label": 1}]


def test_the_wordnet_sample_is_a_balanced_six_class_task(tokenizer):
    path = DATA / "wordnet_supersenses.jsonl"
    ds = load_dataset(path, "classify", tokenizer, max_length=64)
    assert ds.label_names == ("noun.animal", "noun.artifact", "noun.food", "noun.person", "noun.plant", "verb.motion")
    assert sorted(e["label"] for e in ds.examples) == sorted(list(range(6)) * 300)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(set(texts)) == len(texts) and path.stat().st_size < 300_000


# --- bad data ------------------------------------------------------------------------------------------------------
BAD_FILES = [  # (file name, content, task, message pattern)
    ("e.jsonl", "", "classify", r"e\.jsonl: no examples .*add at least one example"),
    ("e.txt", "\n  \n\n", "causal-lm", r"e\.txt: no examples"),
    ("e.csv", "text,label\n\n", "classify", r"e\.csv: no examples"),
    ("m.jsonl", jsonl({"text": "a", "label": "x"}, {"txt": "b", "label": "x"}), "classify",
     r"m\.jsonl:2: the field 'text' is missing"),
    ("m.jsonl", jsonl({"prompt": "a", "response": "b"}, {"prompt": "c"}), "causal-lm",
     r"m\.jsonl:2: the field 'response' is missing; each line needs it, e.g. \{\"prompt\""),
    ("w.jsonl", jsonl({"text": "a", "label": "x"}, {"text": "b", "label": 1.5}), "classify",
     r"w\.jsonl:2: the field 'label' is 1\.5, not a str or int"),
    ("w.jsonl", jsonl({"text": ["a"]}), "causal-lm", r"w\.jsonl:1: the field 'text' is \['a'\], not a str"),
    ("w.jsonl", jsonl({"text": "a", "label": True}), "classify", r"w\.jsonl:1: the field 'label' is True"),
    ("w.jsonl", jsonl({"text": " ", "label": "x"}), "classify", r"w\.jsonl:1: the field 'text' is empty"),
    ("u.jsonl", b'{"text": "a"}\n\n{"text": "caf\xe9"}\n', "causal-lm", r"u\.jsonl:3: not valid UTF-8 .*save the file as UTF-8"),
    ("u.txt", b"hello\n\xff\n", "causal-lm", r"u\.txt:2: not valid UTF-8 \(byte 0xff at column 1\)"),
    ("j.jsonl", '{"text": "a"}\n{"text": "b",}\n', "causal-lm", r"j\.jsonl:2: not valid JSON .*one JSON object"),
    ("j.jsonl", '["a", "b"]\n', "causal-lm", r"j\.jsonl:1: a JSON list, not an object"),
    ("x.json", '{"text": "a"}\n', "causal-lm", r"x\.json: unknown extension '\.json'; use \.txt or \.jsonl"),
    ("x.txt", "the cat\n", "classify", r"x\.txt: a \.txt file cannot hold classify data; use \.jsonl or \.csv"),
    ("x.csv", "text,label\na,b\n", "causal-lm", r"x\.csv: a \.csv file cannot hold causal-lm data"),
    ("mix.jsonl", jsonl({"text": "a"}, {"text": "b"}, {"prompt": "c", "response": "d"}), "causal-lm",
     r"mix\.jsonl:3: a prompt/response record in a file whose first record \(line 1\) is text; use one kind"),
    ("mix.jsonl", jsonl({"prompt": "c", "response": "d"}, {"text": "b"}), "causal-lm",
     r"mix\.jsonl:2: a text record in a file whose first record \(line 1\) is prompt/response"),
    ("both.jsonl", jsonl({"text": "a", "prompt": "c", "response": "d"}), "causal-lm", r"both\.jsonl:1: .* has both"),
    ("none.jsonl", jsonl({"body": "a"}), "causal-lm", r"none\.jsonl:1: a causal-lm record needs a 'text' field"),
    ("h.csv", "sentence,label\na,b\n", "classify", r"h\.csv:1: the header row 'sentence,label' lacks the column\(s\) text"),
    ("n.csv", 'text,label\n"a\nb",x\n"c\nd",x,extra\n', "classify", r"n\.csv:4: 3 field\(s\) where the header has 2"),
]


@pytest.mark.parametrize("name, content, task, pattern", BAD_FILES)
def test_bad_data_names_the_file_line_and_fix(tmp_path, tokenizer, name, content, task, pattern):
    with pytest.raises(lk.LoraError, match=pattern):
        load_dataset(write(tmp_path, name, content), task, tokenizer)


def test_an_unknown_label_is_an_error_when_label_names_are_given(tmp_path, tokenizer):
    path = write(tmp_path, "c.csv", "text,label\nthe cat,pet\na mat,thing\n")
    with pytest.raises(lk.LoraError, match=r"c\.csv:3: label 'thing' is not one of the label names pet, dog; fix"):
        load_dataset(path, "classify", tokenizer, label_names=("pet", "dog"))


def test_bad_arguments_are_reported_together(tmp_path, tokenizer):
    with pytest.raises(lk.LoraError, match=r"(?s)4 problem.*task='lm'.*max_length=1.*label_names=.*path=.*no such file"):
        load_dataset(tmp_path / "missing.jsonl", "lm", tokenizer, max_length=1, label_names=["a"])
    with pytest.raises(lk.LoraError, match=r"label_names=\['a'\]: only for task='classify'"):
        load_dataset(write(tmp_path, "t.txt", "the cat"), "causal-lm", tokenizer, label_names=["a"])
    with pytest.raises(lk.LoraError, match=r"label_names=\['a', 'a'\]: must be a non-empty sequence of distinct"):
        load_dataset(write(tmp_path, "c.csv", "text,label\nthe cat,a\n"), "classify", tokenizer, label_names=["a", "a"])
    assert TASKS == ("causal-lm", "classify")


# --- split ------------------------------------------------------------------------------------------------------
def numbered(n: int) -> Dataset:
    return Dataset("classify", [{"input_ids": [i], "label": i % 2} for i in range(n)], ("a", "b"), "numbers")


def test_split_is_seeded_disjoint_complete_and_keeps_file_order():
    ds = numbered(50)
    train, evaluation = split_dataset(ds, 0.2, seed=3)
    assert (len(train.examples), len(evaluation.examples)) == (40, 10)
    keys = lambda d: [e["input_ids"][0] for e in d.examples]  # noqa: E731
    assert sorted(keys(train) + keys(evaluation)) == list(range(50))
    assert keys(train) == sorted(keys(train)) and keys(evaluation) == sorted(keys(evaluation))
    assert split_dataset(ds, 0.2, seed=3) == (train, evaluation)
    assert keys(split_dataset(ds, 0.2, seed=4)[1]) != keys(evaluation)
    assert (train.task, train.label_names, train.source) == (ds.task, ds.label_names, ds.source)


def test_split_with_zero_fraction_holds_nothing_out_and_never_empties_train():
    train, evaluation = split_dataset(numbered(5), 0, seed=0)
    assert train == numbered(5) and evaluation.examples == []
    assert len(split_dataset(numbered(5), 0.01, seed=0)[1].examples) == 1  # a positive fraction holds out >= 1
    with pytest.raises(lk.LoraError, match=r"eval_fraction=1: must be a number in \[0, 1\)"):
        split_dataset(numbered(5), 1, seed=0)
    with pytest.raises(lk.LoraError, match=r"has only 1 example\(s\), too few"):
        split_dataset(numbered(1), 0.5, seed=0)


# --- a real chat template ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_chat_template_masks_everything_but_the_reply(tmp_path):
    cache = cache_root() / "smollm2-135m"
    if not (cache / "tokenizer.json").is_file():
        load_bundled("smollm2-135m")  # builds the cache, tokenizer included
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    path = write(tmp_path, "chat.jsonl", jsonl({"prompt": "Name a fruit.", "response": "A pear."}))
    [example] = load_dataset(path, "causal-lm", tokenizer).examples
    n_prompt = example["labels"].count(IGNORE_INDEX)
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tokenizer.decode(example["input_ids"][:n_prompt]).endswith(
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(example["labels"][n_prompt:]) == "A pear.<|im_end|>\n"
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
