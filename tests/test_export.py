"""lorakit.io.export: what vLLM/LoRAX cannot serve as is, and the servable copy, checked against the real
`peft` package (which, given the copy, applies one scale to every module) and lorakit on the original."""
import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open

import lorakit as lk
from lorakit.errors import LoraError
from lorakit.io.adapter_files import read_factors
from test_adapter_files import trained
from test_cli import ok, run
from test_peft_interop import EFFECT, TOL, gpt2, ids_for, llama, output, peft, peft_warnings, randomise_trainable_

META = {"lorakit_task": "causal-lm", "lorakit_base_model": "tiny"}
# (model, LoraConfig): per-module ranks and alphas under rslora, on Conv1D (GPT-2) and Linear (Llama) layers
PATTERNED = {
    "gpt2": (gpt2, lk.LoraConfig(rank=4, alpha=8, targets=("c_attn", "c_proj", "c_fc"), rslora=True,
                                 rank_pattern={"c_fc": 2, "h.1.attn.c_attn": 6}, alpha_pattern={"c_proj": 3})),
    "llama": (llama, lk.LoraConfig(rank=4, alpha=8, targets="all-linear", rslora=True,
                                   rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                                   alpha_pattern={"o_proj": 32, "layers.0.mlp.up_proj": 3})),
}


def saved(tmp_path, base, config: lk.LoraConfig, seed: int = 2, name: str = "src"):
    """`config` on a copy of `base`, every trainable tensor randomised (as training would), saved."""
    model = copy.deepcopy(base)
    lk.inject_(model, config)
    model.eval()
    randomise_trainable_(model, seed)
    return lk.save_adapter(model, tmp_path / name, metadata=META)


def lorakit_output(base, adapter, ids) -> torch.Tensor:
    model = copy.deepcopy(base)
    lk.load_adapter(model, adapter)
    return output(model, ids)


def fields(reasons) -> dict[str, bool]:
    return {r.field: r.fixable for r in reasons}


# --- (a) the copy computes what the original does, in PEFT and in lorakit ---------------------------------
@pytest.mark.parametrize("case", list(PATTERNED))
def test_exported_patterns_and_rslora_load_in_peft_with_the_originals_outputs(case, tmp_path):
    make, config = PATTERNED[case]
    base = make()
    ids = ids_for(base)
    source = saved(tmp_path, base, config)
    expected = lorakit_output(base, source, ids)  # the reference: lorakit with the original adapter
    assert (expected - output(base, ids)).abs().max() > EFFECT
    assert fields(lk.servability(source)) == {"rank_pattern": True, "alpha_pattern": True}

    out = lk.export_adapter(source, tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    assert peft_warnings(caught) == []
    layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(layers) == len(read_factors(source))
    assert {(m.r["default"], m.scaling["default"]) for m in layers} == {(6, 1.0)}  # one rank, one scale
    torch.testing.assert_close(output(theirs, ids), expected, **TOL)
    torch.testing.assert_close(lorakit_output(base, out, ids), expected, **TOL)  # and back into lorakit
    assert lk.servability(out) == []


def test_a_peft_written_adapter_exports_too(tmp_path):
    base = llama()
    ids = ids_for(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                             rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 2})
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randomise_trainable_(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "src")
    out = lk.export_adapter(tmp_path / "src", tmp_path / "out")
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    torch.testing.assert_close(output(served, ids), output(theirs, ids), **TOL)
    torch.testing.assert_close(output(served, ids), lorakit_output(base, tmp_path / "src", ids), **TOL)


# --- (b) the copy is a plain PEFT adapter ----------------------------------------------------------------
def test_the_exported_config_has_one_rank_alpha_equal_to_it_and_nothing_else(tmp_path):
    make, config = PATTERNED["gpt2"]
    source = saved(tmp_path, make(), config)
    out = lk.export_adapter(source, tmp_path / "out")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["r"] == 6 and written["lora_alpha"] == written["r"]
    assert (written["rank_pattern"], written["alpha_pattern"], written["bias"]) == ({}, {}, "none")
    assert (written["use_rslora"], written["modules_to_save"], written["use_dora"]) == (False, None, False)
    assert written["target_modules"] == ["c_attn", "c_fc", "c_proj"] and written["fan_in_fan_out"] is True
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f, \
            safe_open(str(source / "adapter_model.safetensors"), framework="pt") as g:
        assert set(f.keys()) == set(g.keys())  # the same modules' A and B, nothing else
        assert {f.get_slice(k).get_shape()[0 if "lora_A" in k else 1] for k in f.keys()} == {6}
        meta, original = f.metadata(), g.metadata()
    kept = ("lorakit_task", "lorakit_base_model", "lorakit_adapter", "lorakit_base_fingerprint", "lorakit_base_dtype")
    assert {k: meta[k] for k in kept} == {k: original[k] for k in kept}
    assert "lorakit_config" not in meta and meta["lorakit_checksum"] != original["lorakit_checksum"]


def test_factors_are_padded_with_zeros_and_b_carries_the_modules_scale(tmp_path):
    make, config = PATTERNED["llama"]
    source = saved(tmp_path, make(), config)
    before, after = read_factors(source), read_factors(lk.export_adapter(source, tmp_path / "out"))
    for path, (A, B, scale) in before.items():
        A2, B2, scale2 = after[path]
        r = A.shape[0]
        assert scale2 == 1.0 and torch.equal(A2[:r], A) and not A2[r:].any() and not B2[:, r:].any()
        torch.testing.assert_close(B2[:, :r], scale * B, rtol=1e-6, atol=0)


# --- (c) refusals ----------------------------------------------------------------------------------------
def refused(tmp_path, source, *fragments) -> None:
    """export raises naming `fragments` and leaves no output folder, nor any temporary one."""
    before = sorted(tmp_path.iterdir())
    with pytest.raises(LoraError) as caught:
        lk.export_adapter(source, tmp_path / "out")
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))
    assert sorted(tmp_path.iterdir()) == before


def test_modules_to_save_are_refused(tmp_path):
    source = saved(tmp_path, gpt2(), lk.LoraConfig(rank=4, targets=("c_attn",), modules_to_save=("ln_f",)))
    refused(tmp_path, source, "modules_to_save=['transformer.ln_f']", "Export cannot fix this", "lorakit merge")


def test_nonzero_biases_are_refused(tmp_path):
    source = saved(tmp_path, gpt2(), lk.LoraConfig(rank=4, targets=("c_attn",), bias="all"))
    refused(tmp_path, source, "bias='all'", "nonzero bias", "Export cannot fix this")


def test_embedding_targets_are_refused(tmp_path):
    source = saved(tmp_path, llama(), lk.LoraConfig(rank=4, targets=("embed_tokens", "q_proj")))
    refused(tmp_path, source, "target_modules=", "embedding layers ['model.embed_tokens']", "Export cannot fix this")


def test_a_dora_adapter_is_refused(tmp_path):
    source = saved(tmp_path, llama(), lk.LoraConfig(rank=4, targets=("q_proj",), dora=True))
    refused(tmp_path, source, "use_dora=True: vLLM refuses DoRA adapters", "Export cannot fix this", "lorakit merge")


def test_every_problem_is_reported_at_once(tmp_path):
    config = lk.LoraConfig(rank=4, targets=("wte", "c_attn"), bias="all", modules_to_save=("ln_f",))
    refused(tmp_path, saved(tmp_path, gpt2(), config), "3 problem(s)", "modules_to_save=", "bias=", "target_modules=")


def test_out_is_written_whole_replaced_only_with_force_and_never_the_source(tmp_path):
    source = saved(tmp_path, llama(), PATTERNED["llama"][1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LoraError, match="already holds files.*force=True"):
        lk.export_adapter(source, out)
    assert (out / "keep.txt").read_text() == "mine"
    lk.export_adapter(source, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(LoraError, match="is the adapter being exported"):
        lk.export_adapter(source, source, force=True)
    with pytest.raises(LoraError, match="server='tgi'"):
        lk.export_adapter(source, tmp_path / "other", server="tgi")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --- (d) the reasons ---------------------------------------------------------------------------------------
def test_a_plain_adapter_is_servable_as_is(tmp_path):
    for name, (make, _) in PATTERNED.items():  # rslora alone is fine: vLLM and LoRAX apply alpha/sqrt(r) too
        source = saved(tmp_path, make(), lk.LoraConfig(rank=4, alpha=8, rslora=name == "llama"), name=name)
        assert lk.servability(source) == []


def test_a_rank_other_than_r_is_one_reason_an_alpha_other_than_lora_alpha_another(tmp_path):
    ranks = saved(tmp_path, llama(), lk.LoraConfig(rank=8, rank_pattern={"*": 2}), name="ranks")
    (reason,) = lk.servability(ranks)
    assert (reason.field, reason.fixable) == ("rank_pattern", True)
    assert "rank 2, but vLLM and LoRAX read one r=8" in str(reason) and "zero-pads every module to rank 2" in str(reason)
    alphas = saved(tmp_path, llama(), lk.LoraConfig(rank=4, alpha=16, alpha_pattern={"v_proj": 4}), name="alphas")
    (reason,) = lk.servability(alphas)
    assert (reason.field, reason.fixable) == ("alpha_pattern", True)
    assert "the modules have alpha 4, 16, but vLLM and LoRAX apply one lora_alpha=16" in str(reason)


@pytest.mark.parametrize("case, config, expected, fragment", [
    ("modules to save", lk.LoraConfig(targets=("c_attn",), modules_to_save=("ln_f",)), {"modules_to_save": False},
     "modules_to_save=['transformer.ln_f']"),
    ("nonzero biases", lk.LoraConfig(targets=("c_attn",), bias="lora_only"), {"bias": False}, "nonzero bias"),
    ("embedding", lk.LoraConfig(targets=("wte", "c_attn")), {"target_modules": False}, "embedding layers"),
    ("patterns", PATTERNED["gpt2"][1], {"rank_pattern": True, "alpha_pattern": True}, "Export fixes this"),
])
def test_servability_names_each_reason_and_whether_export_fixes_it(tmp_path, case, config, expected, fragment):
    reasons = lk.servability(saved(tmp_path, gpt2(), config))
    assert fields(reasons) == expected
    assert fragment in " ".join(map(str, reasons))
    for reason in reasons:
        assert f"{reason.field}=" in str(reason)
        assert ("Export fixes this" if reason.fixable else "Export cannot fix this") in str(reason)


def test_biases_that_are_all_zero_or_absent_are_fixed(tmp_path):
    """GPT-2's biases start at zero: bias='all' untrained saves zeros, which export drops (the same model
    on this base); Llama has no biases, so bias='all' saves none."""
    base = gpt2()
    ids = ids_for(base)
    model = copy.deepcopy(base)
    lk.inject_(model, lk.LoraConfig(rank=4, targets=("c_attn",), bias="all"))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["default"].B.normal_(generator=torch.Generator().manual_seed(4))
    source = lk.save_adapter(model, tmp_path / "zeros")
    (reason,) = lk.servability(source)
    assert (reason.field, reason.fixable) == ("bias", True) and "all zero" in str(reason)
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), lk.export_adapter(source, tmp_path / "out"))
    torch.testing.assert_close(output(served, ids), lorakit_output(base, source, ids), **TOL)
    none_held = saved(tmp_path, llama(), lk.LoraConfig(rank=4, bias="all"), name="llama")
    (reason,) = lk.servability(none_held)
    assert (reason.field, reason.fixable) == ("bias", True) and "no bias tensors" in str(reason)


@pytest.mark.parametrize("targets, kind", [(("conv", "proj"), "convolution layers ['conv']"),
                                           (("embed",), "embedding layers ['embed']")])
def test_convolution_and_embedding_adapters_are_not_servable(tmp_path, targets, kind):
    (reason,) = lk.servability(lk.save_adapter(trained(config=lk.LoraConfig(rank=2, targets=targets)), tmp_path / "net"))
    assert (reason.field, reason.fixable) == ("target_modules", False) and kind in str(reason)


# --- (e) the command line -----------------------------------------------------------------------------------
def test_inspect_says_whether_vllm_can_serve_the_adapter(tmp_path):
    plain = saved(tmp_path, llama(), lk.LoraConfig(rank=4), name="plain")
    assert "vLLM/LoRAX:   servable as is\n" in ok(["inspect", str(plain)])
    patterned = saved(tmp_path, llama(), PATTERNED["llama"][1], name="patterned")
    line = ok(["inspect", str(patterned)]).splitlines()[-1]
    assert line.startswith("vLLM/LoRAX:   not servable as is: rank_pattern=") and "; alpha_pattern=" in line
    assert line.endswith("; `lorakit export --for vllm` can fix all of this")
    mixed = saved(tmp_path, gpt2(), lk.LoraConfig(rank=4, targets=("c_attn",), bias="all",
                                                    rank_pattern={"*.h.0.*": 2}), name="mixed")
    assert ok(["inspect", str(mixed)]).rstrip().endswith("can fix rank_pattern but not bias")
    info = json.loads(ok(["inspect", str(patterned), "--json"]))
    assert info["servable"] | {"reasons": None} == {"server": "vllm", "as_is": False, "after_export": True,
                                                    "reasons": None}
    assert [(r["field"], r["export_fixes"]) for r in info["servable"]["reasons"]] == [
        ("rank_pattern", True), ("alpha_pattern", True)]
    assert [r["text"] for r in info["servable"]["reasons"]] == list(map(str, lk.servability(patterned)))


def test_export_writes_the_copy_and_says_how_to_serve_it(tmp_path):
    source = saved(tmp_path, llama(), PATTERNED["llama"][1])
    out = tmp_path / "vllm"
    printed = ok(["export", str(source), "--for", "vllm", "--out", str(out)])
    assert f"for vLLM/LoRAX: {out} (rank 6, lora_alpha 6, 14 modules" in printed
    assert "fixed: rank_pattern, alpha_pattern" in printed
    assert f"vllm serve tiny --enable-lora --max-lora-rank 8 --lora-modules vllm={out}" in printed
    assert lk.servability(out) == []
    code, _, err = run(["export", str(source), "--for", "vllm", "--out", str(out)])
    assert code == 2 and "--out=" in err and "--force" in err and "Traceback" not in err
    ok(["export", str(source), "--for", "vllm", "--out", str(out), "--force"])


@pytest.mark.parametrize("argv, option", [
    (["export", "no/such/dir", "--for", "vllm", "--out", "OUT"], "ADAPTER"),
    (["export", "SRC", "--for", "tgi", "--out", "OUT"], "--for"),
    (["export", "SRC", "--out", "OUT"], "--for"),
    (["export", "SRC", "--for", "vllm"], "--out"),
    (["export", "SRC", "--for", "vllm", "--out", "SRC"], "--out="),
    (["export", "BIASED", "--for", "vllm", "--out", "OUT"], "bias='all'"),
])
def test_export_bad_input_exits_2_naming_the_option_or_the_reason(tmp_path, argv, option):
    folders = {"SRC": saved(tmp_path, llama(), lk.LoraConfig(rank=4), name="src"),
               "BIASED": saved(tmp_path, gpt2(), lk.LoraConfig(rank=4, targets=("c_attn",), bias="all"), name="biased"),
               "OUT": tmp_path / "out"}
    code, out, err = run([str(folders.get(a, a)) for a in argv])
    assert code == 2 and not out and option in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_inspect_of_a_damaged_file_still_describes_it_and_cannot_tell(tmp_path):
    source = saved(tmp_path, llama(), lk.LoraConfig(rank=4))
    weights = source / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4] ^= 1  # the last float's lowest mantissa bit: the header still reads, the checksum no longer matches
    weights.write_bytes(bytes(data))
    text = ok(["inspect", str(source)])
    assert "targets:      q_proj, v_proj" in text and "vLLM/LoRAX:   cannot tell: " in text and "checksum" in text
    assert "checksum" in json.loads(ok(["inspect", str(source), "--json"]))["servable"]["error"]
