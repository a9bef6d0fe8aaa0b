"""lorakit.core.inject: which modules a config targets, the errors when it cannot, and injection itself."""
import copy

import pytest
import torch
import transformers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from cases import Toy, same, snapshot
from lorakit.core.layers import LoraConv, LoraConv1D, LoraEmbedding, LoraLinear

IDS = torch.tensor([[1, 7, 3, 9, 2, 4]])
SUPPORTED = ("Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear")


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def llama():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def linear_paths(model):
    """Every nn.Linear / Conv1D except the output head, found without lorakit."""
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and p != "lm_head"]


# --- targets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, expected", [
    (("q_proj",), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),      # suffix
    (("self_attn.v_proj",), ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]),
    (("model.layers.1.mlp.down_proj",), ["model.layers.1.mlp.down_proj"]),                      # equal
    (("model.layers.*.self_attn.[qk]_proj",), ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                               "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]),
    (("*.1.mlp.*_proj", "lm_head"), ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                     "model.layers.1.mlp.down_proj", "lm_head"]),
    (("embed_tokens",), ["model.embed_tokens"]),
])
def test_targets_by_name_suffix_and_glob(targets, expected):
    model = llama()
    assert sorted(lk.resolve_targets(model, lk.LoraConfig(targets=targets))) == sorted(expected)


@pytest.mark.parametrize("build, wrapper", [(gpt2, LoraConv1D), (llama, LoraLinear)])
def test_all_linear_skips_the_output_head(build, wrapper):
    model = build()
    out = model(IDS).logits
    expected = linear_paths(model)
    paths = lk.inject_(model, lk.LoraConfig(targets="all-linear"))
    assert paths == expected and len(paths) == (8 if build is gpt2 else 14)
    assert all(type(model.get_submodule(p)) is wrapper for p in paths)
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model(IDS).logits, out)  # a fresh adapter is a no-op
    # A second adapter extends the same LoRA layers; it does not wrap them again.
    assert lk.inject_(model, lk.LoraConfig(rank=2, targets="all-linear"), adapter="second") == expected
    assert all(not isinstance(layer.base_layer, lk.LoraLayer) for _, layer in lk.lora_layers(model))
    assert [p for p, _ in lk.lora_layers(model)] == expected


def test_all_linear_on_a_plain_model_skips_a_module_named_lm_head():
    assert lk.resolve_targets(Toy(), lk.LoraConfig(targets="all-linear")) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_exclude():
    model = llama()
    config = lk.LoraConfig(targets="all-linear", exclude=("*.mlp.*", "model.layers.0.self_attn.k_proj", "o_proj"))
    paths = lk.resolve_targets(model, config)
    assert paths == [p for p in linear_paths(model)
                     if ".mlp." not in p and not p.endswith("o_proj") and p != "model.layers.0.self_attn.k_proj"]
    # Exclude patterns match like targets: a glob must match the whole path.
    assert lk.resolve_targets(model, lk.LoraConfig(targets=("down_proj",), exclude=("mlp.*",))) == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(lk.LoraError, match=r"targets=\['q_proj'\] with exclude=\['q_proj'\] leaves no module"):
        lk.resolve_targets(model, lk.LoraConfig(targets=("q_proj",), exclude=("q_proj",)))


# --- errors ------------------------------------------------------------------------------------

def test_no_match_lists_the_closest_names():
    with pytest.raises(lk.LoraError) as info:
        lk.resolve_targets(llama(), lk.LoraConfig(targets=("q_prj",)))
    message = str(info.value)
    assert "'q_prj' matches no module" in message
    closest = message.split("closest module names: ")[1].split(", ")
    assert closest[0] == "q_proj" and "o_proj" in closest


def test_unsupported_type_lists_supported_types():
    with pytest.raises(lk.LoraError) as info:
        lk.resolve_targets(llama(), lk.LoraConfig(targets=("model.layers.0.mlp",)))
    message = str(info.value)
    assert "'model.layers.0.mlp' is a LlamaMLP" in message
    listed = message.split("supported types: ")[1].split(".")[0].split(", ")
    assert sorted(listed) == sorted(SUPPORTED)


def test_every_problem_is_reported_together():
    with pytest.raises(lk.LoraError) as info:
        lk.resolve_targets(llama(), lk.LoraConfig(targets=("q_prj", "post_attention_layernorm", "v_proj", "mlp.act_fn")))
    message = str(info.value)
    assert message.startswith("targets: 5 problem(s)")
    for fragment in ("'q_prj' matches no module", "'model.layers.0.post_attention_layernorm' is a LlamaRMSNorm",
                     "'model.layers.1.post_attention_layernorm' is a LlamaRMSNorm",
                     "'model.layers.0.mlp.act_fn' is a", "'model.layers.1.mlp.act_fn' is a"):
        assert fragment in message
    assert message.count("\n  - ") == 5


def test_conv_rank_must_be_a_multiple_of_groups():
    model = Toy()  # conv has groups=2
    with pytest.raises(lk.LoraError, match=r"rank for 'conv' is 3, but the conv has groups=2.*rank_pattern"):
        lk.inject_(model, lk.LoraConfig(rank=3, targets=("conv", "q_proj")))
    paths = lk.inject_(model, lk.LoraConfig(rank=3, targets=("conv", "q_proj"), rank_pattern={"conv": 4}))
    assert sorted(paths) == ["conv", "q_proj"] and type(model.conv) is LoraConv
    assert model.conv.rank("default") == 4 and model.q_proj.rank("default") == 3


def test_conv_types():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Conv3d(4, 2, 1), nn.Embedding(5, 3))
    assert lk.inject_(model, lk.LoraConfig(rank=4, targets=("0", "1", "2", "3"))) == ["0", "1", "2", "3"]
    assert [type(m) for m in model] == [LoraConv, LoraConv, LoraConv, LoraEmbedding]


def test_subclasses_of_supported_types_are_adapted():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 4))
    lk.inject_(model, lk.LoraConfig(targets=("0",)))
    assert type(model[0]) is LoraLinear and type(model[0].base_layer) is MyLinear


@pytest.mark.parametrize("call, pattern", [
    (lambda m: lk.inject_(m, lk.LoraConfig(targets=("q_proj", "q_prj"))), r"'q_prj' matches no module"),
    (lambda m: lk.inject_(m, lk.LoraConfig(targets=("q_proj", "model"))), r"'model' is a LlamaModel"),
    (lambda m: lk.inject_(m, lk.LoraConfig(targets=("q_proj",)), adapter="bad name"), r"adapter='bad name'"),
    (lambda m: lk.inject_(m, lk.LoraConfig(targets=("q_proj",)), adapter=""), r"adapter=''"),
    (lambda m: lk.inject_(m, lk.LoraConfig(targets=("q_proj",)), adapter=3), r"adapter=3"),
    (lambda m: lk.inject_(m, {"rank": 8}), r"config: expected lorakit.LoraConfig, got dict"),
])
def test_model_is_untouched_after_an_error(call, pattern):
    model = llama()
    before, out = snapshot(model), model(IDS).logits
    with pytest.raises(lk.LoraError, match=pattern):
        call(model)
    assert same(before, snapshot(model))
    assert torch.equal(model(IDS).logits, out)


def test_model_with_an_adapter_is_untouched_after_an_error():
    model = llama()
    lk.inject_(model, lk.LoraConfig(targets=("q_proj", "v_proj"), bias="all"))
    before = snapshot(model)
    for adapter, config, pattern in [
        ("default", lk.LoraConfig(targets=("k_proj",)), r"adapter='default' already exists"),
        ("other", lk.LoraConfig(targets=("k_proj", "rotary_emb")), r"LlamaRotaryEmbedding"),
    ]:
        with pytest.raises(lk.LoraError, match=pattern):
            lk.inject_(model, config, adapter)
        assert same(before, snapshot(model))
    lk.merge_(model)
    merged = snapshot(model)
    with pytest.raises(lk.LoraError, match=r"model is merged.*unmerge_"):
        lk.inject_(model, lk.LoraConfig(targets=("k_proj",)), "other")
    assert same(merged, snapshot(model))


def test_inject_needs_a_module():
    with pytest.raises(lk.LoraError, match=r"model: expected a torch.nn.Module, got dict"):
        lk.inject_({}, lk.LoraConfig())


def test_resolve_targets_changes_nothing():
    model = llama()
    before = snapshot(model)
    lk.resolve_targets(model, lk.LoraConfig(targets="all-linear"))
    assert same(before, snapshot(model))


# --- what trains afterwards ----------------------------------------------------------------------

def _adapter_params(model):
    return {id(p) for _, layer in lk.lora_layers(model) for p in layer.adapters.parameters()}


def _biases(modules):
    return {id(m.bias) for m in modules if isinstance(getattr(m, "bias", None), nn.Parameter)}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapters_and_chosen_biases_train(bias):
    model = Toy()
    plain = copy.deepcopy(model)
    paths = lk.inject_(model, lk.LoraConfig(targets=("q_proj", "o_proj", "conv", "embed"), bias=bias))
    adapted = [model.get_submodule(p).base_layer for p in paths]
    expected = _adapter_params(model) | {
        "none": set(), "all": _biases(model.modules()), "lora_only": _biases(adapted)}[bias]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == expected
    assert len(_adapter_params(model)) == 2 * len(paths)
    if bias == "all":  # every bias of the model, adapted or not
        assert len(_biases(model.modules())) == len(_biases(plain.modules())) == 5
    if bias == "lora_only":  # q_proj and conv have one; o_proj has none; embed cannot
        assert len(expected) == 2 * len(paths) + 2
    trainable_count, total = lk.parameter_counts(model)
    assert trainable_count == sum(p.numel() for p in model.parameters() if id(p) in expected)
    assert total == sum(p.numel() for p in plain.parameters()) + sum(
        p.numel() for p in model.parameters() if id(p) in _adapter_params(model))


def test_training_updates_only_adapters():
    model = Toy()
    lk.inject_(model, lk.LoraConfig(targets="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.tensor([[1, 2, 3]])).logsumexp(-1).sum().backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(torch.count_nonzero(layer.adapters["default"].B) > 0 for _, layer in lk.lora_layers(model))


def test_previously_trainable_base_parameters_are_frozen():
    model = gpt2()
    assert all(p.requires_grad for p in model.parameters())
    lk.inject_(model, lk.LoraConfig(targets=("c_attn",)))
    assert {id(p) for p in model.parameters() if p.requires_grad} == _adapter_params(model)
    # The tied input/output embedding is counted once.
    trainable, total = lk.parameter_counts(model)
    assert total == sum(p.numel() for p in set(model.parameters()))
    # c_attn: Conv1D(3*16, 16) with rank 8 in each of 2 blocks: A (8, 16) and B (48, 8).
    assert trainable == 2 * (8 * 16 + 48 * 8)


@pytest.mark.parametrize("make, expected", [
    (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
     {"q_proj", "v_proj"}),
    (lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)),
     {"query", "value"}),
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2)),
     {"c_attn"}),
])
def test_default_targets_follow_the_architecture(make, expected):
    """targets=None adapts what PEFT adapts by default for the model type: Llama q/v, BERT query/value, GPT-2 c_attn."""
    model = make()
    paths = lk.inject_(model, lk.LoraConfig())
    assert paths and {p.rsplit(".", 1)[-1] for p in paths} == expected


def test_unknown_architecture_without_targets_lists_adaptable_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(lk.LoraError, match=r"targets=None: .*plain Sequential.*adaptable module names: 0, 2.0$") as info:
        lk.inject_(model, lk.LoraConfig())
    assert "ReLU" not in str(info.value)


def test_a_target_that_matches_nothing_suggests_adaptable_leaf_names():
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(lk.LoraError) as info:
        lk.inject_(model, lk.LoraConfig(targets=("q_proj", "v_proj")))
    message = str(info.value)
    assert "'q_proj' matches no module; module names include: dense, key, query, value" in message
    assert "LayerNorm" not in message and ": 0, 1" not in message


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_that_matches_no_adapted_module_is_an_error(field):
    """A glob matches the whole path: 'layers.0.*' names nothing in a real model, and would be ignored."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2))
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=rf"{field}: 'layers.0.\*' matches none of the adapted modules .*'\*.layers.0.\*'"):
        lk.inject_(model, lk.LoraConfig(targets=("q_proj",), **{field: {"layers.0.*": 4}}))
    assert same(before, snapshot(model))
    paths = lk.inject_(model, lk.LoraConfig(targets=("q_proj",), **{field: {"*.layers.0.*": 4}}))
    assert len(paths) == 2
