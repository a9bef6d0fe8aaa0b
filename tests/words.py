"""A tiny word-level tokenizer (one id per whitespace word, <s> first, chat templates) and small file
helpers, for the data tests (test_datasets, test_batches, test_prompts): the reference for every
tokenisation is this tokenizer, called directly on the text the code under test should have used."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = "the a cat dog sat on mat hello there say how are you fine thanks big small red".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|last|>"]
# role tag, content, end of turn; the generation prompt opens the assistant's turn
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")
# renders the last user turn differently, so the prompt alone is not a prefix of prompt + reply
SHIFTY_CHAT = ("{% for m in messages %}{% if loop.last and m['role'] == 'user' %}<|last|> <|last|>{% else %}"
               "<|{{ m['role'] }}|>{% endif %} {{ m['content'] }} </s> {% endfor %}"
               "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_tokenizer(words=WORDS, chat_template: str | None = CHAT, pad: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace words, one id each; <s> before every text (like Llama's BOS)."""
    vocab = {w: i for i, w in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>" if pad else None, additional_special_tokens=SPECIAL[4:])
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


CLASSIFY = [("the cat sat", "pet"), ("a red mat", "thing"), ("the dog", "pet"), ("a big red mat", "thing")]
