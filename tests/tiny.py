"""Tiny real transformers models saved to disk, with a real (small) fast tokenizer: CLI and
training tests run them end to end in seconds."""
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a and of to in is was he she it they we you i that for on with as his her at by "
         "be this from or had not but what all were when there can an your which their said if do "
         "will each about how up out them then many some so these would other into has more two "
         "time could no way than first been call who its now find long down day did get come made "
         "may part lord god king land people man son house").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]"]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + list("0123456789.,;:!?'"))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", cls_token="[CLS]", sep_token="[SEP]")


def causal_lm_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (SmolLM2's architecture, tiny) with its tokenizer, saved to `path`."""
    tok = tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def encoder_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (MiniLM's architecture, tiny) with its tokenizer, saved to `path`."""
    tok = tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


TEXT = """the lord said unto the man and the man said unto the lord
in the day that the king of the land came to the house of god
he was the son of the king and she was the daughter of the man
they made the house and they called it the house of the lord
"""
