"""lorakit.core.combine / combined: each method against a reference written from its definition (cat's exact
sum, SVD's best rank-k approximation, TIES' trim / elect / disjoint mean, DARE's drop and rescale), against the
real PEFT's add_weighted_adapter on GPT-2, Llama and BERT, the combined adapter as an adapter (save/load,
merge/unmerge, mixed batches), clear errors, and `lorakit combine` end to end."""
import copy

import pytest
import torch
from torch import nn

import lorakit as lk
import tiny
from cases import Holder
from lorakit.core.combine import CombineConfig, combined_factors, disjoint_mean, dropped, trimmed
from test_cli import run
from test_peft_interop import TOL, bert, gpt2, ids_for, llama, output

peft = pytest.importorskip("peft")


# --- references, from the papers' definitions ------------------------------------------------------------
def ref_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the int(density * n) entries of largest magnitude."""
    flat = t.flatten().tolist()
    keep = sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:int(density * len(flat))]
    return torch.tensor([flat[i] if i in keep else 0.0 for i in range(len(flat))], dtype=t.dtype).reshape(t.shape)


def ref_ties_merge(taus: list[torch.Tensor], weights: list[float], sign_method: str) -> torch.Tensor:
    """TIES steps 2-3, entry by entry: the elected sign (of the summed values, or of the count of signs; + on a
    tie), then the mean of the weighted entries of the tasks that have it (an entry no task agrees on is 0)."""
    flat = [t.flatten().tolist() for t in taus]
    out = []
    for j in range(len(flat[0])):
        values = [f[j] for f in flat]
        sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
        mass = sum(values) if sign_method == "total" else sum(sign(v) for v in values)
        elected = 1 if mass >= 0 else -1
        agree = [t for t, v in enumerate(values) if sign(v) == elected]
        out.append(sum(weights[t] * values[t] for t in agree) / max(1, len(agree)))
    return torch.tensor(out, dtype=taus[0].dtype).reshape(taus[0].shape)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- the arithmetic on small tensors -----------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_equals_trim_elect_and_disjoint_mean(density, sign_method):
    taus, weights = [rand(4, 6, seed=s) for s in range(3)], [0.7, -0.3, 1.5]
    expected = ref_ties_merge([ref_trim(t, density) for t in taus], weights, sign_method)
    for t in taus:
        assert torch.equal(trimmed(t, density), ref_trim(t, density))
    got = disjoint_mean(torch.stack([trimmed(t, density) for t in taus]), torch.tensor(weights), sign_method)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_dare_drops_with_p_one_minus_density_and_rescales():
    tau = rand(200, 100)
    out = dropped(tau, 0.3, torch.Generator().manual_seed(4))
    kept = out != 0
    torch.testing.assert_close(out[kept], tau[kept] / 0.3)  # kept entries rescaled by 1 / density
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # 20,000 Bernoulli(0.3) draws: 7 standard deviations
    again = dropped(tau, 0.3, torch.Generator().manual_seed(4))
    assert torch.equal(out, again) and not torch.equal(out, dropped(tau, 0.3, torch.Generator().manual_seed(5)))
    assert dropped(tau, 1.0, None) is tau  # density 1 drops nothing


def module_factors(seed, rank, d_out=6, d_in=5, groups=1, kernel=()):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, d_in // groups, *kernel, generator=g)
    B = torch.randn(d_out, rank // groups, *([1] * len(kernel)), generator=g)
    return A, B


def update(A, B, scale, groups=1) -> torch.Tensor:
    """Reference dW in float64: block-diagonal over groups, (d_out, fan_in * k)."""
    a = A.double().reshape(groups, A.shape[0] // groups, -1)
    b = B.double().reshape(groups, B.shape[0] // groups, -1)
    return scale * torch.cat([b[i] @ a[i] for i in range(groups)])


def test_cat_is_the_weighted_sum_of_updates_exactly():
    """Integer factors, weights and scales that are powers of two: every float32 product and sum is exact,
    so B_cat @ A_cat equals sum_t w_t s_t B_t A_t bit for bit."""
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randint(-3, 4, (r, 5), generator=g).float(), torch.randint(-3, 4, (6, r), generator=g).float(), s)
               for r, s in ((2, 2.0), (3, 0.5))]
    weights = [0.75, -0.25]
    A, B = combined_factors(factors, weights, CombineConfig(method="cat"), rank=7, groups=1)
    assert A.shape == (7, 5) and B.shape == (6, 7) and not A[5:].any() and not B[:, 5:].any()  # 5 padded to 7
    expected = sum(w * s * (Bt @ At) for (At, Bt, s), w in zip(factors, weights))
    assert torch.equal(lk.delta_weight(A, B, 1.0), expected)


@pytest.mark.parametrize("groups, rank, kernel", [(1, 3, ()), (1, 9, ()), (2, 4, (3,))], ids=["linear", "padded", "conv-g2"])
def test_svd_is_the_best_rank_k_approximation_of_the_weighted_sum(groups, rank, kernel):
    """Eckart-Young: the truncated SVD of each group's block of sum_t w_t dW_t, its error the discarded spectrum."""
    d_in = 4 if groups > 1 else 5
    factors = [(*module_factors(s, 4, d_in=d_in, groups=groups, kernel=kernel), sc) for s, sc in ((1, 0.5), (2, 2.0))]
    weights = [0.6, 0.4]
    A, B = combined_factors(factors, weights, CombineConfig(method="svd"), rank=rank, groups=groups)
    got = update(A, B, 1.0, groups)
    total = sum(w * update(At, Bt, s, groups) for (At, Bt, s), w in zip(factors, weights))
    blocks = total.reshape(groups, total.shape[0] // groups, -1)
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)
    k = rank // groups
    best = torch.cat([U[i, :, :k] @ torch.diag(S[i, :k]) @ Vh[i, :k] for i in range(groups)])
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
    discarded = (S[:, k:] ** 2).sum()
    torch.testing.assert_close(((total - got) ** 2).sum(), discarded, rtol=1e-4, atol=1e-5)


def test_linear_is_peft_definition_not_the_sum_of_updates():
    """linear: B = sum_t sqrt|w_t s_t| B_t, A = sum_t sign(w_t s_t) sqrt|w_t s_t| A_t (cross terms included)."""
    factors = [(*module_factors(s, 3), sc) for s, sc in ((1, 0.5), (2, 2.0))]
    weights = [0.8, -0.5]
    A, B = combined_factors(factors, weights, CombineConfig(method="linear"), rank=3, groups=1)
    x = [w * s for (_, _, s), w in zip(factors, weights)]
    ref_A = sum((abs(v) ** 0.5) * (1 if v >= 0 else -1) * At.double() for (At, _, _), v in zip(factors, x))
    ref_B = sum((abs(v) ** 0.5) * Bt.double() for (_, Bt, _), v in zip(factors, x))
    torch.testing.assert_close(A.double(), ref_A, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(B.double(), ref_B, rtol=1e-6, atol=1e-6)
    weighted_sum = sum(w * update(At, Bt, s) for (At, Bt, s), w in zip(factors, weights))
    assert (update(A, B, 1.0) - weighted_sum).abs().max() > 0.1  # not the weighted sum: cross terms


# --- against PEFT's add_weighted_adapter ---------------------------------------------------------------------
PEFT_METHODS = {
    "cat": {}, "svd": {"full_matrices": True}, "linear": {}, "ties": {"density": 0.5},
    "ties_svd": {"density": 0.5, "majority_sign_method": "frequency", "full_matrices": True},
    "dare_linear": {"density": 0.6, "seed": 3}, "dare_ties": {"density": 0.6, "seed": 3},
    "dare_linear_svd": {"density": 0.6, "seed": 3, "rank": 6, "full_matrices": True},
    "dare_ties_svd": {"density": 0.7, "seed": 3, "rank": 3, "clamp": 0.95, "full_matrices": True},
}
# (model, PEFT kwargs of adapter sql, of adapter chat): they adapt different modules, so the union is exercised
MODEL_CASES = {
    "gpt2": (gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
             dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama": (llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
              dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)),
    "bert": (bert, dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"]),
             dict(r=4, lora_alpha=2, target_modules=["query", "word_embeddings"])),
}


def peft_options(options: dict) -> dict:
    names = {"rank": "svd_rank", "clamp": "svd_clamp", "full_matrices": "svd_full_matrices"}
    return {names.get(k, k): v for k, v in options.items() if k != "seed"}


@pytest.fixture(scope="module", params=list(MODEL_CASES))
def pair(request, tmp_path_factory):
    """The same two trained adapters, sql and chat (PEFT warns of names inside its prefix "lora_"), in a PEFT model and (loaded from PEFT's files) a lorakit one."""
    make, config_a, config_b = MODEL_CASES[request.param]
    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_a), adapter_name="sql")
    theirs.add_adapter("chat", peft.LoraConfig(**config_b))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" in name:  # trained: A and B random, B no longer zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp("peft")
    theirs.save_pretrained(folder)
    ours = copy.deepcopy(base)
    for name in ("sql", "chat"):
        lk.load_adapter(ours, folder / name, adapter=name)
    return theirs.eval(), ours.eval(), base


def peft_factors(theirs, path: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = theirs.base_model.model.get_submodule(path)
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name].data, layer.lora_embedding_B[name].data
    return layer.lora_A[name].weight.data, layer.lora_B[name].weight.data


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_equals_peft_add_weighted_adapter(pair, method, monkeypatch):
    """The same factors as PEFT's (theirs zero-padded where lorakit's rank is smaller), the same outputs. DARE:
    PEFT draws its masks from torch's global generator after initialising the new adapter; it is seeded there,
    and lorakit's own generator with the same seed gives the same masks."""
    theirs, ours, _ = pair
    options, name = PEFT_METHODS[method], f"mix_{method}"
    if "seed" in options:
        import peft.tuners.lora.model as peft_lora
        freeze = peft_lora._freeze_adapter
        monkeypatch.setattr(peft_lora, "_freeze_adapter",
                            lambda model, n: (freeze(model, n), torch.manual_seed(options["seed"])))
    theirs.add_weighted_adapter(["sql", "chat"], [0.7, -0.4], name, combination_type=method, **peft_options(options))
    paths = lk.combine_adapters(ours, {"sql": 0.7, "chat": -0.4}, method=method, adapter=name, **options)
    sql, chat = set(lk.adapter_paths(ours, "sql")), set(lk.adapter_paths(ours, "chat"))
    assert set(paths) == sql | chat and sql != chat  # every module either adapts
    for path in paths:
        A, B = ours.get_submodule(path).adapters[name].A, ours.get_submodule(path).adapters[name].B
        their_A, their_B = peft_factors(theirs, path, name)
        r = A.shape[0]
        assert their_A.shape[0] >= r and not their_A[r:].any() and not their_B[:, r:].any()
        tol = TOL if method.endswith("svd") else dict(rtol=0, atol=0)  # PEFT's U @ diag(S) vs U * S
        torch.testing.assert_close(A, their_A[:r], **tol)
        torch.testing.assert_close(B, their_B[:, :r], **tol)
    ids = ids_for(ours)
    theirs.set_adapter(name)
    with lk.use(ours, name):
        torch.testing.assert_close(output(ours, ids), output(theirs, ids), **TOL)


# --- the combined adapter is an adapter --------------------------------------------------------------------
def test_cat_on_a_model_adds_the_weighted_updates_and_behaves_as_an_adapter(pair, tmp_path):
    theirs, ours, base = pair
    model = copy.deepcopy(ours)
    lk.set_active(model, "sql")
    lk.combine_adapters(model, {"sql": 0.5, "chat": 1.5}, method="cat", adapter="mix")
    assert lk.active_adapter(model) == "sql" and lk.adapter_config(model, "mix").rank == 8  # not made active
    ids = ids_for(model)
    # The reference: the base with W + sum_t w_t dW_t, by the layers' own dW of a and b.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in lk.lora_layers(reference):
            delta = sum(w * layer.delta_weight(n) for n, w in (("sql", 0.5), ("chat", 1.5)) if layer.holds(n))
            layer.base_layer.weight += delta
    with lk.disabled(reference):
        expected = output(reference, ids)
    with lk.use(model, "mix"):
        unmerged = output(model, ids)
        torch.testing.assert_close(unmerged, expected, **TOL)
        weights = {p: layer.base_layer.weight.clone() for p, layer in lk.lora_layers(model)}
        lk.merge_(model, "mix")
        torch.testing.assert_close(output(model, ids), unmerged, **TOL)
        lk.unmerge_(model)
        assert all(torch.equal(layer.base_layer.weight, weights[p]) for p, layer in lk.lora_layers(model))
    # Mixed batch: each row through its adapter equals running it alone.
    with lk.mixed_batch(model, ["mix", "sql", None]):
        mixed = output(model, ids[:1].repeat(3, 1))
    for row, adapter in enumerate(["mix", "sql", None]):
        with lk.use(model, adapter):
            torch.testing.assert_close(mixed[row:row + 1], output(model, ids[:1]), **TOL)
    # Saved in PEFT's layout: lorakit and PEFT load it and compute the same outputs.
    lk.save_adapter(model, tmp_path, adapter="mix")
    fresh = copy.deepcopy(base)
    lk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(output(fresh.eval(), ids), unmerged, **TOL)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(output(loaded, ids), unmerged, **TOL)


def test_modules_to_save_of_one_adapter_are_taken_and_of_two_refused():
    model = Holder(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("layer.0",), modules_to_save=("layer.1",)), adapter="a")
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("layer.0",)), adapter="b")
    with torch.no_grad():
        model.layer[1].copies["a"].weight.add_(1.0)
    lk.combine_adapters(model, {"a": 1.0, "b": 1.0}, method="cat", adapter="mix")
    taken = model.layer[1].copies["mix"]
    assert torch.equal(taken.weight, model.layer[1].copies["a"].weight) and taken is not model.layer[1].copies["a"]
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("layer.0",), modules_to_save=("layer.1",)), adapter="c")
    with pytest.raises(lk.LoraError, match=r"'layer.1': adapters \['a', 'c'\] each train their own copy"):
        lk.combine_adapters(model, {"a": 1.0, "c": 1.0}, method="cat", adapter="mix2")


def test_dare_with_a_seed_is_reproducible():
    model = Holder(nn.Linear(8, 8))
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        lk.inject_(model, lk.LoraConfig(rank=2, targets=("layer",)), adapter=name)
        nn.init.normal_(model.layer.adapters[name].B)
    for name, seed in (("x", 7), ("y", 7), ("z", 8)):
        lk.combine_adapters(model, {"a": 1.0, "b": 1.0}, method="dare_ties", adapter=name, density=0.5, seed=seed)
    parts = model.layer.adapters
    assert torch.equal(parts["x"].A, parts["y"].A) and torch.equal(parts["x"].B, parts["y"].B)
    assert not torch.equal(parts["x"].A, parts["z"].A)


# --- errors: clear, and the model left as it was ----------------------------------------------------------
class DoraLike(lk.LoraAdapter):
    """Stands for a variant's adapter (e.g. DoRA's, with a magnitude vector): not plain LoRA."""


def two_adapters(rank_b: int = 2, bias: str = "none") -> nn.Module:
    model = Holder(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    lk.inject_(model, lk.LoraConfig(rank=2, targets=("layer.0",)), adapter="a")
    lk.inject_(model, lk.LoraConfig(rank=rank_b, targets=("layer.0", "layer.1"), bias=bias), adapter="b")
    return model


@pytest.mark.parametrize("weights, method, options, fragment", [
    ({}, "svd", {}, "weights={}: give a non-empty mapping"),
    ({"a": 1.0, "nope": 1.0}, "svd", {}, "adapter='nope' is not in this model; its adapters are ['a', 'b']"),
    ({"a": "half", "b": 1.0}, "svd", {}, "weights['a']='half': must be a finite number"),
    ({"a": float("nan")}, "svd", {}, "weights['a']=nan"),
    ({"a": 1.0, "b": 1.0}, "svd", {"adapter": "b"}, "adapter='b' already exists"),
    ({"a": 1.0, "b": 1.0}, "nope", {}, "method='nope': must be one of svd, cat"),
    ({"a": 1.0, "b": 1.0}, "cat", {"rank": 4}, "rank=4: only the svd methods take it, not method='cat'"),
    ({"a": 1.0, "b": 1.0}, "ties", {}, "density=None: method='ties' keeps this fraction"),
    ({"a": 1.0, "b": 1.0}, "dare_linear", {"density": 0.0}, "density=0.0"),
    ({"a": 1.0, "b": 1.0}, "svd", {"seed": 1}, "seed=1: only the dare methods take it"),
    ({"a": 1.0, "b": 1.0}, "svd", {"driver": "gesvdj"}, "driver='gesvdj': cuSOLVER's drivers run on CUDA only"),
    ({"a": 1.0, "b": 1.0}, "svd", {"svd_rank": 4}, "unknown option(s) ['svd_rank']"),
])
def test_bad_arguments_are_clear_errors_and_change_nothing(weights, method, options, fragment):
    model = two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"adapter": "mix", **options}
    with pytest.raises(lk.LoraError) as caught:
        lk.combine_adapters(model, weights, method, **options)
    assert fragment in str(caught.value)
    assert lk.adapters(model) == ["a", "b"] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_entrywise_methods_need_one_rank_and_say_what_to_use():
    model = two_adapters(rank_b=3)
    with pytest.raises(lk.LoraError, match=r"method='linear' combines the A's and B's entry by entry.*'a' has rank 2, "
                                           r"'b' has rank 3; use method='cat' \(exact, rank 5\) or method='svd'"):
        lk.combine_adapters(model, {"a": 1.0, "b": 1.0}, "linear", adapter="mix")
    lk.combine_adapters(model, {"a": 1.0, "b": 1.0}, "cat", adapter="mix")  # cat and svd take any ranks
    assert lk.adapter_config(model, "mix").rank == 5


def test_variant_adapters_and_trained_biases_are_refused():
    model = two_adapters()
    model.layer[0].adapters["a"].__class__ = DoraLike
    with pytest.raises(lk.LoraError, match="adapter 'a' at 'layer.0' is a DoraLike, not a plain LoraAdapter"):
        lk.combine_adapters(model, {"a": 1.0, "b": 1.0}, "cat", adapter="mix")
    with pytest.raises(lk.LoraError, match=r"adapter 'b' trains biases \(bias='all'\)"):
        lk.combine_adapters(two_adapters(bias="all"), {"a": 1.0, "b": 1.0}, "cat", adapter="mix")


def test_a_merged_model_is_refused():
    model = two_adapters()
    lk.merge_(model, "a")
    with pytest.raises(lk.LoraError, match="model is merged"):
        lk.combine_adapters(model, {"a": 1.0, "b": 1.0}, "cat", adapter="mix")


# --- lorakit combine -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama and two adapters `lorakit train` wrote on it (different data order, targets and ranks)."""
    root = tmp_path_factory.mktemp("combine")
    model = tiny.causal_lm_dir(root / "lm")
    data = root / "text.txt"
    data.write_text("\n\n".join(tiny.TEXT.strip().splitlines() * 3) + "\n")
    for name, seed, extra in (("a", 1, ["--targets", "q_proj,v_proj"]), ("b", 2, ["--targets", "q_proj,o_proj",
                                                                                  "--rank", "4"])):
        code, _, err = run(["train", "--model", str(model), "--data", str(data), "--out", str(root / name),
                            "--steps", "2", "--lr", "1e-2", "--batch-size", "2", "--max-length", "16",
                            "--eval-fraction", "0", "--seed", str(seed), "--no-progress", *extra])
        assert code == 0, err
    return model, root / "a" / "adapter", root / "b" / "adapter"


def test_cli_combine_writes_the_adapter_combine_adapters_builds(trained, tmp_path):
    model, a, b = trained
    out = tmp_path / "mix"
    code, printed, err = run(["combine", "--model", str(model), f"{a}=0.7", f"{b}=0.3", "--method", "svd",
                              "--rank", "6", "--out", str(out)])
    assert code == 0, err
    assert f"combined 2 adapters by svd: {out} (rank 6, 6 modules" in printed
    # The reference: the library call on the same adapters.
    reference = lk.load_model(model)[0]
    lk.load_adapter(reference, a, adapter="a")
    lk.load_adapter(reference, b, adapter="b")
    lk.combine_adapters(reference, {"a": 0.7, "b": 0.3}, method="svd", adapter="mix", rank=6)
    loaded = lk.load_model(model)[0]
    lk.load_adapter(loaded, out)
    assert lk.adapters(loaded) == ["combined"] and lk.adapter_info(out)["task"] == "causal-lm"
    ids = torch.tensor([[2, 5, 9, 11, 4]])
    with lk.use(reference, "mix"):
        torch.testing.assert_close(output(loaded.eval(), ids), output(reference.eval(), ids), **TOL)


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "cat", "--rank", "4"], "--rank=4: only the svd methods take it"),
    (["--method", "ties"], "--density=None: --method='ties' keeps"),
    (["--method", "linear"], "'adapter_0' has rank 8, 'adapter_1' has rank 4; use --method='cat' (exact, rank 12)"),
])
def test_cli_combine_errors_name_the_option(trained, tmp_path, extra, fragment):
    model, a, b = trained
    code, _, err = run(["combine", "--model", str(model), f"{a}=0.7", f"{b}=0.3", "--out", str(tmp_path / "x"), *extra])
    assert code == 2 and "Traceback" not in err and not (tmp_path / "x").exists()
    assert fragment in err


def test_cli_combine_bad_pairs_and_existing_out(trained, tmp_path):
    model, a, b = trained
    code, _, err = run(["combine", "--model", str(model), f"{a}=half", "--out", str(tmp_path / "x")])
    assert code == 2 and "give DIR=WEIGHT" in err
    code, _, err = run(["combine", "--model", str(model), f"{tmp_path / 'none'}=1", "--out", str(tmp_path / "x")])
    assert code == 2 and "no such directory" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = run(["combine", "--model", str(model), f"{a}=1", f"{b}=1", "--method", "cat",
                        "--out", str(tmp_path / "full")])
    assert code == 2 and "already holds files" in err and (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_cli_combine_help_lists_every_combine_option():
    code, out, _ = run(["combine", "--help"])
    flat = " ".join(out.split())
    assert code == 0 and "DIR=WEIGHT" in flat and "lorakit combine --model smollm2-135m" in flat
    for f in CombineConfig.__dataclass_fields__:
        assert f"--{f.replace('_', '-')}" in flat
