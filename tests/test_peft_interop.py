"""lorakit against the real `peft` package: an adapter written by either loads in the other and
computes the same outputs, unmerged and merged, on GPT-2 (Conv1D), Llama and BERT (Embedding)."""
import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; the two libraries only order the same sums differently
EFFECT = 1e-2  # an adapter must move the output by far more than TOL, or the test proves nothing


# --- tiny models, seeded, random init ---------------------------------------------------------------
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama():  # shaped like SmolLM2, but tiny
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=True,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert():  # shaped like MiniLM, but tiny
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    return transformers.BertModel(cfg, add_pooling_layer=True).eval()


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert}

# (model, lorakit config, the same adapter as a peft config)
CASES = {
    "gpt2-c_attn": ("gpt2", dict(rank=4, alpha=8, targets=("c_attn",)),
                    dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2-attn-mlp": ("gpt2", dict(rank=4, alpha=16, dropout=0.1, targets=("c_attn", "c_proj", "c_fc")),
                      dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["c_attn", "c_proj", "c_fc"],
                           fan_in_fan_out=True)),
    "gpt2-paths": ("gpt2", dict(rank=2, alpha=4, targets=("transformer.h.0.attn.c_attn", "h.1.mlp.c_fc")),
                   dict(r=2, lora_alpha=4, target_modules=["transformer.h.0.attn.c_attn", "h.1.mlp.c_fc"],
                        fan_in_fan_out=True)),
    "gpt2-all-linear": ("gpt2", dict(rank=2, alpha=2, targets="all-linear"),
                        dict(r=2, lora_alpha=2, target_modules="all-linear", fan_in_fan_out=True)),
    "llama-qv": ("llama", dict(rank=4, alpha=8, targets=("q_proj", "v_proj")),
                 dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-patterns": (
        "llama",
        dict(rank=4, alpha=8, targets="all-linear", rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
             alpha_pattern={"o_proj": 32, "layers.0.mlp.up_proj": 3}),
        dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
             alpha_pattern={"o_proj": 32, "layers.0.mlp.up_proj": 3})),
    "llama-exclude": ("llama",
                      dict(rank=4, alpha=8, targets="all-linear", exclude=("down_proj", "layers.1.self_attn.k_proj")),
                      dict(r=4, lora_alpha=8, target_modules="all-linear",
                           exclude_modules=["down_proj", "layers.1.self_attn.k_proj"])),
    "llama-rslora": ("llama", dict(rank=8, alpha=4, targets=("q_proj", "k_proj", "v_proj"), rslora=True),
                     dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"], use_rslora=True)),
    "bert-qv-embedding": ("bert", dict(rank=4, alpha=8, targets=("query", "value", "word_embeddings")),
                          dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"])),
    "bert-all-linear": ("bert", dict(rank=2, alpha=8, targets="all-linear"),
                        dict(r=2, lora_alpha=8, target_modules="all-linear")),
}
# bias modes are checked where biases exist: GPT-2's Conv1D, BERT's Linear (and LayerNorm for "all")
BIAS_CASES = [(case, bias) for case in ("gpt2-attn-mlp", "bert-qv-embedding") for bias in ("all", "lora_only")]


def ids_for(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, model.config.vocab_size, (2, 12), generator=g)


@torch.no_grad()
def output(model, ids) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def randomise_trainable_(model, seed: int) -> list[str]:
    """Give every trainable tensor (LoRA A and B, biases the bias mode trains) new random values,
    as training would; returns their names."""
    g = torch.Generator().manual_seed(seed)
    names = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
            names.append(name)
    return names


def peft_warnings(caught) -> list[str]:
    """Warnings PEFT raised while reading a file: missing/unexpected keys or config fields, or a
    config value it had to correct (e.g. fan_in_fan_out for Conv1D)."""
    return [f"{w.category.__name__}: {w.message}" for w in caught if "/peft/" in w.filename.replace("\\", "/")]


def both_configs(case: str, bias: str = "none"):
    model_name, lk_kwargs, peft_kwargs = CASES[case]
    return (MODELS[model_name](), lk.LoraConfig(bias=bias, **lk_kwargs),
            peft.LoraConfig(bias=bias, **peft_kwargs))


# --- lorakit -> PEFT --------------------------------------------------------------------------------
def lorakit_to_peft(case: str, bias: str, tmp_path) -> None:
    base, lk_config, _ = both_configs(case, bias)
    ids = ids_for(base)
    base_out = output(base, ids)
    model = copy.deepcopy(base)
    lk.inject_(model, lk_config)
    model.eval()  # the new LoRA dropout modules start in train mode, as PEFT's do
    trained = randomise_trainable_(model, seed=2)
    if bias != "none":
        assert any(name.endswith(".bias") for name in trained), "the bias mode trains no bias"
    ours = output(model, ids)
    assert (ours - base_out).abs().max() > EFFECT
    lk.save_adapter(model, tmp_path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert peft_warnings(caught) == []
    torch.testing.assert_close(output(theirs_model, ids), ours, **TOL)
    # Load the weights again through the PEFT API that returns the state-dict load result.
    check = peft.get_peft_model(copy.deepcopy(base), peft.PeftConfig.from_pretrained(tmp_path))
    result = check.load_adapter(tmp_path, adapter_name="default")
    assert (list(result.missing_keys), list(result.unexpected_keys)) == ([], [])

    # Merged: PEFT's merge_and_unload and lorakit's merge_ give the same model.
    merged_theirs = output(theirs_model.merge_and_unload(), ids)
    lk.merge_(model)
    torch.testing.assert_close(output(model, ids), merged_theirs, **TOL)
    torch.testing.assert_close(merged_theirs, ours, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_adapter_loads_in_peft(case, tmp_path):
    """save_adapter -> PeftModel.from_pretrained: no key/config warnings, same outputs, same merge."""
    lorakit_to_peft(case, "none", tmp_path)


@pytest.mark.parametrize("case,bias", BIAS_CASES)
def test_lorakit_trained_biases_load_in_peft(case, bias, tmp_path):
    """bias='all'/'lora_only': the biases lorakit trains and saves are the ones PEFT loads."""
    lorakit_to_peft(case, bias, tmp_path)


# --- PEFT -> lorakit --------------------------------------------------------------------------------
def peft_to_lorakit(case: str, bias: str, tmp_path) -> None:
    base, _, peft_config = both_configs(case, bias)
    ids = ids_for(base)
    base_out = output(base, ids)
    theirs_model = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    trained = randomise_trainable_(theirs_model, seed=3)
    if bias != "none":
        assert any(name.endswith(".bias") for name in trained), "the bias mode trains no bias"
    theirs = output(theirs_model, ids)
    assert (theirs - base_out).abs().max() > EFFECT

    with theirs_model.disable_adapter():
        theirs_disabled = output(theirs_model, ids)  # the base, with any trained biases
    theirs_model.save_pretrained(tmp_path)

    model = copy.deepcopy(base)  # in eval mode: loading must not switch the new dropout on
    assert lk.load_adapter(model, tmp_path) == "default"
    torch.testing.assert_close(output(model, ids), theirs, **TOL)
    with lk.disabled(model):
        torch.testing.assert_close(output(model, ids), theirs_disabled, **TOL)

    merged_theirs = output(theirs_model.merge_and_unload(), ids)
    lk.merge_(model)
    torch.testing.assert_close(output(model, ids), merged_theirs, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lorakit(case, tmp_path):
    """get_peft_model + save_pretrained -> lk.load_adapter: same outputs, same merge as PEFT's."""
    peft_to_lorakit(case, "none", tmp_path)


@pytest.mark.parametrize("case,bias", BIAS_CASES)
@pytest.mark.filterwarnings("ignore:Careful, disabling adapter layers with bias")  # PEFT's note, expected here
def test_peft_trained_biases_load_in_lorakit(case, bias, tmp_path):
    """bias='all'/'lora_only': the biases PEFT trains and saves are loaded into the right modules."""
    peft_to_lorakit(case, bias, tmp_path)


def test_peft_regex_targets_load_in_lorakit(tmp_path):
    """A regex target_modules string selects the same modules in lorakit as in PEFT (a full match
    of the path: the bare 'q_proj' alternative matches no module)."""
    base = llama()
    ids = ids_for(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r"q_proj|.*\.layers\.1\..*(q|gate)_proj")
    theirs_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randomise_trainable_(theirs_model, seed=4)
    theirs_model.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    lk.load_adapter(model, tmp_path)
    assert lk.adapter_paths(model, "default") == peft_adapted_paths(theirs_model)
    assert len(lk.adapter_paths(model, "default")) == 2
    torch.testing.assert_close(output(model, ids), output(theirs_model, ids), **TOL)


def peft_adapted_paths(peft_model) -> list[str]:
    """Module paths (relative to the wrapped model) that PEFT put a LoRA layer on."""
    return [p for p, m in peft_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def test_lorakit_config_fields_read_back_by_peft(tmp_path):
    """PEFT reads lorakit's adapter_config.json into the config lorakit meant (per-module ranks too)."""
    base, lk_config, _ = both_configs("llama-all-linear-patterns")
    model = copy.deepcopy(base)
    paths = lk.inject_(model, lk_config.replace(rslora=True, bias="lora_only"))
    lk.save_adapter(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = peft.PeftConfig.from_pretrained(tmp_path)
    assert peft_warnings(caught) == []
    assert isinstance(read, peft.LoraConfig)
    assert (read.r, read.lora_alpha, read.bias, read.use_rslora) == (4, 8, "lora_only", True)
    theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert peft_adapted_paths(theirs_model) == paths
    theirs_layers = dict(theirs_model.base_model.model.named_modules())
    for path, layer in lk.lora_layers(model):
        assert theirs_layers[path].r["default"] == layer.rank("default"), path
        assert theirs_layers[path].scaling["default"] == pytest.approx(layer.adapters["default"].scale), path


@pytest.mark.parametrize("case", ["gpt2-c_attn", "llama-all-linear-patterns", "bert-qv-embedding"])
def test_analysis_reads_peft_adapters_with_peft_delta_weights(case, tmp_path):
    """lorakit.analysis.measures on a PEFT folder: each module's dW is PEFT's own get_delta_weight (rank and
    alpha patterns, Conv1D and embedding layouts included), as the (d_out, fan_in) matrix B @ A adds to."""
    from lorakit.analysis.measures import adapter_updates

    base, _, peft_config = both_configs(case)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    randomise_trainable_(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    updates = adapter_updates(tmp_path)
    layers = {name.removeprefix("base_model.model."): m for name, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(updates) == set(layers)
    for path, layer in layers.items():
        delta = layer.get_delta_weight("default").double()  # PEFT's, in the base weight's layout
        weight_layout = type(layer.get_base_layer()).__name__ in ("Conv1D", "Embedding")
        torch.testing.assert_close(updates[path].delta, delta.T if weight_layout else delta, **TOL)
