"""lorakit.training.plan_trace: a deep model's step traced with a few layers and scaled per layer is exactly
the step traced through every layer (LoRA and full fine-tuning, with and without gradient checkpointing);
layers that differ are all traced; the fake trace of a Llama step equals LiveBytes on the real one."""
import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.training import plan_trace
from lorakit.training.loss import summed_causal_lm_loss
from lorakit.training.plan import _prepared, _Step, plan
from lorakit.training.plan_trace import LiveBytes, step_trace, traced

DEEP_LLAMA = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
                  num_key_value_heads=2)
DEEP_GPT2 = dict(n_layer=7, n_embd=128, n_head=4, vocab_size=1000)
BATCH, SEQ = 2, 64


@pytest.fixture
def every_layer_traced(monkeypatch):
    """Trace every layer: no model has more layers than SCALED_FROM's."""
    def trace_all():
        monkeypatch.setattr(plan_trace, "SCALED_FROM", (1000, 1001))
    return trace_all


def scaled_and_every_layer(config, lora: lk.LoraConfig | None, grad_checkpointing: bool) -> list[tuple]:
    """(activations, peak, peak without gradients) of the step scaled from a few layers, and traced through all."""
    step = _Step(BATCH, SEQ, False, grad_checkpointing)

    def build(config):
        model, _, fake = _prepared(config, lora, lk.BasePrecision(), step)
        return model, fake

    traces = [step_trace(*build(config), build, BATCH, SEQ, False), traced(*build(config), BATCH, SEQ, False)]
    return [(t.activations, t.peak, t.peak_without_gradients) for t in traces]


@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("lora", [lk.LoraConfig(rank=4), None], ids=["lora", "full"])
@pytest.mark.parametrize("config", [LlamaConfig(**DEEP_LLAMA), GPT2Config(**DEEP_GPT2)], ids=["llama", "gpt2"])
def test_scaled_from_a_few_layers_is_exactly_every_layer_traced(config, lora, grad_checkpointing):
    # The step's peak moves as layers are added: GPT-2's (LoRA, stored) from the loss to the end of the layers'
    # forward (their KV cache), Llama's (full, recomputed) from the first layer's backward to the last's. Scaling
    # the whole step's peak from 2 and 3 layers would miss 164 KB and 102 KB of it; scaling each part's does not.
    scaled, every_layer = scaled_and_every_layer(config, lora, grad_checkpointing)
    assert scaled == every_layer


def test_plan_scales_deep_models(every_layer_traced):
    step = dict(batch=BATCH, seq=SEQ, grad_checkpointing=True)
    scaled = plan(GPT2Config(**DEEP_GPT2), rank=4, **step)
    every_layer_traced()
    assert plan(GPT2Config(**DEEP_GPT2), rank=4, **step) == scaled


def test_layers_that_differ_are_all_traced(every_layer_traced):
    config = LlamaConfig(**DEEP_LLAMA)  # the last layer's adapter is wider: no copy with fewer layers has it
    lora = lk.LoraConfig(rank=2, targets=("q_proj", "v_proj"), rank_pattern={"*.layers.6.*": 64})
    step = dict(batch=BATCH, seq=SEQ, full=False)
    found = plan(config, lora, **step)
    every_layer_traced()
    assert plan(config, lora, **step) == found
    narrower = plan(config, lora.replace(rank_pattern={}), **step)
    assert narrower["lora"]["activation_bytes"] < found["lora"]["activation_bytes"]


def test_the_fake_trace_is_what_the_real_step_creates():
    """The same forward and backward on the real model (LiveBytes on real tensors) and on the fake one."""
    config, lora = LlamaConfig(**{**DEEP_LLAMA, "num_hidden_layers": 3}), lk.LoraConfig(rank=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    lk.inject_(model, lora)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with LiveBytes() as real:
        loss = summed_causal_lm_loss(model.train(), {"input_ids": ids, "attention_mask": None, "labels": ids})
        activations = real.live
        loss.backward()
    step = _Step(BATCH, SEQ, False, False)
    fake_model, _, fake = _prepared(config, lora, lk.BasePrecision(), step)
    fake_trace = traced(fake_model, fake, BATCH, SEQ, False)
    assert (fake_trace.activations, fake_trace.peak) == (activations, real.peak)
