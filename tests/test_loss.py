"""lorakit.training.loss: the chunked causal-LM loss equals one cross-entropy over the full logits (loss and
gradients), never forms the (B, T, vocab) logits, and falls back where a model post-processes them."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutput

import lorakit as lk
import lorakit.training.loss as loss_module
from lorakit.training.loss import summed_causal_lm_loss

VOCAB = 97


def reference_loss(model, batch):
    """The textbook shifted cross-entropy over the whole logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def make_batch(seed=1, batch=3, seq=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    labels[2, 15:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def with_lora(model, targets=("c_attn",)):
    lk.inject_(model, lk.LoraConfig(rank=4, targets=targets))
    for layer_path, layer in lk.lora_layers(model):
        torch.nn.init.normal_(layer.adapters["default"].B, std=0.1)  # a non-trivial adapter
    return model.eval()  # no dropout: the two losses see the same model


def trainable_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * VOCAB * 5)  # 5 rows per chunk: many chunks


@pytest.mark.parametrize("build, targets", [(gpt2, ("c_attn",)), (llama, ("q_proj", "v_proj")),
                                            (gpt2, ("c_attn", "lm_head"))])
def test_chunked_loss_and_gradients_equal_the_full_cross_entropy(build, targets, small_chunks):
    model, batch = with_lora(build(), targets), make_batch()
    ours, expected = summed_causal_lm_loss(model, batch), reference_loss(model, batch)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    for a, b in zip(trainable_grads(model, ours), trainable_grads(model, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_of_a_bfloat16_model_is_close_to_the_full_one(small_chunks):
    model, batch = with_lora(llama(), ("q_proj", "v_proj")).to(torch.bfloat16), make_batch()
    ours, expected = summed_causal_lm_loss(model, batch), reference_loss(model, batch)
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-2)
    for a, b in zip(trainable_grads(model, ours), trainable_grads(model, expected)):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


def test_chunked_loss_under_bfloat16_autocast_is_close_to_the_full_one(small_chunks):
    model, batch = with_lora(llama(), ("q_proj", "v_proj")), make_batch()
    ours = summed_causal_lm_loss(model, batch, bf16=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_loss(model, batch)
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-2)
    for a, b in zip(trainable_grads(model, ours), trainable_grads(model, expected)):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


class Shapes(TorchDispatchMode):
    """Shapes of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_the_full_logits_are_never_formed_in_forward_or_backward(small_chunks):
    model, batch = with_lora(gpt2()).train(), make_batch()
    with Shapes() as seen:
        summed_causal_lm_loss(model, batch).backward()
    rows = {s[0] for s in seen.shapes if len(s) == 2 and s[1] == VOCAB} - {32}  # 32: the head's weight.T
    assert rows and max(rows) <= 5  # (rows, vocab) chunks only
    assert not [s for s in seen.shapes if len(s) == 3 and s[-1] == VOCAB and s[1] > 1]


class ScaledLogits(GPT2LMHeadModel):
    """A model whose logits are more than head(hidden), like Gemma's soft-capping."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out


def test_a_model_that_post_processes_its_logits_gets_the_plain_loss(small_chunks):
    torch.manual_seed(0)
    model = with_lora(ScaledLogits(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)))
    batch = make_batch()
    for _ in range(2):  # the first call detects it, the second remembers
        torch.testing.assert_close(summed_causal_lm_loss(model, batch), reference_loss(model, batch),
                                   rtol=1e-6, atol=1e-5)
    assert ScaledLogits in loss_module._POST_PROCESSED


def test_full_fine_tuning_keeps_the_plain_loss(small_chunks):
    model, batch = gpt2().eval(), make_batch()  # every weight trains, the tied head included
    assert not loss_module._chunkable(model.get_output_embeddings())
    assert loss_module._chunkable(with_lora(gpt2()).get_output_embeddings())
    torch.testing.assert_close(summed_causal_lm_loss(model, batch), reference_loss(model, batch), rtol=1e-6, atol=1e-5)
    assert FlatHead not in loss_module._POST_PROCESSED  # no second forward pass was needed


class FlatHead(GPT2LMHeadModel):
    """A model that calls its head on (B*T, d) rows: nothing to intercept, its own logits are used."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.transformer(input_ids, attention_mask=attention_mask).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden.flatten(0, 1)).view(*hidden.shape[:2], -1))


def test_a_head_called_otherwise_leaves_the_full_logits_to_the_plain_loss(small_chunks):
    torch.manual_seed(0)
    model = with_lora(FlatHead(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)))
    batch = make_batch()
    torch.testing.assert_close(summed_causal_lm_loss(model, batch), reference_loss(model, batch), rtol=1e-6, atol=1e-5)
    assert FlatHead not in loss_module._POST_PROCESSED  # no second forward pass was needed
