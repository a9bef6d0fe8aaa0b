"""lorakit.core.init: PiSSA and OLoRA start the adapter from W0 and leave the residual in the base.

Pinned to a reference written from the papers (below), to the real `peft` package both ways (the same A, B and
residual at injection; the same rank-2r plain LoRA file after training), and to the properties: a fresh adapter
is a no-op, merged == unmerged, unmerge restores W_res bit for bit, unload/delete give W0 back, and the saved
file on the original base reproduces the trained model.
"""
import copy
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.core.init import plain_config, principal_factors, restored_weight
from lorakit.core.lowrank import delta_weight
from lorakit.core.precision import convert_
from lorakit.io.adapter_files import read_adapter
from lorakit.training.train import train
from lorakit.zoo import load_task_model
from test_peft_interop import MODELS, ids_for, output, randomise_trainable_
from test_train import config as run_config, lm_dir, text_file  # noqa: F401 (fixtures)

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 outputs: W_res + s*B0@A0 is W0 to rounding
EFFECT = 1e-2  # trained adapters move outputs by far more than TOL


# --- the reference, from the papers ------------------------------------------------------------------------
def reference_pissa(W: torch.Tensor, r: int, s: float):
    """Meng et al. 2024, eq. 2-3: W = U S V^T; A = S_r^1/2 V_r^T, B = U_r S_r^1/2 (here with the LoRA scale s
    divided out of S_r, so that s * B @ A is the principal part); W_res = U_[r:] S_[r:] V_[r:]^T."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    root = (S[:r] / s).sqrt()
    return torch.diag(root) @ Vh[:r], U[:, :r] @ torch.diag(root), U[:, r:] @ torch.diag(S[r:]) @ Vh[r:]


def reference_olora(W: torch.Tensor, r: int, s: float):
    """Büyükakyüz 2024, alg. 1: W = Q R; B = Q[:, :r], A = R[:r]; W_res = W - s * B @ A."""
    Q, R = torch.linalg.qr(W.double())
    return R[:r], Q[:, :r], W.double() - s * Q[:, :r] @ R[:r]


REFERENCES = {"pissa": reference_pissa, "olora": reference_olora}


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_factors_and_residual_follow_the_papers(init, shape):
    torch.manual_seed(0)
    W, r, s = torch.randn(shape), 4, 0.5
    A, B = principal_factors(W, r, s, init)
    A_ref, B_ref, residual = REFERENCES[init](W, r, s)
    # singular vectors and Q's columns are defined up to sign: compare the products, and each factor's norms
    close = dict(rtol=1e-4, atol=1e-4)  # float32 against float64: subspaces agree to eps / singular-value gap
    torch.testing.assert_close((B @ A).double(), B_ref @ A_ref, **close)
    torch.testing.assert_close(A.double().norm(dim=1), A_ref.norm(dim=1), **close)
    torch.testing.assert_close(B.double().norm(dim=0), B_ref.norm(dim=0), **close)
    torch.testing.assert_close(W.double() - s * (B @ A).double(), residual, **close)
    if init == "olora":  # B's columns orthonormal, A upper triangular
        torch.testing.assert_close(B.t() @ B, torch.eye(r), rtol=0, atol=1e-5)
        assert torch.equal(A[:, :r], A[:, :r].triu())


def test_randomized_svd_is_deterministic_and_close_to_the_exact_one():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64))
    V, _ = torch.linalg.qr(torch.randn(96, 64))
    W = U @ torch.diag(torch.cat([torch.tensor([10.0, 8, 6, 4]), 0.01 * torch.rand(60)])) @ V.t()  # a clear rank-4 part
    state = torch.get_rng_state()
    first, second = principal_factors(W, 4, 2.0, "pissa", niter=4), principal_factors(W, 4, 2.0, "pissa", niter=4)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    exact = principal_factors(W, 4, 2.0, "pissa")
    torch.testing.assert_close(first[1] @ first[0], exact[1] @ exact[0], rtol=1e-3, atol=1e-3)


# --- the model at injection ---------------------------------------------------------------------------------
# (model, targets); every adapted layer's W0 is changed to its residual
SHAPES = {"gpt2": ("c_attn", "c_proj", "c_fc"), "llama": ("q_proj", "v_proj", "down_proj"), "bert": ("query", "dense")}
INITS = [("pissa", 0), ("olora", 0), ("pissa", 2)]


def injected(kind: str, init: str, niter: int = 0, **changes):
    base = MODELS[kind]()
    model = copy.deepcopy(base)
    config = lk.LoraConfig(**{"rank": 4, "alpha": 8, "targets": SHAPES[kind], "init": init, "init_niter": niter,
                              **changes})
    lk.inject_(model, config)
    return base, model, config


@pytest.mark.parametrize("init,niter", INITS, ids=["pissa", "olora", "pissa-niter2"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_a_fresh_adapter_leaves_the_output_as_the_base_gives_it(kind, init, niter):
    base, model, _ = injected(kind, init, niter)
    ids = ids_for(base)
    torch.testing.assert_close(output(model, ids), output(base, ids), **TOL)
    for path, layer in lk.lora_layers(model):
        original = base.get_submodule(path).weight
        assert not torch.allclose(layer.base_layer.weight, original, atol=1e-3)  # the base holds the residual
        torch.testing.assert_close(layer.user_weight, original, rtol=0, atol=2 * torch.finfo().eps * original.abs().max().item())


def peft_model(base, config: lk.LoraConfig, kind: str, init: str):
    targets = list(config.targets)
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=targets, fan_in_fan_out=kind == "gpt2",
        init_lora_weights=init, use_rslora=config.rslora, rank_pattern=dict(config.rank_pattern)))


def peft_layer(pm, path):
    return pm.base_model.model.get_submodule(path)


# PEFT's olora_init factors Conv1D's stored (d_in, d_out) weight without transposing it: its A then has
# d_out columns, the wrong shape for GPT-2's non-square c_attn/c_fc, so GPT-2 is compared for PiSSA only.
@pytest.mark.parametrize("kind,init", [("gpt2", "pissa"), ("llama", "pissa"), ("llama", "olora"), ("bert", "pissa"),
                                       ("bert", "olora")])
def test_the_same_factors_and_residual_as_peft(kind, init):
    base, model, config = injected(kind, init)
    pm = peft_model(base, config, kind, init)
    for path, layer in lk.lora_layers(model):
        theirs, ours = peft_layer(pm, path), layer.adapters["default"]
        torch.testing.assert_close(ours.A, theirs.lora_A["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.B, theirs.lora_B["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.base_layer.weight, theirs.base_layer.weight, rtol=0, atol=1e-6)


# --- saving: the plain rank-2r LoRA PEFT writes ---------------------------------------------------------------
def trained_pair(kind: str, init: str, tmp_path, **changes):
    """PEFT and lorakit injected alike, PEFT's initial adapter saved, both given the same 'trained' A and B."""
    base, model, config = injected(kind, init, **changes)
    pm = peft_model(base, config, kind, init)
    pm.save_pretrained(tmp_path / "initial")
    randomise_trainable_(pm, seed=5)
    with torch.no_grad():
        for path, layer in lk.lora_layers(model):
            layer.adapters["default"].A.copy_(peft_layer(pm, path).lora_A["default"].weight)
            layer.adapters["default"].B.copy_(peft_layer(pm, path).lora_B["default"].weight)
    return base, model, config, pm


@pytest.mark.parametrize("kind,init,changes", [
    ("gpt2", "pissa", {}), ("llama", "olora", {}), ("bert", "pissa", {}),
    ("llama", "pissa", {"rslora": True}), ("llama", "pissa", {"rank_pattern": {"v_proj": 2}}),
], ids=["gpt2-pissa", "llama-olora", "bert-pissa", "llama-rslora", "llama-rank-pattern"])
@pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights")  # PEFT, converting: as meant
def test_the_saved_file_is_peft_s_conversion_and_works_on_the_original_base(kind, init, changes, tmp_path):
    base, model, config, pm = trained_pair(kind, init, tmp_path, **changes)
    ids = ids_for(base)
    trained = output(model, ids)
    torch.testing.assert_close(trained, output(pm, ids), **TOL)
    assert (trained - output(base, ids)).abs().max() > EFFECT
    pm.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    lk.save_adapter(model, tmp_path / "ours")
    theirs, ours = load_file(tmp_path / "peft" / "adapter_model.safetensors"), \
        load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)  # the same concatenation
    raw_theirs, raw_ours = (read_adapter(tmp_path / d)[0] for d in ("peft", "ours"))
    assert (raw_ours["r"], raw_ours["init_lora_weights"]) == (raw_theirs["r"], True) == (2 * config.rank, True)
    assert raw_ours["lora_alpha"] == pytest.approx(raw_theirs["lora_alpha"])
    assert {k.split(".")[-1]: v for k, v in raw_ours["rank_pattern"].items()} == raw_theirs["rank_pattern"]
    # ... onto the original, untouched base: lorakit (the fingerprint accepts ours; PEFT's file too) and PEFT give
    # the trained outputs
    for folder in ("ours", "peft"):
        fresh = copy.deepcopy(base)
        lk.load_adapter(fresh, tmp_path / folder)
        torch.testing.assert_close(output(fresh, ids), trained, **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(output(loaded, ids), trained, **TOL)


def test_plain_config_keeps_every_module_s_scale():
    config = lk.LoraConfig(rank=4, alpha=8, targets=("q", "v"), init="pissa", rank_pattern={"v": 2},
                           alpha_pattern={"q": 3})
    for rslora in (False, True):
        original = config.replace(rslora=rslora)
        plain = plain_config(original)
        assert plain.init == "default" and plain.rank == 8 and plain.rank_for("v") == 4
        for path in ("q", "v"):
            assert plain.scale_for(path) == pytest.approx(original.scale_for(path), rel=1e-12)


# --- merge, unmerge, unload, delete, disable --------------------------------------------------------------------
def test_merge_unmerge_unload_and_delete(tmp_path):
    base, model, _, _ = trained_pair("llama", "pissa", tmp_path)
    ids = ids_for(base)
    unmerged = output(model, ids)
    residuals = {p: layer.base_layer.weight.clone() for p, layer in lk.lora_layers(model)}
    lk.merge_(model)
    torch.testing.assert_close(output(model, ids), unmerged, **TOL)
    for path, layer in lk.lora_layers(model):  # merged weight = W_res + s * B @ A
        adapter = layer.adapters["default"]
        torch.testing.assert_close(layer.base_layer.weight,
                                   residuals[path] + adapter.scale * adapter.B @ adapter.A, rtol=0, atol=1e-6)
    lk.unmerge_(model)
    assert all(torch.equal(layer.base_layer.weight, residuals[p]) for p, layer in lk.lora_layers(model))
    with lk.disabled(model):  # the user's base, not the residual model
        torch.testing.assert_close(output(model, ids), output(base, ids), **TOL)
    with lk.use(model, None):
        torch.testing.assert_close(output(model, ids), output(base, ids), **TOL)
    deleted = copy.deepcopy(model)
    lk.delete_adapter(deleted, "default")
    unloaded = lk.unload_(copy.deepcopy(model), merge=False)
    merged = lk.unload_(copy.deepcopy(model), merge=True)
    torch.testing.assert_close(output(merged, ids), unmerged, **TOL)
    for restored in (deleted, unloaded):  # W0 back, to one unit in the last place
        assert not any(isinstance(m, lk.LoraLayer) for m in restored.modules())
        for (name, got), want in zip(restored.named_parameters(), base.parameters()):
            torch.testing.assert_close(got, want, rtol=0, atol=torch.finfo().eps * want.abs().max().item())
        torch.testing.assert_close(output(restored, ids), output(base, ids), **TOL)


def test_restored_weight_is_w0_to_the_residual_s_rounding():
    torch.manual_seed(0)
    W = torch.randn(96, 64) * 0.05
    A, B = principal_factors(W, 8, 2.0, "pissa")
    residual = W - delta_weight(A, B, 2.0)
    back = restored_weight(residual, A, B, 2.0)
    larger = torch.maximum(W.abs(), residual.abs())
    ulp = torch.nextafter(larger, torch.tensor(math.inf)) - larger
    assert ((back - W).abs() <= ulp).all()
    assert (back == W).float().mean() > 0.7  # most entries exactly


# --- several adapters, mixed batches, and what cannot be done: clear errors ---------------------------------
def test_a_residual_adapter_is_the_model_s_only_adapter(tmp_path):
    base, model, _ = injected("llama", "pissa")
    with pytest.raises(lk.LoraError, match=r"holds adapter 'default' \(init='pissa'\).*delete_adapter"):
        lk.inject_(model, lk.LoraConfig(targets=("k_proj",)), "other")
    plain = copy.deepcopy(base)
    lk.inject_(plain, lk.LoraConfig(targets=("k_proj",)))
    lk.save_adapter(plain, tmp_path / "plain")
    with pytest.raises(lk.LoraError, match="holds adapter 'default'"):
        lk.load_adapter(model, tmp_path / "plain", adapter="other")
    with pytest.raises(lk.LoraError, match=r"init='olora': the model already holds adapter\(s\) \['default'\]"):
        lk.inject_(plain, lk.LoraConfig(targets=("q_proj",), init="olora"), "other")
    with pytest.raises(lk.LoraError, match="mixed_batch: .* init='pissa'"):
        with lk.mixed_batch(model, ["default", None]):
            pass


@pytest.mark.parametrize("changes,message", [
    ({"targets": ("embed_tokens",)}, r"init='pissa': 'model.embed_tokens' is a Embedding; .* Linear and Conv1D"),
    ({"rank": 40}, r"rank for 'model.layers.0.self_attn.v_proj' is 40, above the weight's smaller side 32"),
])
def test_unsupported_layers_and_ranks_are_refused(changes, message):
    model = MODELS["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.LoraError, match=message):
        lk.inject_(model, lk.LoraConfig(**{"targets": ("q_proj", "v_proj"), "init": "pissa", **changes}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_a_quantized_base_is_refused():
    pytest.importorskip("bitsandbytes")
    model = convert_(torch.nn.Sequential(torch.nn.Linear(32, 32)), lk.BasePrecision(base_dtype="int8"))
    with pytest.raises(lk.LoraError, match=r"init='olora': '0' is quantized; .*base_dtype"):
        lk.inject_(model, lk.LoraConfig(targets=("0",), init="olora"))


def test_init_niter_is_validated():
    with pytest.raises(lk.LoraError, match=r"init_niter=2 with init='olora'"):
        lk.LoraConfig(init="olora", init_niter=2)
    with pytest.raises(lk.LoraError, match=r"init_niter=-1: must be an integer >= 0"):
        lk.LoraConfig(init="pissa", init_niter=-1)


# --- training end to end ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_training_resumes_exactly_and_its_adapter_works_on_the_original_base(lm_dir, text_file, tmp_path, init):
    whole = train(run_config(lm_dir, text_file, tmp_path / "whole", init=init, rank=4, alpha=8, steps=6, save_every=3))
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-3", resumed_dir / "checkpoints" / "step-3")
    (resumed_dir / "checkpoints" / "latest").write_text("step-3\n")
    shutil.copy(tmp_path / "whole" / "log.jsonl", resumed_dir / "log.jsonl")
    resumed = train(run_config(lm_dir, text_file, resumed_dir, init=init, rank=4, alpha=8, steps=6, save_every=3,
                                resume=str(resumed_dir)))
    # the same residual base (recomputed from the original weights) and the same adapter as the uninterrupted run
    for (path, ours), (_, theirs) in zip(lk.lora_layers(resumed.model), lk.lora_layers(whole.model)):
        assert torch.equal(ours.base_layer.weight, theirs.base_layer.weight), path
    expected, got = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "whole", resumed_dir))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)
    assert read_adapter(resumed_dir / "adapter")[0]["r"] == 8  # rank 2r: the plain LoRA for the original base
    # the saved adapter on a freshly loaded original base reproduces the trained model
    fresh = load_task_model(str(lm_dir), "causal-lm", None)
    lk.load_adapter(fresh, tmp_path / "whole" / "adapter")
    ids = torch.randint(6, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained, loaded = whole.model(input_ids=ids).logits, fresh.eval()(input_ids=ids).logits
        plain = load_task_model(str(lm_dir), "causal-lm", None).eval()(input_ids=ids).logits
    torch.testing.assert_close(loaded, trained, **TOL)
    assert (trained - plain).abs().max() > EFFECT

