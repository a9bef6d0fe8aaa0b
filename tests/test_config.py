"""lorakit.core.config: LoraConfig validation, immutability, per-module rank/alpha, target matching."""
import copy
import dataclasses
import json
import math
import pickle
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lorakit as lk
from lorakit.core.targets import names_module, path_matches, paths_matching, paths_named

# One bad value per field; each must be named (field and value) in the error.
BAD_FIELDS = {
    "rank": [0, -3, 2.5, True, "8"],
    "alpha": [0, -1.0, float("nan"), float("inf"), False, "16"],
    "dropout": [-0.1, 1.0, 1.5, float("nan"), "0.1"],
    "targets": [(), ("",), ("q_proj", 3), {"q_proj"}],
    "exclude": [("",), (None,)],
    "bias": ["some", "", None],
    "init": ["xavier", None],
    "init_niter": [-1, 1.5, True],
    "rslora": ["yes", 1, None],
    "rank_pattern": [{"q_proj": 0}, {"q_proj": 1.5}, {3: 4}, ["q_proj"]],
    "alpha_pattern": [{"v_proj": -2}, {"v_proj": "x"}, ["v_proj"]],
}


@pytest.mark.parametrize("field, value", [(f, v) for f, values in BAD_FIELDS.items() for v in values])
def test_each_bad_field_is_named_with_its_value(field, value):
    with pytest.raises(lk.LoraError) as info:
        lk.LoraConfig(**{field: value})
    message = str(info.value)
    assert f"1 problem(s)\n  - {field}" in message
    assert _shown(value) in message
    assert isinstance(info.value, ValueError)


def _shown(value) -> str:
    """How the error shows a bad value: a pattern mapping shows its bad entry."""
    if isinstance(value, dict):
        key, bad = next(iter(value.items()))
        return f"[{key!r}]={bad!r}"
    return repr(value)


def test_all_problems_are_reported_together():
    bad = {"rank": 0, "alpha": -1.0, "dropout": 1.0, "targets": (), "exclude": ("",), "bias": "some",
           "init": "xavier", "rslora": "yes", "rank_pattern": {"q": 0}, "alpha_pattern": {"q": "x"}}
    with pytest.raises(lk.LoraError) as info:
        lk.LoraConfig(**bad)
    message = str(info.value)
    assert f"{len(bad)} problem(s)" in message
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(lines) == len(bad)
    for field, line in zip(bad, lines):
        assert line.startswith(f"  - {field}")


def test_defaults_are_valid_and_documented_values():
    cfg = lk.LoraConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.bias, cfg.init, cfg.rslora) == (8, 16.0, 0.0, "none", "default", False)
    assert cfg.targets is None and cfg.exclude == ()  # None: the architecture's default (test_inject)


DEFAULTS = dict(rank=8, alpha=16.0, dropout=0.0, targets=None, exclude=(), bias="none", init="default", init_niter=0,
                rslora=False, rank_pattern={}, alpha_pattern={}, modules_to_save=(), adapter_dtype="float32", dora=False)
# Per module: (rank, alpha, scale), scale by the paper: alpha / rank, or alpha / sqrt(rank) with rslora.
PLAIN = {"q_proj": (8, 16.0, 2.0), "b.x": (8, 16.0, 2.0)}
BOTH = ["q_proj", "b.x"]  # what `adapt` adapts when the config names no targets


def adapt(cfg: lk.LoraConfig) -> tuple[list[str], list[str]]:
    """Inject `cfg` into a small model (targets=None: q_proj and b.x); (adapted paths, trainable biases)."""
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "b": nn.ModuleDict({"x": nn.Linear(4, 4)}),
                           "lm_head": nn.Linear(4, 4)})
    biases = {name: p for name, p in model.named_parameters() if name.endswith("bias")}
    paths = lk.inject_(model, cfg if cfg.targets else cfg.replace(targets=tuple(BOTH)))
    return paths, sorted(name for name, p in biases.items() if p.requires_grad)


# (given, held: the fields that differ from the defaults, numbers per module, (adapted paths, trainable biases)).
# dropout and init act inside the layers: test_layers checks what they do.
GOOD = [
    ({"rank": 1}, {"rank": 1}, {"q_proj": (1, 16.0, 16.0)}, (BOTH, [])),
    ({"alpha": 0.5}, {"alpha": 0.5}, {"q_proj": (8, 0.5, 0.0625)}, (BOTH, [])),
    ({"alpha": 3}, {"alpha": 3}, {"q_proj": (8, 3, 0.375)}, (BOTH, [])),
    ({"dropout": 0.0}, {}, PLAIN, (BOTH, [])),
    ({"dropout": 0.999}, {"dropout": 0.999}, PLAIN, (BOTH, [])),
    ({"bias": "all"}, {"bias": "all"}, PLAIN, (BOTH, ["b.x.bias", "lm_head.bias", "q_proj.bias"])),
    ({"bias": "lora_only"}, {"bias": "lora_only"}, PLAIN, (BOTH, ["b.x.bias", "q_proj.bias"])),
    ({"init": "gaussian"}, {"init": "gaussian"}, PLAIN, (BOTH, [])),
    ({"rslora": True}, {"rslora": True}, {"q_proj": (8, 16.0, 16 / math.sqrt(8))}, (BOTH, [])),  # 5.657, not 2
    ({"targets": "all-linear"}, {"targets": ("all-linear",)}, PLAIN, (BOTH, [])),  # not the output head
    ({"targets": ["q_proj", "b.*"]}, {"targets": ("q_proj", "b.*")}, PLAIN, (BOTH, [])),
    ({"exclude": "b.x"}, {"exclude": ("b.x",)}, PLAIN, (["q_proj"], [])),
    ({"dora": True}, {"dora": True}, PLAIN, (BOTH, [])),  # test_dora checks what it does
    ({"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"x": 0.5}},
     {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"x": 0.5}},
     {"q_proj": (2, 16.0, 8.0), "b.x": (8, 0.5, 0.0625), "lm_head": (8, 16.0, 2.0)}, (BOTH, [])),
]


@pytest.mark.parametrize("given, held, numbers, adapted", GOOD, ids=[str(case[0]) for case in GOOD])
def test_good_values_are_held_and_take_effect(given, held, numbers, adapted):
    cfg = lk.LoraConfig(**given)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    assert all(isinstance(fields[name], MappingProxyType) for name in ("rank_pattern", "alpha_pattern"))  # read-only
    fields.update(rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern))
    assert fields == {**DEFAULTS, **held}  # tuples, not lists: ("a",) != ["a"]
    for path, (rank, alpha, scale) in numbers.items():
        assert (cfg.rank_for(path), cfg.alpha_for(path)) == (rank, alpha), path
        assert cfg.scale_for(path) == pytest.approx(scale, rel=1e-15), path
    assert adapt(cfg) == adapted


def test_sequences_and_strings_are_normalised_to_tuples():
    cfg = lk.LoraConfig(targets=["q_proj", "k_proj"], exclude="layers.0.q_proj")
    assert cfg.targets == ("q_proj", "k_proj") and cfg.exclude == ("layers.0.q_proj",)
    assert lk.LoraConfig(targets="all-linear").targets == ("all-linear",)


def test_config_is_frozen():
    cfg = lk.LoraConfig(rank_pattern={"q_proj": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4
    with pytest.raises(TypeError):
        cfg.rank_pattern["k_proj"] = 2
    with pytest.raises(TypeError):
        cfg.alpha_pattern["k_proj"] = 2.0


def test_config_does_not_alias_the_callers_containers():
    targets, patterns = ["q_proj"], {"q_proj": 4}
    cfg = lk.LoraConfig(targets=targets, rank_pattern=patterns)
    targets.append("k_proj")
    patterns["q_proj"] = 0
    assert cfg.targets == ("q_proj",) and cfg.rank_for("q_proj") == 4


def test_replace_returns_a_new_validated_config():
    cfg = lk.LoraConfig(rank=4)
    new = cfg.replace(rank=16, alpha=8)
    assert (new.rank, new.alpha, cfg.rank, cfg.alpha) == (16, 8, 4, 16.0)
    with pytest.raises(lk.LoraError, match=r"rank=-1"):
        cfg.replace(rank=-1)


def test_to_dict_is_json_and_round_trips():
    cfg = lk.LoraConfig(rank=4, alpha=8, targets=("a", "b"), exclude=("c",), bias="all", rslora=True,
                        rank_pattern={"a": 2}, alpha_pattern={"b": 1.0})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert lk.LoraConfig(**data) == cfg


@pytest.mark.parametrize("path, pattern, expected", [
    ("q_proj", "q_proj", True),                              # equal
    ("model.layers.0.self_attn.q_proj", "q_proj", True),      # '.'-suffix
    ("model.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
    ("model.layers.0.self_attn.xq_proj", "q_proj", False),    # suffix only at a dot
    ("model.layers.0.self_attn.q_proj", "layers.0", False),   # a parent path is not a match
    ("model.layers.0.self_attn.q_proj", "model.layers.*.q_proj", True),  # glob
    ("model.layers.0.self_attn.q_proj", "*.q_proj", True),
    ("model.layers.0.self_attn.q_proj", "layers.*.q_proj", False),  # a glob matches the whole path
    ("model.layers.0.self_attn.q_proj", "model.layers.[01].*", True),
    ("model.layers.2.self_attn.q_proj", "model.layers.[01].*", False),
    ("model.layers.0.self_attn.Q_PROJ", "q_proj", False),     # case-sensitive
    ("model.layers.0.self_attn.q_proj", "*.Q_proj", False),
])
def test_path_matches(path, pattern, expected):
    assert path_matches(path, pattern) is expected
    assert paths_matching([path], [pattern]) == {pattern: [path] if expected else []}


PARTS = ["model", "layers", "0", "1", "q_proj", "v_proj", "self_attn", "attn"]


@given(paths=st.lists(st.lists(st.sampled_from(PARTS), min_size=1, max_size=5).map(".".join), unique=True),
       patterns=st.lists(st.one_of(st.lists(st.sampled_from(PARTS), min_size=1, max_size=3).map(".".join),
                                   st.sampled_from(["*.q_proj", "model.*", "*", "layers.[01].*", "?_proj", "0"]))))
def test_paths_matching_is_path_matches_for_every_pair(paths, patterns):
    """The indexed lookups (plain names by suffix) against the rules themselves, pair by pair."""
    assert paths_matching(paths, patterns) == {t: [p for p in paths if path_matches(p, t)] for t in patterns}
    assert paths_named(paths, patterns) == {t: [p for p in paths if names_module(p, t)] for t in patterns}  # literal


def test_rank_and_alpha_patterns_resolve_per_module_first_match_wins():
    cfg = lk.LoraConfig(rank=8, alpha=16, rank_pattern={"layers.0.self_attn.q_proj": 2, "*.q_proj": 4, "v_proj": 6},
                        alpha_pattern={"*.layers.1.*": 3.0, "v_proj": 12.0})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 2   # suffix, listed first
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 4   # glob
    assert cfg.rank_for("model.layers.1.self_attn.v_proj") == 6
    assert cfg.rank_for("model.layers.1.self_attn.k_proj") == 8   # no pattern: default
    assert cfg.alpha_for("model.layers.1.self_attn.v_proj") == 3.0  # first match wins over 'v_proj'
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 12.0
    assert cfg.alpha_for("model.layers.0.self_attn.k_proj") == 16
    assert cfg.scale_for("model.layers.0.self_attn.v_proj") == 12.0 / 6
    assert cfg.scale_for("model.layers.0.self_attn.k_proj") == 16 / 8


def test_scale_for_uses_rslora():
    cfg = lk.LoraConfig(rank=16, alpha=8, rslora=True, rank_pattern={"q_proj": 4})
    assert cfg.scale_for("k_proj") == pytest.approx(8 / math.sqrt(16), rel=1e-15)
    assert cfg.scale_for("a.q_proj") == pytest.approx(8 / math.sqrt(4), rel=1e-15)


def test_config_pickles_and_copies():
    cfg = lk.LoraConfig(rank=4, targets=("a",), rank_pattern={"a": 2}, alpha_pattern={"b": 1.0})
    for clone in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg), copy.copy(cfg)):
        assert clone == cfg and clone.rank_for("x.a") == 2
        with pytest.raises(TypeError):
            clone.rank_pattern["c"] = 1


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_with_a_residual_init_is_refused_naming_both(init):
    with pytest.raises(lk.LoraError, match=rf"dora=True with init='{init}'"):
        lk.LoraConfig(dora=True, init=init)
    assert lk.LoraConfig(dora=True, init="gaussian").dora  # the random inits combine with DoRA
