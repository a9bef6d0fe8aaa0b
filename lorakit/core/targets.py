"""Target names and the one rule that matches them to module paths; each architecture's default targets.

A target is a module name or glob: it matches a module path if equal, if the path ends with
'.' + target, or as a glob over the whole path (`*.layers.*.q_proj`). 'all-linear' means every linear layer but the
output head. With no targets given, a model adapts its attention projections, looked up by the
model type a `transformers` config names (the same table PEFT keeps).
"""
from __future__ import annotations

import fnmatch

from torch import nn

ALL_LINEAR = "all-linear"
GLOB_CHARACTERS = "*?["  # fnmatch's; a pattern without them is a plain name

# transformers model_type -> the attention projections LoRA adapts by default (the LoRA paper's W_q, W_v).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "phi", "opt", "bart", "mbart", "gptj", "gpt_neo", "stablelm", "starcoder2",
                     "olmo", "olmo2", "granite", "cohere", "smollm3", "m2m_100", "blenderbot", "pegasus", "marian",
                     "whisper"), ("q_proj", "v_proj")),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm", "vit", "megatron-bert",
                     "ernie", "big_bird", "mpnet"), ("query", "value")),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ("c_attn",)),
    **dict.fromkeys(("bloom", "gpt_neox", "falcon", "chatglm"), ("query_key_value",)),
    **dict.fromkeys(("t5", "mt5"), ("q", "v")),
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "phi3": ("qkv_proj",),
    "mpt": ("Wqkv",),
}


def path_matches(path: str, pattern: str) -> bool:
    """lorakit's rule: a module path matches a pattern if equal, if it ends with '.' + pattern, or as a glob."""
    return names_module(path, pattern) or fnmatch.fnmatchcase(path, pattern)


def paths_matching(paths: list[str], patterns) -> dict[str, list[str]]:
    """pattern -> the paths that match it (path_matches), in `paths` order. Plain names are looked up
    (paths_named); globs are matched as path_matches does."""
    globs = [p for p in dict.fromkeys(patterns) if any(c in p for c in GLOB_CHARACTERS)]
    found = paths_named(paths, [p for p in patterns if p not in globs])  # fnmatch of a plain name: equality
    found.update({pattern: [path for path in paths if path_matches(path, pattern)] for pattern in globs})
    return {pattern: found[pattern] for pattern in patterns}


def paths_named(paths: list[str], names) -> dict[str, list[str]]:
    """name -> the paths it names (names_module), in `paths` order.

    Fast for many names (a PEFT file names every adapted module): a name is a dotted suffix of the paths it
    names, so only paths ending in one of the names' last parts are looked at, and by dict lookup rather
    than one comparison per name.
    """
    found: dict[str, list[str]] = {name: [] for name in names}
    leaves = {name.rpartition(".")[2] for name in found}
    for path in paths:
        if path.rpartition(".")[2] in leaves:
            parts = path.split(".")
            for suffix in (".".join(parts[i:]) for i in range(len(parts))):
                if suffix in found:
                    found[suffix].append(path)
    return found


def names_module(path: str, name: str) -> bool:
    """`name` names the module at `path`: the whole path, or its last dotted parts (no globs)."""
    return path == name or path.endswith("." + name)


def split_names(text: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj'): the command line's (and configs') comma-separated lists."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def model_type(model: nn.Module) -> str | None:
    """The `transformers` model type (config.model_type) of `model`, or None for a plain nn.Module."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    return kind if isinstance(kind, str) and kind else None


def default_targets(model: nn.Module) -> tuple[str, ...] | None:
    """The architecture's default LoRA targets, or None where lorakit knows no default for it."""
    return DEFAULT_TARGETS.get(model_type(model) or "")
