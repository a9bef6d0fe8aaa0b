"""lorakit.core.precision and LoRA on a low-precision or quantized frozen base (bitsandbytes int8 / nf4).

References: the library's own rounding rules (int8: |W - W_q| <= row absmax / 254; nf4: 16 levels per
block), the hand-written LoRA in tests/reference.py on the dequantized weights, and the real `peft`.
"""
import copy
import importlib.util
import warnings

import pytest
import torch
import transformers
from torch import nn

import lorakit as lk
from lorakit.core import precision as P
import reference

bnb = pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*kernels.*")


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def randomize_(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for part in layer.adapters.values():
                part.B.copy_(torch.randn(part.B.shape, generator=g) * std)
    return model


IDS = torch.tensor([[1, 5, 9, 33, 64, 2, 7, 100], [3, 3, 8, 12, 90, 41, 6, 0]])


# --- storing a base -------------------------------------------------------------------------------------
def test_nf4_round_trip_is_within_normalfloats_rounding():
    """NF4 keeps 16 levels (the quantiles of a normal) per block of 64 scaled by its absmax: on Gaussian
    weights the relative RMS error is about 0.1 (QLoRA); far from 0 (it did quantize), far below 1."""
    linear = nn.Linear(256, 128, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    w = linear.weight.detach().clone()
    model = P.convert_(nn.Sequential(linear), P.BasePrecision(base_dtype="nf4", compute_dtype="float32"))
    assert P.quantized_kind(model[0]) == "nf4" and model[0].weight.dtype == torch.uint8
    assert model[0].weight.numel() == w.numel() // 2  # two 4-bit codes per byte
    error = (P.dense_weight(model[0]).float() - w).norm() / w.norm()
    assert 0.05 < error < 0.12, error
    codes = len(torch.unique(P.dense_weight(model[0])[:, :64][0]))  # one block of one row
    assert codes <= 16


def test_int8_round_trip_is_within_half_a_step_of_each_rows_absmax():
    linear = nn.Linear(96, 40)
    w = linear.weight.detach().clone()
    model = P.convert_(nn.Sequential(linear), P.BasePrecision(base_dtype="int8"))
    assert P.quantized_kind(model[0]) == "int8"
    step = w.abs().amax(dim=1, keepdim=True) / 127  # LLM.int8's row-wise absmax scaling (of the float16 weight)
    assert ((P.dense_weight(model[0]) - w).abs() <= step / 2 + 2 ** -11 * w.abs() + 1e-7).all()
    assert not torch.equal(P.dense_weight(model[0]), w)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_float_base_is_cast_and_its_head_kept(dtype):
    model = llama()
    lk.load_base(model, dtype)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == getattr(torch, dtype)
    assert lk.precision_of(model) == dtype


def test_quantized_bases_keep_the_output_head_and_store_the_rest_in_the_compute_dtype():
    model = lk.load_base(llama(), "nf4")
    assert P.quantized_kind(model.model.layers[1].mlp.down_proj) == "nf4"
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16  # tied to embeddings
    assert model.model.norm.weight.dtype == torch.bfloat16 and lk.precision_of(model) == "nf4"


def test_gpt2_conv1d_layers_are_quantized_with_their_transposed_weight():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100))
    w = model.transformer.h[0].attn.c_attn.weight.detach().t().clone()  # Conv1D stores (in, out)
    lk.load_base(model, lk.BasePrecision(base_dtype="nf4", compute_dtype="float32"))
    layer = model.transformer.h[0].attn.c_attn
    assert P.quantized_kind(layer) == "nf4" and (layer.out_features, layer.in_features) == tuple(w.shape)
    assert (P.dense_weight(layer) - w).norm() / w.norm() < 0.12


# --- LoRA on a quantized base: the reference on the dequantized weights ----------------------------------
@pytest.mark.parametrize("dtype", ["nf4", "int8", "bfloat16"])
def test_lora_on_the_base_equals_the_reference_on_its_dense_weights(dtype):
    """y = base(x) + s * B A x; the adapter's part computed exactly as the reference computes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 32))
    compute = "float32" if dtype == "nf4" else "bfloat16"  # nf4 computing in float32: exact comparisons
    lk.load_base(model, lk.BasePrecision(base_dtype=dtype, compute_dtype=compute))
    lk.inject_(model, lk.LoraConfig(rank=4, alpha=8, targets=("0", "2")))
    randomize_(model, std=0.3)
    first, second = model[0], model[2]
    x = torch.randn(5, 64).to(P.FLOAT_DTYPES[compute if dtype != "bfloat16" else "bfloat16"])
    y = model(x)

    W1, W2 = P.dense_weight(first.base_layer).float(), P.dense_weight(second.base_layer).float()
    a1, a2 = first.adapters["default"], second.adapters["default"]
    hidden = torch.tanh(reference.linear(x.float(), W1, first.base_layer.bias.float(), a1.A, a1.B, a1.scale))
    expected = reference.linear(hidden, W2, second.base_layer.bias.float(), a2.A, a2.B, a2.scale)
    # nf4 computing in float32 is exact up to summation order; int8 also rounds its activations to int8 (LLM.int8)
    # and bfloat16 keeps 8 bits: their tolerances are a few of those rounding steps of the output's scale.
    tol = {"nf4": 1e-5, "int8": 3e-2, "bfloat16": 2e-2}[dtype] * expected.abs().max().item()
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=tol)

    y.float().square().sum().backward()
    A1, B1 = a1.A.detach().clone().requires_grad_(), a1.B.detach().clone().requires_grad_()
    h = torch.tanh(reference.linear(x.float(), W1, first.base_layer.bias.float(), A1, B1, a1.scale))
    reference.linear(h, W2, second.base_layer.bias.float(), a2.A.detach(), a2.B.detach(), a2.scale).square().sum().backward()
    grad_tol = {"nf4": 1e-4, "int8": 6e-2, "bfloat16": 4e-2}[dtype]
    for got, want in ((a1.A.grad, A1.grad), (a1.B.grad, B1.grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=grad_tol * want.abs().max().item())
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)  # the base stays frozen


def test_a_base_quantized_by_the_user_with_transformers_is_the_same_kind_of_layer(tmp_path):
    """QLoRA users quantize with transformers' BitsAndBytesConfig before inject_: lorakit adapts it alike."""
    llama().save_pretrained(tmp_path)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    assert lk.precision_of(model) == "nf4"
    lk.inject_(model, lk.LoraConfig(rank=4))
    with pytest.raises(lk.LoraError, match="quantized to nf4.*merge_dense_"):
        lk.merge_(model)


# --- merging ---------------------------------------------------------------------------------------------
def test_merge_on_a_quantized_base_is_refused_and_changes_nothing():
    model = lk.load_base(llama(), "nf4")
    lk.inject_(model, lk.LoraConfig(rank=4))
    randomize_(model)
    model(IDS)  # bitsandbytes repacks 4-bit weights for its CPU kernel on the first inference forward
    before = model(IDS).logits
    # (model.state_dict() would unpack them again, re-rounding double-quantized scales: read them densely)
    state = {name: P.dense_weight(m).clone() for name, m in model.named_modules() if P.is_quantized(m)}
    state |= {name: p.detach().clone() for name, p in model.named_parameters() if not P.is_quantized(p)}
    with pytest.raises(lk.LoraError, match=r"merge_: 'model.layers.0.self_attn.q_proj' and 3 more hold a base "
                                           r"quantized to nf4; .*unmerged.*lorakit merge --dtype bfloat16"):
        lk.merge_(model)
    with pytest.raises(lk.LoraError, match=r"unload_\(merge=True\)"):
        lk.unload_(model, merge=True)
    assert lk.merged_adapter(model) is None
    assert torch.equal(model(IDS).logits, before)
    after = {name: P.dense_weight(m) for name, m in model.named_modules() if P.is_quantized(m)}
    after |= {name: p.detach() for name, p in model.named_parameters() if not P.is_quantized(p)}
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_a_dense_merged_export_equals_the_unmerged_model_and_loads_in_plain_transformers(tmp_path):
    model = lk.load_base(llama(), lk.BasePrecision(base_dtype="nf4", compute_dtype="float32"))
    lk.inject_(model, lk.LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")))
    randomize_(model, std=0.2)
    # In training mode bitsandbytes computes with the dequantized float32 weight (in eval mode its CPU kernel
    # rounds through bfloat16), so the comparison below can be tight. The tiny Llama has no dropout.
    unmerged = model.train()(IDS).logits
    plain = lk.merge_dense_(model, torch.float32)
    assert not list(lk.lora_layers(plain)) and lk.precision_of(plain) == "float32"
    plain.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(IDS).logits, unmerged, rtol=0, atol=1e-4 * unmerged.abs().max().item())


def test_requantizing_a_merge_reports_its_error_and_rounds_to_what_nf4_stores():
    """Without double quantization the rounded weights are exactly what nf4 stores: quantizing them again
    changes nothing (with it, the block scales' own 8-bit rounding moves them by ~1e-5 relative)."""
    exact = lk.BasePrecision(base_dtype="nf4", compute_dtype="float32", double_quant=False)
    model = lk.load_base(llama(), exact)
    lk.inject_(model, lk.LoraConfig(rank=4))
    randomize_(model, std=0.2)
    plain = lk.merge_dense_(model, torch.float32)
    merged = plain.model.layers[0].self_attn.q_proj.weight.detach().clone()
    report = P.requantize_(plain, exact, keep=("lm_head",))
    assert report["layers"] == 2 * 7 and 0.01 < report["mean_relative_error"] <= report["max_relative_error"] < 0.2
    rounded = plain.model.layers[0].self_attn.q_proj.weight.detach()
    expected = (rounded - merged).norm() / merged.norm()
    assert expected <= report["max_relative_error"] + 1e-6 and expected > 0
    again = copy.deepcopy(plain)  # what nf4 stores is what it gives back: quantizing once more changes nothing
    P.requantize_(again, exact, keep=("lm_head",))
    assert torch.equal(again.model.layers[0].self_attn.q_proj.weight, rounded)


# --- files ------------------------------------------------------------------------------------------------
def test_an_adapter_trained_on_nf4_is_a_plain_peft_adapter_for_the_full_precision_base(tmp_path):
    peft = pytest.importorskip("peft")
    quantized = lk.load_base(llama(), "nf4")
    lk.inject_(quantized, lk.LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    randomize_(quantized, std=0.2)
    directory = lk.save_adapter(quantized, tmp_path / "adapter")
    assert lk.adapter_info(directory)["base_dtype"] == "nf4"

    theirs = peft.PeftModel.from_pretrained(llama(), directory).eval()
    ours = llama()
    with pytest.warns(UserWarning, match="trained on a nf4 base and this base is float32"):
        lk.load_adapter(ours, directory)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(lk.LoraError, match="trained on different base weights"):
        lk.load_adapter(llama(seed=5), directory)  # another model is still refused


# --- bad input --------------------------------------------------------------------------------------------
def test_bad_precisions_name_the_choices():
    with pytest.raises(lk.LoraError, match=r"base_dtype='int4': must be one of float32, bfloat16, float16, int8, nf4"):
        lk.BasePrecision(base_dtype="int4")
    with pytest.raises(lk.LoraError, match=r"block_size=100: must be one of 64, 128"):
        lk.BasePrecision(base_dtype="nf4", block_size=100)
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.LoraError, match="base_dtype='int4'"):
        lk.load_base(model, "int4")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_quantized_base_without_bitsandbytes_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    model = llama()
    types = [type(m) for m in model.modules()]
    with pytest.raises(lk.LoraError, match=r"base_dtype='nf4' needs bitsandbytes.*or choose one of float32, bfloat16"):
        lk.load_base(model, "nf4")
    assert [type(m) for m in model.modules()] == types


def test_the_base_precision_is_set_before_adapters_are_added():
    model = llama()
    lk.inject_(model, lk.LoraConfig(rank=2))
    with pytest.raises(lk.LoraError, match="before adding adapters"):
        lk.load_base(model, "nf4")


def test_a_device_bitsandbytes_cannot_quantize_on_is_named_and_the_model_unchanged():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    with pytest.raises(lk.LoraError, match=r"base_dtype='nf4': bitsandbytes quantizes on cpu, cuda, xpu, not on meta; "
                                           r"move the model there first .* or choose one of float32, bfloat16, float16"):
        lk.load_base(model, "nf4")
    assert [type(m) for m in model] == [nn.Linear, nn.Linear] and model[0].weight.dtype == torch.float32


# --- bfloat16 adapters ---------------------------------------------------------------------------------
def test_bfloat16_adapters_store_train_save_and_mix_in_bfloat16(tmp_path):
    """adapter_dtype='bfloat16': A, B, their gradients and the file are bfloat16; the output matches the
    float32 reference on the same values to bfloat16's rounding; they mix with float32 adapters."""
    model = lk.load_base(llama(), "bfloat16")
    lk.inject_(model, lk.LoraConfig(rank=4, adapter_dtype="bfloat16"), "low")
    lk.inject_(model, lk.LoraConfig(rank=2), "full")
    randomize_(model, std=0.2)
    part = model.model.layers[0].self_attn.q_proj.adapters["low"]
    assert part.A.dtype == part.B.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.adapters["full"].A.dtype == torch.float32

    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64).bfloat16()
    with lk.use(model, "low"):
        y = layer(x)
    W = layer.base_layer.weight.float()
    expected = reference.linear(x.float(), W, None, part.A.float(), part.B.float(), part.scale)
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=3e-2 * expected.abs().max().item())
    with lk.use(model, "low"):
        model(IDS).logits.float().square().mean().backward()
    assert part.A.grad.dtype == torch.bfloat16 and part.B.grad.abs().max() > 0

    directory = lk.save_adapter(model, tmp_path / "low", adapter="low")
    assert lk.adapter_info(directory)["dtypes"] == ["BF16"]
    other = lk.load_base(llama(), "bfloat16")
    lk.load_adapter(other, directory)
    assert other.model.layers[0].self_attn.q_proj.adapters["low"].A.dtype == torch.bfloat16

    names = ["low", "full", None]
    ids = IDS[:1].repeat(3, 1)
    with torch.no_grad(), lk.mixed_batch(model, names):
        mixed = model(ids).logits
    for row, name in enumerate(names):
        with torch.no_grad(), lk.use(model, name):
            alone = model(ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1].float(), alone.float(), rtol=0, atol=3e-2 * alone.abs().max().item())


def test_a_quantized_layer_cannot_be_a_module_to_save():
    model = lk.load_base(llama(), "nf4")
    with pytest.raises(lk.LoraError, match=r"modules_to_save: 'model.layers.0.mlp.down_proj' holds a quantized layer"):
        lk.inject_(model, lk.LoraConfig(rank=2, modules_to_save=("layers.0.mlp.down_proj",)))
    assert not list(lk.lora_layers(model))
