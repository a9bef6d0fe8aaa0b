"""The models the planner can build without their weights: published architectures by name
(`lorakit plan --model llama-3.1-70b`), a config.json file, a bundled model or a model directory.

A published architecture is its config.json's shape-setting values (widths, layers, heads, key-value
heads, vocabulary, tied embeddings) written out as a transformers LlamaConfig: nothing is downloaded,
and only the planner can use it (lorakit train needs weights).
"""
from __future__ import annotations

import os
from pathlib import Path

import transformers

from ..errors import LoraError
from ..zoo import BUNDLED, model_directory

LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072)
PUBLISHED: dict[str, dict] = {  # name: the published config.json's LlamaConfig fields
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         head_dim=64, tie_word_embeddings=True, **LLAMA3),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         head_dim=128, tie_word_embeddings=True, **LLAMA3),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         tie_word_embeddings=False, **LLAMA3),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096,
                        tie_word_embeddings=False),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                        tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          tie_word_embeddings=False, **LLAMA3),
}


def published_config(name: str) -> transformers.LlamaConfig:
    """The published architecture `name` (one of PUBLISHED) as a transformers config, named after it."""
    config = transformers.LlamaConfig(**PUBLISHED[name])
    config._name_or_path = name
    return config


def model_config(model: str | os.PathLike) -> transformers.PretrainedConfig:
    """The config of a published architecture, a config.json file, a bundled model or a model directory."""
    if isinstance(model, str) and model in PUBLISHED:
        return published_config(model)
    path = Path(model)
    if path.is_file():
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if str(model) not in BUNDLED and not (path / "config.json").is_file():
        raise LoraError(f"model={str(model)!r}: give a published architecture ({', '.join(PUBLISHED)}), a config.json "
                        f"file, a bundled model ({', '.join(BUNDLED)}) or a transformers model directory")
    return transformers.AutoConfig.from_pretrained(model_directory(model), local_files_only=True)
