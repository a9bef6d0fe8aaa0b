"""DoRA (Liu et al., 2024) against a reference written from the paper (tests/reference.py) and the real
`peft` package: forward and gradients, merge, files both ways, mixed batches, quantized bases, errors."""
import copy
import json
import warnings

import pytest
import torch
import transformers
from torch import nn

import lorakit as lk
import reference
from lorakit.core.layers import DoraAdapter, LoraAdapter
from test_peft_interop import MODELS, ids_for, output, peft_warnings

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)


def adapted(model, config, name="default", seed=1, std=0.3):
    """`model` with a DoRA (or plain) adapter whose B and magnitude are random, as training would leave them."""
    lk.inject_(model, config, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            if layer.holds(name):
                part = layer.adapters[name]
                part.B.normal_(std=std, generator=g)
                if isinstance(part, DoraAdapter):
                    part.magnitude.mul_(1 + 0.2 * torch.rand(part.magnitude.shape, generator=g))
    return model


def reference_params(layer, name="default"):
    part = layer.adapters[name]
    return [t.detach().clone().requires_grad_() for t in (part.A, part.B, part.magnitude)]


# --- the math -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_gradients_equal_the_papers_formula(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(24, 16))
        weight = lambda base: base.weight  # noqa: E731
    else:
        model = nn.Sequential(transformers.pytorch_utils.Conv1D(16, 24))
        nn.init.normal_(model[0].bias)
        weight = lambda base: base.weight.t()  # noqa: E731  (stored (in, out))
    adapted(model, lk.LoraConfig(rank=4, alpha=8, targets=("0",), dora=True, bias="lora_only"))
    layer = model[0]
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = model(x)
    y.square().sum().backward()
    A, B, m = reference_params(layer)
    x_ref, b = x.detach().clone().requires_grad_(), layer.base_layer.bias.detach().clone().requires_grad_()
    want = reference.dora_linear(x_ref, weight(layer.base_layer).detach(), b, A, B, layer.adapters["default"].scale, m)
    torch.testing.assert_close(y, want, **TOL)
    want.square().sum().backward()
    part = layer.adapters["default"]
    for got, expected in ((part.A.grad, A.grad), (part.B.grad, B.grad), (part.magnitude.grad, m.grad),
                          (layer.base_layer.bias.grad, b.grad), (x.grad, x_ref.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_fresh_adapter_is_a_no_op_and_its_magnitude_is_the_weights_row_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 8))
    x = torch.randn(4, 24)
    before = model(x)
    lk.inject_(model, lk.LoraConfig(rank=4, targets=("0", "2"), dora=True))
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    magnitude = model[0].adapters["default"].magnitude
    torch.testing.assert_close(magnitude, torch.linalg.norm(model[0].base_layer.weight, dim=1))
    assert magnitude.requires_grad and isinstance(model[0].adapters["default"], DoraAdapter)


def test_merge_equals_unmerged_and_unmerge_restores_the_weights_bit_for_bit():
    torch.manual_seed(0)
    model = adapted(nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 8)),
                    lk.LoraConfig(rank=4, targets=("0", "2"), dora=True))
    x = torch.randn(4, 24)
    weights = [model[i].base_layer.weight.detach().clone() for i in (0, 2)]
    unmerged = model(x)
    lk.merge_(model)
    torch.testing.assert_close(model(x), unmerged, **TOL)
    lk.unmerge_(model)
    assert all(torch.equal(model[i].base_layer.weight, w) for i, w in zip((0, 2), weights))
    dense = lk.merge_dense_(copy.deepcopy(model), torch.float32)
    torch.testing.assert_close(dense(x), unmerged, **TOL)
    torch.testing.assert_close(lk.unload_(model, merge=True)(x), unmerged, **TOL)


def test_the_effective_update_is_the_merged_weight_minus_w0():
    torch.manual_seed(0)
    model = adapted(nn.Sequential(nn.Linear(24, 16)), lk.LoraConfig(rank=4, targets=("0",), dora=True))
    layer = model[0]
    A, B, m = reference_params(layer)
    W = layer.base_layer.weight.detach()
    want = reference.dora_weight(W.double(), A.double(), B.double(), layer.adapters["default"].scale, m.double()) - W
    torch.testing.assert_close(layer.effective_delta("default"), want.detach(), rtol=1e-6, atol=1e-6)
    from lorakit.analysis.measures import model_updates
    update = model_updates(model)["0"]
    assert update.kind == "dora" and update.rank == 4


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_training_mode_follows_peft_also_with_dropout(p):
    """Same seed, same dropout masks: lorakit's train-mode output and gradients equal PEFT's (PEFT runs the
    base again on the dropped input)."""
    base = MODELS["llama"]()
    lk_model = adapted(copy.deepcopy(base), lk.LoraConfig(rank=4, alpha=8, dropout=p, targets=("q_proj", "v_proj"),
                                                          dora=True))
    peft_model = to_peft(base, lk_model)
    ids = ids_for(base)
    results = []
    for model in (lk_model, peft_model):
        model.train()
        torch.manual_seed(5)
        out = model(input_ids=ids).logits
        out.square().mean().backward()
        results.append((out, trainable_grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --- PEFT, both ways ------------------------------------------------------------------------------------
DORA_CASES = {"gpt2": ("c_attn", "c_proj"), "llama": ("q_proj", "v_proj", "down_proj"), "bert": ("query", "value")}


def to_peft(base, lk_model, tmp=None):
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        lk.save_adapter(lk_model, directory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory, is_trainable=True)
        assert peft_warnings(caught) == []
    return model


def trainable_grads(model):
    """Gradients of A, B, m in module order (PEFT names them lora_A/lora_B/lora_magnitude_vector)."""
    return [p.grad for _, p in sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                                      key=lambda item: _order_key(item[0]))]


def _order_key(name: str):
    for i, tag in enumerate(("lora_A", "lora_B", "lora_magnitude_vector", ".A", ".B", ".magnitude")):
        if tag in name:
            path = name.split(".lora_")[0].removeprefix("base_model.model.") if i < 3 else name.split(".adapters.")[0]
            return path, i % 3
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(DORA_CASES))
def test_lorakit_trains_like_peft_and_its_files_load_in_peft(name, tmp_path):
    base = MODELS[name]()
    config = lk.LoraConfig(rank=4, alpha=8, targets=DORA_CASES[name], dora=True)
    lk_model = adapted(copy.deepcopy(base), config, std=0.1)
    peft_model = to_peft(base, lk_model)
    ids = ids_for(base)
    models = (lk_model, peft_model)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for step in range(3):
        grads = []
        for model, optimizer in zip(models, optimizers):
            model.eval()  # no dropout: the same step in both
            optimizer.zero_grad()
            output_of(model, ids).square().mean().backward()
            grads.append(trainable_grads(model))
            optimizer.step()
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Adam divides by sqrt(v): float rounding between the libraries grows a little over steps
    torch.testing.assert_close(output(lk_model, ids), output(peft_model, ids), rtol=1e-3, atol=1e-3)
    assert (output(lk_model, ids) - output(base, ids)).abs().max() > 1e-2
    # lorakit's trained adapter, read by PEFT, and PEFT's written adapter, read by lorakit
    torch.testing.assert_close(output(to_peft(base, lk_model), ids), output(lk_model, ids), **TOL)
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    loaded = copy.deepcopy(base)
    lk.load_adapter(loaded, tmp_path)
    torch.testing.assert_close(output(loaded, ids), output(peft_model, ids), **TOL)
    assert all(isinstance(layer.adapters["default"], DoraAdapter) for _, layer in lk.lora_layers(loaded))


def output_of(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_save_load_round_trips_and_a_plain_module_is_not_reused_for_dora(tmp_path):
    base = MODELS["llama"]()
    ids = ids_for(base)
    model = adapted(copy.deepcopy(base), lk.LoraConfig(rank=4, targets=("q_proj",), dora=True))
    want = output(model, ids)
    lk.save_adapter(model, tmp_path / "dora")
    again = copy.deepcopy(base)
    lk.inject_(again, lk.LoraConfig(rank=4, targets=("q_proj",)), "plain")
    lk.load_adapter(again, tmp_path / "dora", "dora")
    with lk.use(again, "dora"):
        torch.testing.assert_close(output(again, ids), want, rtol=0, atol=0)
    parts = lk.delete_adapter(again, "plain")
    lk.load_adapter(again, tmp_path / "dora", "d2", reuse=parts)  # a plain module cannot hold a DoRA adapter
    assert all(type(layer.adapters["d2"]) is DoraAdapter for _, layer in lk.lora_layers(again))
    assert not any(layer.adapters["d2"] is part for part in parts.values() for _, layer in lk.lora_layers(again))
    parts = lk.delete_adapter(again, "d2")  # and a DoRA module is reused for a DoRA adapter
    lk.load_adapter(again, tmp_path / "dora", "d3", reuse=parts)
    assert {id(layer.adapters["d3"]) for _, layer in lk.lora_layers(again)} == {id(p) for p in parts.values()}
    with lk.use(again, "d3"):
        torch.testing.assert_close(output(again, ids), want, rtol=0, atol=0)
    from lorakit.io.adapter_files import adapter_info  # what `lorakit inspect` shows
    assert adapter_info(tmp_path / "dora")["config"]["dora"] is True


# --- mixed batches ---------------------------------------------------------------------------------------
def test_a_mixed_batch_of_dora_plain_and_none_equals_each_alone():
    base = MODELS["gpt2"]()
    model = adapted(copy.deepcopy(base), lk.LoraConfig(rank=4, targets=("c_attn",), dora=True), "dora")
    adapted(model, lk.LoraConfig(rank=2, targets=("c_attn", "c_fc")), "plain", seed=2)
    ids = ids_for(base)[:1].repeat(3, 1) + torch.arange(3)[:, None]
    names = ["dora", "plain", None]
    with lk.mixed_batch(model, names):
        mixed = output_of(model, ids)
    mixed.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    alone = []
    for i, name in enumerate(names):
        if name is None:
            with lk.disabled(model):
                alone.append(output_of(model, ids[i:i + 1]))
        else:
            with lk.use(model, name):
                alone.append(output_of(model, ids[i:i + 1]))
    torch.cat(alone).square().sum().backward()
    torch.testing.assert_close(mixed, torch.cat(alone), **TOL)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), lk.mixed_batch(model, names):  # inference: the cached stacks
        torch.testing.assert_close(output_of(model, ids), torch.cat(alone), **TOL)


# --- quantized bases --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["nf4", "int8"])
def test_dora_on_a_quantized_base_equals_the_reference_on_its_dense_weights(dtype):
    pytest.importorskip("bitsandbytes")
    from lorakit.core import precision as P
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    compute = "float32" if dtype == "nf4" else "bfloat16"
    lk.load_base(model, lk.BasePrecision(base_dtype=dtype, compute_dtype=compute))
    adapted(model, lk.LoraConfig(rank=4, alpha=8, targets=("0",), dora=True))
    layer = model[0]
    x = torch.randn(5, 64).to(P.FLOAT_DTYPES[compute])
    y = model(x)
    W = P.dense_weight(layer.base_layer).float()
    A, B, m = reference_params(layer)
    want = reference.dora_linear(x.float(), W, layer.base_layer.bias.float(), A, B, layer.adapters["default"].scale, m)
    tol = {"nf4": 1e-5, "int8": 3e-2}[dtype] * want.abs().max().item()
    torch.testing.assert_close(y.float(), want, rtol=0, atol=tol)
    y.float().square().sum().backward()
    want.square().sum().backward()
    part = layer.adapters["default"]
    grad_tol = {"nf4": 1e-4, "int8": 6e-2}[dtype]
    for got, expected in ((part.A.grad, A.grad), (part.B.grad, B.grad), (part.magnitude.grad, m.grad)):
        torch.testing.assert_close(got, expected, rtol=0, atol=grad_tol * expected.abs().max().item())


# --- errors -----------------------------------------------------------------------------------------------
def test_config_rejects_a_non_bool():
    with pytest.raises(lk.LoraError, match="dora='yes': must be True or False"):
        lk.LoraConfig(dora="yes")


@pytest.mark.parametrize("module, kind", [(nn.Embedding(10, 8), "Embedding"), (nn.Conv2d(3, 4, 3), "Conv2d")])
def test_dora_on_embeddings_and_convolutions_is_refused_naming_the_module(module, kind):
    model = nn.Sequential(module, nn.Linear(8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lk.LoraError, match=rf"'0' is a {kind}; DoRA .* Linear and Conv1D .* exclude it .*dora=False"):
        lk.inject_(model, lk.LoraConfig(rank=4, targets=("0", "1"), dora=True))
    assert not list(lk.lora_layers(model)) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def dora_file(tmp_path, edit):
    base = MODELS["llama"]()
    model = adapted(copy.deepcopy(base), lk.LoraConfig(rank=4, targets=("q_proj",), dora=True))
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)  # no lorakit metadata: read as PEFT's file
    return base


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
     r"missing key '.*layers.0.self_attn.q_proj.lora_magnitude_vector' \(shape \[64\]\)"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(3)}),
     r"lora_magnitude_vector' has shape \[3\], the model needs \[64\]"),
])
def test_a_dora_file_with_a_bad_magnitude_is_refused_and_the_model_untouched(tmp_path, edit, message):
    base = dora_file(tmp_path, edit)
    before = copy.deepcopy(base)
    with pytest.raises(lk.LoraError, match=message):
        lk.load_adapter(base, tmp_path)
    assert not list(lk.lora_layers(base)) and str(base) == str(before)


def test_a_magnitude_in_a_plain_file_is_refused(tmp_path):
    base = dora_file(tmp_path, lambda t: None)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(lk.LoraError, match=r"unexpected key '.*q_proj.lora_magnitude_vector'"):
        lk.load_adapter(base, tmp_path)


def test_export_for_vllm_refuses_dora_and_analysis_of_the_folder_alone_says_why(tmp_path):
    dora_file(tmp_path / "a", lambda t: None)
    from lorakit.io.export import servability
    reasons = servability(tmp_path / "a")
    assert reasons[0].field == "use_dora" and not reasons[0].fixable and "lorakit merge" in reasons[0].text
    assert len(reasons) == 1  # the magnitude vectors are not reported as modules saved in full
    from lorakit.io.adapter_files import read_factors
    with pytest.raises(lk.LoraError, match="DoRA adapter .*--base MODEL"):
        read_factors(tmp_path / "a")
