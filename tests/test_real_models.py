"""The LoRA properties on real pretrained models (MiniLM encoder, SmolLM2 causal LM), and PEFT as a reference."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.zoo import load_bundled

pytestmark = pytest.mark.slow

SENTENCES = (Path(__file__).resolve().parent.parent / "data" / "kjv_sample.txt").read_text().splitlines()
TARGETS = {"minilm-l6": ("query", "key", "value", "dense"), "smollm2-135m": "all-linear"}
MAX_TOKENS = 24  # a CPU forward of SmolLM2 costs ~5 ms a token: keep batches tiny


@dataclass
class Case:
    name: str
    model: nn.Module  # a private deep copy: tests may change it freely
    tokenizer: object

    def batch(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=MAX_TOKENS)

    @torch.no_grad()
    def output(self, model: nn.Module | None = None) -> torch.Tensor:
        """The model's (default: this case's) output on three fixed verses: (B, T, vocab | hidden)."""
        out = (self.model if model is None else model)(**self.batch(SENTENCES[:3]))
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    def inject(self) -> None:
        lk.inject_(self.model, lk.LoraConfig(rank=8, alpha=16, targets=TARGETS[self.name]))


@pytest.fixture(scope="module", params=list(TARGETS))
def pristine(request):
    """Each real model loaded once per module (SmolLM2 from the local safetensors cache)."""
    torch.manual_seed(0)
    model, tokenizer = load_bundled(request.param)
    return request.param, model, tokenizer


@pytest.fixture
def case(pristine) -> Case:
    name, model, tokenizer = pristine
    torch.manual_seed(0)
    return Case(name, copy.deepcopy(model), tokenizer)


def randomize_adapters(model: nn.Module, std: float = 0.02) -> None:
    """Give every B a seeded non-zero value, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for B in (a.B for a in layer.adapters.values()):
                B.copy_(torch.randn(B.shape, generator=generator) * std)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {path: layer.base_layer.weight.detach().clone() for path, layer in lk.lora_layers(model)}


def test_fresh_adapter_is_a_noop(case):
    before = case.output()
    case.inject()
    assert torch.equal(case.output(), before)


def test_merge_matches_unmerged_and_unmerge_is_bit_exact(case):
    base = case.output()
    case.inject()
    randomize_adapters(case.model)
    originals = base_weights(case.model)
    unmerged = case.output()
    effect = (unmerged - base).abs().max()
    assert effect > 1e-2  # the adapter really changes the output, so the checks below mean something

    lk.merge_(case.model)
    merged = case.output()
    # One float32 rounding of W0 + dW per weight: differences far below the adapter's effect.
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4 * effect.item())
    assert any(not torch.equal(w, originals[p]) for p, w in base_weights(case.model).items())

    lk.unmerge_(case.model)
    assert all(torch.equal(w, originals[p]) for p, w in base_weights(case.model).items())
    assert torch.equal(case.output(), unmerged)


def test_save_then_load_round_trips(case, pristine, tmp_path):
    case.inject()
    randomize_adapters(case.model)
    expected = case.output()
    lk.save_adapter(case.model, tmp_path)

    fresh = copy.deepcopy(pristine[1])
    lk.load_adapter(fresh, tmp_path)
    assert torch.equal(case.output(fresh), expected)
    assert lk.adapter_config(fresh, "default") == lk.adapter_config(case.model, "default")  # as written, read back


def lm_loss(case: Case, sentences: list[str]) -> torch.Tensor:
    """Next-token cross-entropy over the non-pad tokens."""
    batch = case.batch(sentences)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return case.model(**batch, labels=labels).loss


def contrastive_loss(case: Case, sentences: list[str]) -> torch.Tensor:
    """InfoNCE between the mean-pooled embeddings of each verse's first and second half."""
    halves = [s.split() for s in sentences]
    firsts = [" ".join(w[: len(w) // 2]) for w in halves]
    seconds = [" ".join(w[len(w) // 2:]) for w in halves]

    def embed(texts):
        batch = case.batch(texts)
        hidden = case.model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # (B, H)

    similarity = embed(firsts) @ embed(seconds).t() / 0.05  # (B, B), matching halves on the diagonal
    return F.cross_entropy(similarity, torch.arange(len(sentences)))


def test_a_few_steps_lower_the_loss_on_real_text(case):
    loss_fn = lm_loss if case.name == "smollm2-135m" else contrastive_loss
    train = SENTENCES[10:14] if case.name == "smollm2-135m" else SENTENCES[10:26]
    case.inject()
    optimizer = torch.optim.AdamW([p for p in case.model.parameters() if p.requires_grad], lr=2e-3)
    with torch.no_grad():
        before = loss_fn(case, train).item()  # eval mode: no dropout noise in the measurement
    case.model.train()
    for _ in range(5):
        loss = loss_fn(case, train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    case.model.eval()
    with torch.no_grad():
        after = loss_fn(case, train).item()
    assert after < 0.9 * before, (before, after)
    assert all(not p.requires_grad for path, layer in lk.lora_layers(case.model) for p in layer.base_layer.parameters())


def test_peft_loads_the_adapter_with_identical_outputs(case, pristine, tmp_path):
    from peft import PeftModel

    case.inject()
    randomize_adapters(case.model)
    lk.save_adapter(case.model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine[1]), tmp_path)
    peft_model.eval()
    # scale = alpha / rank = 2 is a power of two, so PEFT's B(A(x)) * 2 and our (A(x) * 2) @ B.T agree exactly.
    assert torch.equal(case.output(peft_model), case.output())


def test_analyze_reads_the_adapter_back_onto_the_real_base(case, tmp_path):
    """lorakit analyze with --base: every adapted module measured against the real frozen W, which
    no r directions can hold more of than W's own top r (Ky Fan), and dW equal to the model's."""
    from lorakit.analysis.report import AnalyzeConfig

    case.inject()
    randomize_adapters(case.model)
    lk.save_adapter(case.model, tmp_path / "adapter")
    result = AnalyzeConfig(adapter=str(tmp_path / "adapter"), base=case.name, out=str(tmp_path / "report"),
                           progress=False).run()
    expected = lk.model_updates(case.model)
    assert [m["path"] for m in result["modules"]] == list(expected)
    for m in result["modules"]:
        a = m["amplification"]
        assert a["projected"] <= a["own"] * (1 + 1e-9) and a["random"] <= a["own"]
        assert a["delta_norm"] == pytest.approx(torch.linalg.matrix_norm(expected[m["path"]].delta).item(), rel=1e-6)
        assert a["weight_norm"] == pytest.approx(torch.linalg.matrix_norm(expected[m["path"]].weight).item(), rel=1e-6)
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "spectra.png").is_file()
