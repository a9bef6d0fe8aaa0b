"""lorakit.core.mixed: one batch, each example through its own adapter, against running every example
alone (lk.use, or lk.disabled for None) and against reference.py: forward, gradients and
training, per-example dropout, modules to save, generation, the no-grad cache and the errors."""
from __future__ import annotations

import copy
import math
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import lorakit as lk
from cases import DTYPES, EPS, Case, Holder, Toy, f64, randomize_, randomize_model_

VOCAB = 23
# Mixed rows run through bmm, alone rows through mm: same maths, another summation order.
CLOSE = dict(rtol=1e-4, atol=1e-4)
TIGHT = {torch.float32: CLOSE, torch.float64: dict(rtol=1e-12, atol=1e-12)}


# --- models: plain PyTorch, GPT-2 (Conv1D, wte), Llama (Linear), each with three adapters -------

class Plain(nn.Module):
    """An embedding, two linears and a head: the plain PyTorch layers mixed batches support."""

    def __init__(self, seed: int = 0, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids):  # (N, T) -> (N, T, VOCAB)
        h = self.embed(ids)
        return self.head(h + self.down(torch.tanh(self.up(h))))


def _randomize_copies_(model: nn.Module, seed: int) -> None:
    """Give every adapter's copy of a module to save its own weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, wrapper in lk.saved_modules(model):
            for module in wrapper.copies.values():
                for p in module.parameters():
                    p.add_(torch.randn(p.shape, generator=g))


def _with_adapters(model: nn.Module, configs: dict, seed: int) -> nn.Module:
    for name, config in configs.items():
        lk.inject_(model, config, name)
    randomize_model_(model, seed)
    _randomize_copies_(model, seed)
    return model.eval()


def plain_model(seed: int = 0) -> nn.Module:
    """Ranks 2/4/8 on different layers, rslora and alpha_pattern scales (some irrational);
    'a' also trains its own head."""
    return _with_adapters(Plain(seed), {
        "a": lk.LoraConfig(rank=2, alpha=3, targets=("up",), rslora=True, modules_to_save=("head",)),
        "b": lk.LoraConfig(rank=4, alpha=8, targets=("up", "down", "embed"), alpha_pattern={"embed": 3.0}),
        "c": lk.LoraConfig(rank=8, alpha=8, targets=("embed", "down"), rslora=True, alpha_pattern={"down": 2.0}),
    }, seed)


def gpt2_model(seed: int = 0) -> nn.Module:
    """GPT-2's Conv1D c_attn/c_fc and its (tied) wte embedding."""
    torch.manual_seed(seed)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    return _with_adapters(base, {
        "a": lk.LoraConfig(rank=2, alpha=4, targets=("c_attn",), rslora=True),
        "b": lk.LoraConfig(rank=4, alpha=4, targets=("c_attn", "wte"), alpha_pattern={"wte": 3.0}),
        "c": lk.LoraConfig(rank=8, alpha=16, targets=("c_fc", "wte"), rslora=True, alpha_pattern={"wte": 2.0}),
    }, seed)


def llama_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config)


def llama_model(seed: int = 0) -> nn.Module:
    """Llama's q/v projections, every linear, and the embedding."""
    return _with_adapters(llama_base(seed), {
        "a": lk.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj"), rslora=True),
        "b": lk.LoraConfig(rank=4, alpha=8, targets="all-linear", alpha_pattern={"down_proj": 3.0}),
        "c": lk.LoraConfig(rank=8, alpha=16, targets=("embed_tokens", "o_proj"), rslora=True),
    }, seed)


MODELS = {"plain": plain_model, "gpt2": gpt2_model, "llama": llama_model}
NAMES = ["c", None, "a", "c", "b", None, "a"]  # any order, repeats, the base


def ids_for(n: int, tokens: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, tokens), generator=torch.Generator().manual_seed(seed))


def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return getattr(out, "logits", out)


def alone(model: nn.Module, name: str | None):
    """Run the model as if it had only this adapter (None: the base)."""
    return lk.disabled(model) if name is None else lk.use(model, name)


def one_by_one(model: nn.Module, ids: torch.Tensor, names: list) -> torch.Tensor:
    """Each example alone through its own adapter, stacked back into a batch."""
    rows = []
    for i, name in enumerate(names):
        with alone(model, name):
            rows.append(forward(model, ids[i:i + 1]))
    return torch.cat(rows)


def assert_adapters_differ(model: nn.Module, ids: torch.Tensor, names: list) -> None:
    """Every route in `names` gives another output on the same input, so a wrong route is seen."""
    outputs = {}
    for name in dict.fromkeys(names):
        with alone(model, name):
            outputs[name] = forward(model, ids[:1])
    keys = list(outputs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (outputs[a] - outputs[b]).abs().max() > 0.05, (a, b)


# --- forward -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("model_name", MODELS)
@torch.no_grad()
def test_each_row_matches_running_it_alone_with_its_adapter(model_name, dtype):
    model = MODELS[model_name]().to(dtype)
    ids = ids_for(len(NAMES))
    expected = one_by_one(model, ids, NAMES)
    assert_adapters_differ(model, ids, NAMES)
    with lk.mixed_batch(model, NAMES) as inside:
        assert inside is model
        torch.testing.assert_close(forward(model, ids), expected, **TIGHT[dtype])
    # Other orders, and a batch of one adapter only.
    for names in ([None, "b", "b", "a", "c", "a", None], ["b"] * 7, [None] * 7):
        expected = one_by_one(model, ids, names)
        with lk.mixed_batch(model, names):
            torch.testing.assert_close(forward(model, ids), expected, **TIGHT[dtype])


def test_routing_ignores_the_active_adapter_and_leaves_it():
    model = plain_model()
    ids = ids_for(len(NAMES))
    with torch.no_grad():
        expected = one_by_one(model, ids, NAMES)
        for active in ("a", "c", None):
            lk.set_active(model, active)
            with lk.mixed_batch(model, NAMES):
                torch.testing.assert_close(forward(model, ids), expected, **CLOSE)
            assert lk.active_adapter(model) == active


@st.composite
def routed_layers(draw, dtypes):
    """A Linear, GPT-2 Conv1D or Embedding, 1-4 adapters (rank, alpha, rslora, alpha_pattern's alpha
    or None), one name (or None) per row, and whether the adapters are cast to the layer's dtype."""
    kind = draw(st.sampled_from(("linear", "gpt2_conv1d", "embedding")))
    rows, tokens, small = draw(st.integers(1, 6)), draw(st.integers(1, 3)), st.integers(1, 12)
    if kind == "embedding":
        dims = {"num": draw(st.integers(2, 20)), "dim": draw(small), "batch": (rows, tokens)}
    else:
        dims = {"d_in": draw(small), "d_out": draw(small), "bias": draw(st.booleans()), "batch": (rows, tokens)}
    case = Case(kind, dims, 1, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(dtypes)))
    alphas = st.sampled_from((1.0, 3.0, 16.0))
    specs = draw(st.lists(st.tuples(st.integers(1, 8), alphas, st.booleans(), st.none() | alphas),
                          min_size=1, max_size=4))
    names = draw(st.lists(st.sampled_from([f"k{i}" for i in range(len(specs))] + [None]),
                          min_size=rows, max_size=rows))
    return case, specs, names, draw(st.booleans())


def _routed_layer(case: Case, specs: list, cast_adapters: bool) -> Holder:
    model = Holder(case.base())
    for i, (rank, alpha, rslora, pattern_alpha) in enumerate(specs):
        pattern = {} if pattern_alpha is None else {"lay*": pattern_alpha}
        config = lk.LoraConfig(rank=rank, alpha=alpha, rslora=rslora, alpha_pattern=pattern, targets=("layer",))
        lk.inject_(model, config, f"k{i}")
        randomize_(model.layer, f"k{i}", case.seed + i)
    return model.to(case.dtype) if cast_adapters else model  # adapters in float32 unless cast


def _reference_rows(case: Case, layer: lk.LoraLayer, x: torch.Tensor, specs: list, names: list):
    """(reference output, its magnitude), row by row, in float64; the scale from the drawn spec."""
    W, b = f64(layer.base_layer.weight), f64(getattr(layer.base_layer, "bias", None))
    fan_in, d_out = layer.adapters["k0"].A.shape[1:], layer.adapters["k0"].B.shape[0]
    outputs, magnitudes = [], []
    for i, name in enumerate(names):
        xi = f64(x[i:i + 1]) if x.is_floating_point() else x[i:i + 1]
        if name is None:
            A, B, s = torch.zeros(1, *fan_in, dtype=torch.float64), torch.zeros(d_out, 1, dtype=torch.float64), 0.0
        else:
            rank, alpha, rslora, pattern_alpha = specs[int(name[1:])]
            alpha = alpha if pattern_alpha is None else pattern_alpha
            A, B = f64(layer.adapters[name].A), f64(layer.adapters[name].B)
            s = alpha / math.sqrt(rank) if rslora else alpha / rank
        outputs.append(case.reference(xi, W, b, A, B, s))
        magnitudes.append(case.magnitude(xi, W, b, A, B, s))
    return torch.cat(outputs), torch.cat(magnitudes)


def _check_against_reference(case, specs, names, cast_adapters, ulps):
    model = _routed_layer(case, specs, cast_adapters)
    x = case.input()
    expected, magnitude = _reference_rows(case, model.layer, x, specs, names)
    with lk.mixed_batch(model, names), torch.no_grad():
        out = model(x)
    assert out.dtype == case.dtype
    error = (out.double() - expected).abs()
    assert (error <= ulps * EPS[case.dtype] * magnitude + 1e-30).all(), (error / magnitude).max()


@settings(max_examples=60, deadline=None)
@given(drawn=routed_layers(dtypes=(torch.float32,)))
def test_single_layer_matches_reference_float32(drawn):
    _check_against_reference(*drawn, ulps=4)


@settings(max_examples=40, deadline=None)
@given(drawn=routed_layers(dtypes=DTYPES[1:]))
def test_single_layer_matches_reference_half_precision(drawn):
    _check_against_reference(*drawn, ulps=4)


# --- backward and training -------------------------------------------------------------------------

def summed_loss(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over examples and tokens: the batch loss is the sum of per-example losses."""
    logits = forward(model, ids)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def backward_separately(model: nn.Module, ids, targets, names) -> None:
    """Each adapter (and the base) on its own examples only; gradients accumulate in .grad."""
    for name in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        with alone(model, name):
            loss = summed_loss(model, ids[rows], targets[rows])
        if loss.requires_grad:
            loss.backward()


def _with_idle_adapter(model_name: str, dtype: torch.dtype) -> nn.Module:
    """The model with one more adapter, 'idle', that no batch uses; in eval (GPT-2 has dropouts)."""
    model = MODELS[model_name]()
    target = {"plain": ("down",), "gpt2": ("c_attn",), "llama": ("q_proj",)}[model_name]
    lk.inject_(model, lk.LoraConfig(rank=3, targets=target), "idle")
    randomize_model_(model, 5)
    return model.to(dtype)


def assert_close_to_scale(actual, expected, rel: float, msg: str) -> None:
    """Equal up to `rel` of the tensor's largest entry: float32 rounding grows with the largest terms."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item(), msg=msg)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype, rel", ((torch.float64, 1e-10), (torch.float32, 1e-4)))
@pytest.mark.parametrize("model_name", MODELS)
def test_gradients_equal_training_each_adapter_on_its_own_examples(model_name, dtype, rel):
    model = _with_idle_adapter(model_name, dtype)
    names = ["b", "a", None, "c", "b", "a"]
    ids, targets = ids_for(len(names), seed=1), ids_for(len(names), seed=2)
    twin = copy.deepcopy(model)

    with lk.mixed_batch(model, names):
        summed_loss(model, ids, targets).backward()
    backward_separately(twin, ids, targets, names)

    grads, twin_params = _trainable(model), _trainable(twin)
    assert grads.keys() == twin_params.keys()
    for key, p in grads.items():
        if ".idle." in key:
            assert p.grad is None, key  # not in the batch: untouched
            continue
        assert p.grad is not None and p.grad.abs().max() > 0, key
        assert_close_to_scale(p.grad, twin_params[key].grad, rel, msg=key)
    for key, p in model.named_parameters():
        assert p.requires_grad or p.grad is None, key  # the frozen base gets none


@pytest.mark.parametrize("model_name", ("plain", "llama"))
def test_sgd_steps_in_mixed_mode_equal_separate_training(model_name):
    model = _with_idle_adapter(model_name, torch.float64)
    names = ["a", "c", "a", None, "b"]
    ids, targets = ids_for(len(names), seed=3), ids_for(len(names), seed=4)
    twin, before = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    mixed_opt = torch.optim.SGD(_trainable(model).values(), lr=0.05, momentum=0.5)
    twin_opt = torch.optim.SGD(_trainable(twin).values(), lr=0.05, momentum=0.5)
    with lk.mixed_batch(model, names):
        for _ in range(3):
            mixed_opt.zero_grad()
            summed_loss(model, ids, targets).backward()
            mixed_opt.step()
    for _ in range(3):
        twin_opt.zero_grad()
        backward_separately(twin, ids, targets, names)
        twin_opt.step()

    state, twin_state = model.state_dict(), twin.state_dict()
    moved = [k for k in state if not torch.equal(state[k], before[k])]
    assert moved and all(".idle" not in k for k in moved)  # trained, but never the absent adapter
    assert set(moved) == {k for k, p in _trainable(model).items() if "idle" not in k}
    for key in state:
        torch.testing.assert_close(state[key], twin_state[key], rtol=1e-10, atol=1e-10, msg=key)


# --- dropout ---------------------------------------------------------------------------------------

def identity_layer(dim: int = 8) -> Holder:
    """A zero base and adapters with A = B = I and scale 1: the output is the adapter's dropped input."""
    model = Holder(nn.Linear(dim, dim, bias=False))
    nn.init.zeros_(model.layer.weight)
    for name, p in (("drop", 0.25), ("keep", 0.0), ("most", 0.5)):
        lk.inject_(model, lk.LoraConfig(rank=dim, alpha=dim, dropout=p, targets=("layer",)), name)
        with torch.no_grad():
            model.layer.adapters[name].A.copy_(torch.eye(dim))
            model.layer.adapters[name].B.copy_(torch.eye(dim))
    return model


def test_dropout_is_per_example_and_only_where_the_adapter_has_it():
    model = identity_layer().train()
    names = ["drop", "keep", None, "most", "drop"]
    torch.manual_seed(0)
    x = torch.randn(len(names), 4000, 8) + 3.0  # never zero: a zero output is a dropped input
    with lk.mixed_batch(model, names), torch.no_grad():
        first, second = model(x), model(x)
    for i, name in enumerate(names):
        if name in ("keep", None):  # no dropout: deterministic, x itself (or the zero base)
            expected = x[i] if name == "keep" else torch.zeros_like(x[i])
            assert torch.equal(first[i], second[i])
            torch.testing.assert_close(first[i], expected)
            continue
        p = model.layer.adapters[name].dropout.p
        assert not torch.equal(first[i], second[i])  # a new mask each call
        dropped = first[i] == 0
        assert abs(dropped.float().mean().item() - p) < 0.02, name  # ~32k draws: 4 sigma < 0.011
        torch.testing.assert_close(first[i][~dropped], x[i][~dropped] / (1 - p))  # inverted dropout
    assert not torch.equal(first[0] == 0, first[4] == 0)  # every example its own mask

    model.eval()  # eval: no dropout anywhere
    with lk.mixed_batch(model, names), torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x))
    expected = torch.stack([torch.zeros_like(x[i]) if n is None else x[i] for i, n in enumerate(names)])
    torch.testing.assert_close(out, expected)


# --- modules to save -------------------------------------------------------------------------------

@torch.no_grad()
def test_modules_to_save_route_per_example_in_a_bert_classifier():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3, initializer_range=0.5)
    model = _with_adapters(BertForSequenceClassification(config), {
        "a": lk.LoraConfig(rank=2, alpha=4, targets=("query", "value"), modules_to_save=("classifier",)),
        "b": lk.LoraConfig(rank=4, alpha=4, targets=("query",), modules_to_save=("classifier",)),
        "c": lk.LoraConfig(rank=2, alpha=4, targets=("value",)),  # no head of its own: the original
    }, seed=0)
    head = model.classifier
    assert isinstance(head, lk.ModuleToSave) and set(head.copies) == {"a", "b"}
    assert not torch.equal(head.copies["a"].weight, head.copies["b"].weight)
    names = ["b", None, "a", "c", "a", "b"]
    ids = ids_for(len(names), seed=6)
    expected = one_by_one(model, ids, names)
    assert_adapters_differ(model, ids, names)
    with lk.mixed_batch(model, names):
        torch.testing.assert_close(forward(model, ids), expected, **CLOSE)
    # lk.disabled inside wins: every row is the base model, original head included.
    base = one_by_one(model, ids, [None] * len(names))
    with lk.mixed_batch(model, names), lk.disabled(model):
        torch.testing.assert_close(forward(model, ids), base, **CLOSE)


# --- generation ------------------------------------------------------------------------------------

@torch.no_grad()
def test_generate_gives_each_row_the_tokens_of_its_adapter_alone():
    model = llama_model()
    names = ["b", None, "a", "b", "c"]
    prompts = ids_for(len(names), tokens=4, seed=7)
    prompts[3] = prompts[0]  # the same prompt twice under one adapter, and under others below
    settings_ = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with lk.mixed_batch(model, names):
        mixed = model.generate(prompts, attention_mask=torch.ones_like(prompts), **settings_)
    assert mixed.shape == (len(names), 10)
    for i, name in enumerate(names):
        with alone(model, name):
            row = model.generate(prompts[i:i + 1], attention_mask=torch.ones_like(prompts[i:i + 1]), **settings_)
        assert torch.equal(mixed[i], row[0]), (i, name)
    routes = {}
    for name in dict.fromkeys(names):
        with alone(model, name):
            routes[name] = model.generate(prompts[:1], attention_mask=torch.ones_like(prompts[:1]), **settings_)
    continuations = [tuple(r[0, 4:].tolist()) for r in routes.values()]
    assert len(set(continuations)) == len(continuations)  # every adapter writes something else


# --- the no-grad cache -----------------------------------------------------------------------------

@torch.no_grad()
def test_no_grad_cache_follows_in_place_changes_to_the_adapters():
    model = plain_model()
    ids = ids_for(len(NAMES))
    rows_b = torch.tensor([n == "b" for n in NAMES])
    with lk.mixed_batch(model, NAMES):
        first = forward(model, ids)
        assert torch.equal(forward(model, ids), first)  # unchanged weights: the same output
        model.down.adapters["b"].B.mul_(-1.0)  # in place: the tensor's version moves on
        changed = forward(model, ids)
    assert (changed[rows_b] - first[rows_b]).abs().max() > 0.05
    assert torch.equal(changed[~rows_b], first[~rows_b])
    torch.testing.assert_close(changed, one_by_one(model, ids, NAMES), **CLOSE)

    with lk.mixed_batch(model, NAMES):
        assert torch.equal(forward(model, ids), changed)
        model.embed.adapters["c"].A.add_(1.0)  # A this time, an embedding's, of another adapter
        again = forward(model, ids)
    assert (again - changed).abs().max() > 0.05
    torch.testing.assert_close(again, one_by_one(model, ids, NAMES), **CLOSE)


@torch.no_grad()
def test_stacks_kept_across_batches_follow_the_pool_reloads_and_in_place_changes(tmp_path):
    """A server's Stacks, reused batch after batch over a pool of every adapter loaded: each batch equals
    its rows run alone, also after an adapter is deleted and reloaded under its name with other weights
    (new tensors that may reuse freed ids and start at version 0) and after an in-place change."""
    from lorakit.core.mixed import Stacks

    model = llama_model()
    ids = ids_for(len(NAMES))
    stacks, pool = Stacks(), ["a", "b", "c"]
    for names in (NAMES, ["a", None, "a", "a", None, "a", "a"], list(reversed(NAMES))):
        with lk.mixed_batch(model, names, pool=pool, stacks=stacks):
            mixed = forward(model, ids)
        torch.testing.assert_close(mixed, one_by_one(model, ids, names), **CLOSE)
    with lk.mixed_batch(model, NAMES, pool=pool, stacks=stacks):
        before = forward(model, ids)
    folder = lk.save_adapter(model, tmp_path / "b", adapter="b")
    lk.delete_adapter(model, "b")
    other = llama_model(seed=5)
    lk.save_adapter(other, tmp_path / "b5", adapter="b")
    lk.load_adapter(model, tmp_path / "b5", adapter="b", allow_base_mismatch=True)  # other weights for "b"
    with lk.mixed_batch(model, NAMES, pool=pool, stacks=stacks):
        forward_mixed = forward(model, ids)
    rows_b = torch.tensor([n == "b" for n in NAMES])
    assert (forward_mixed[rows_b] - before[rows_b]).abs().max() > 0.05
    torch.testing.assert_close(forward_mixed, one_by_one(model, ids, NAMES), **CLOSE)
    lk.load_adapter(model, folder, adapter="b")
    next(layer for _, layer in lk.lora_layers(model) if layer.holds("a")).adapters["a"].B.mul_(-1.0)
    with lk.mixed_batch(model, NAMES, pool=pool, stacks=stacks):
        mixed = forward(model, ids)
    torch.testing.assert_close(mixed, one_by_one(model, ids, NAMES), **CLOSE)
    with pytest.raises(lk.LoraError, match="pool"):
        with lk.mixed_batch(model, NAMES, pool=["a"], stacks=stacks):
            pass


def test_no_grad_cache_is_not_used_with_grad_and_sees_an_optimizer_step():
    model = plain_model()
    ids, targets = ids_for(len(NAMES)), ids_for(len(NAMES), seed=8)
    opt = torch.optim.SGD(_trainable(model).values(), lr=0.1)
    with lk.mixed_batch(model, NAMES):
        with torch.no_grad():
            before = forward(model, ids)  # fills the cache
        summed_loss(model, ids, targets).backward()  # must not reuse it: gradients reach every adapter
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in _trainable(model).values())
        opt.step()
        with torch.no_grad():
            after = forward(model, ids)
    assert (after - before).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(after, one_by_one(model, ids, NAMES), **CLOSE)


# --- errors and state ------------------------------------------------------------------------------

def test_unknown_adapter_is_named_with_the_known_ones():
    model = plain_model()
    with pytest.raises(lk.LoraError, match=r"unknown adapter\(s\) \['nope'\].*\['a', 'b', 'c'\]"):
        with lk.mixed_batch(model, ["a", "nope", None]):
            pass


def test_names_must_be_one_per_example():
    model = plain_model()
    with lk.mixed_batch(model, ["a", "b", None]):
        with pytest.raises(lk.LoraError, match="3 adapter names for a batch of 2 examples; give exactly one"):
            forward(model, ids_for(2))


@pytest.mark.parametrize("names", ["ab", "a", 3, None])
def test_names_must_be_a_list_not_a_string(names):
    with pytest.raises(lk.LoraError, match=r"names=.*give a list with one adapter name"):
        with lk.mixed_batch(plain_model(), names):
            pass


def test_merged_model_is_refused_until_unmerged():
    model = plain_model()
    lk.merge_(model, "b")
    with pytest.raises(lk.LoraError, match=r"'b' is merged.*lk\.unmerge_\(model\)"):
        with lk.mixed_batch(model, ["a", "b"]):
            pass
    lk.unmerge_(model)
    with lk.mixed_batch(model, ["a", "b"]):
        pass


def test_conv_adapter_in_the_batch_is_refused_but_a_conv_adapter_outside_it_is_fine():
    model = Toy()
    lk.inject_(model, lk.LoraConfig(rank=2, alpha=4, targets=("q_proj", "embed")), "lin")
    lk.inject_(model, lk.LoraConfig(rank=2, alpha=4, targets=("conv",)), "conv")
    randomize_model_(model, 0)
    with pytest.raises(lk.LoraError, match=r"'conv' is a Conv1d.*lk\.use\(model, name\)"):
        with lk.mixed_batch(model, ["lin", "conv"]):
            pass
    ids = ids_for(3, seed=9) % 13
    names = ["lin", None, "lin"]
    with torch.no_grad():
        expected = one_by_one(model, ids, names)
        with lk.mixed_batch(model, names):
            torch.testing.assert_close(model(ids), expected, **CLOSE)


def _routings(model: nn.Module) -> list:
    return [m.routing for _, m in lk.lora_layers(model)] + [m.routing for _, m in lk.saved_modules(model)]


@torch.no_grad()
def test_state_is_restored_after_an_exception():
    model = plain_model()
    ids = ids_for(2)
    lk.set_active(model, "c")
    before = forward(model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with lk.mixed_batch(model, ["a", "b"]):
            raise RuntimeError("boom")
    with pytest.raises(lk.LoraError):
        with lk.mixed_batch(model, ["a", "b", "c"]):
            forward(model, ids)  # wrong batch size, raised inside
    assert all(r is None for r in _routings(model))
    assert lk.active_adapter(model) == "c"
    assert torch.equal(forward(model, ids), before)


@torch.no_grad()
def test_nesting_restores_the_outer_routing():
    model = plain_model()
    ids = ids_for(4)
    outer, inner = ["a", None, "b", "c"], ["c", "c", None, "a"]
    expected_outer, expected_inner = one_by_one(model, ids, outer), one_by_one(model, ids, inner)
    with lk.mixed_batch(model, outer):
        outer_out = forward(model, ids)
        torch.testing.assert_close(outer_out, expected_outer, **CLOSE)
        with lk.mixed_batch(model, inner):
            torch.testing.assert_close(forward(model, ids), expected_inner, **CLOSE)
        assert torch.equal(forward(model, ids), outer_out)
        with pytest.raises(lk.LoraError):
            with lk.mixed_batch(model, ["nope"]):  # refused before it changes anything
                pass
        assert torch.equal(forward(model, ids), outer_out)
    assert all(r is None for r in _routings(model))


def test_adapters_created_under_inference_mode_can_be_routed():
    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(6, 6))
        lk.inject_(model, lk.LoraConfig(rank=2, targets=("0",)), "a")
        lk.inject_(model, lk.LoraConfig(rank=2, targets=("0",)), "b")
        for _, layer in lk.lora_layers(model):
            layer.adapters["a"].B.normal_()
        x = torch.randn(2, 6)
        with lk.mixed_batch(model, ["a", "b"]):
            mixed = model(x)
        with lk.use(model, "a"):
            alone = model(x[:1])
    torch.testing.assert_close(mixed[:1], alone)


@pytest.mark.parametrize("base_dtype", ["nf4", "int8", "bfloat16"])
def test_mixed_batches_on_a_low_precision_base_match_each_adapter_alone(base_dtype):
    """Forward and backward: the routed update on a quantized base is each row's own adapter."""
    model = lk.load_base(llama_base(), lk.BasePrecision(base_dtype=base_dtype, compute_dtype="float32"))
    _with_adapters(model, {"a": lk.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
                           "b": lk.LoraConfig(rank=4, alpha=8, targets="all-linear")}, seed=3)
    names = ["b", "a", None, "b"]
    ids = ids_for(len(names))
    expected = one_by_one(model, ids, names)
    with lk.mixed_batch(model, names):
        got = forward(model, ids)
        got.float().square().sum().backward()
    scale = expected.abs().max().item()
    # LLM.int8 keeps a batch's outlier columns in float16: a row's rounding depends on the other rows
    tol = {"nf4": 1e-4, "int8": 3e-2, "bfloat16": 2e-2}[base_dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=tol * scale)
    for name in ("a", "b"):
        grads = [p.grad for n, p in model.named_parameters() if f".adapters.{name}." in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
