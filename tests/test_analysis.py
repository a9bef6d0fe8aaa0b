"""lorakit.analysis.measures against known answers on constructed matrices, the reference LoRA update, and
`lorakit analyze` end to end on tiny real models."""
import json
import math

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.analysis import measures as an
from lorakit.cli import main

import reference
import tiny


def orthonormal_rows(count: int, dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # (count, dim)


def lowrank_from(values, rows: torch.Tensor) -> torch.Tensor:
    """diag(values) @ rows: a matrix whose right-singular vectors are `rows`, in order."""
    return torch.diag(torch.tensor(values, dtype=torch.float64)) @ rows


def reference_phi(first: torch.Tensor, second: torch.Tensor, i: int, j: int) -> float:
    """The paper's definition, one entry at a time: ||U_i^T V_j||_F^2 / min(i, j), U_i and V_j the top-i and
    top-j right-singular vectors of the two matrices."""
    u = torch.linalg.svd(first.double(), full_matrices=False).Vh[:i]
    v = torch.linalg.svd(second.double(), full_matrices=False).Vh[:j]
    return torch.linalg.matrix_norm(u @ v.T).item() ** 2 / min(i, j)


def assert_phi_is_the_reference(phi: list, first: torch.Tensor, second: torch.Tensor) -> None:
    for i, row in enumerate(phi, 1):
        for j, value in enumerate(row, 1):
            assert value == pytest.approx(reference_phi(first, second, i, j), abs=1e-12), (i, j)


# --- subspace similarity ------------------------------------------------------------------------------------------
def test_identical_subspaces_give_one_everywhere():
    A = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    phi = an.subspace_similarity(A, A)
    assert phi.shape == (8, 8)
    torch.testing.assert_close(phi, torch.ones(8, 8, dtype=torch.float64))


def test_a_subspace_inside_a_larger_one_gives_one():
    """The top-4 directions of the first lie inside the second's top 8 (but not its top 4)."""
    rows = orthonormal_rows(12, 48, seed=1)
    first = lowrank_from([4, 3, 2, 1], rows[:4])
    second = lowrank_from([9, 8, 7, 6, 5, 4, 3, 2], torch.cat([rows[4:8], rows[:4]]))
    phi = an.subspace_similarity(first, second)
    assert phi.shape == (4, 8)
    assert phi[3, 7].item() == pytest.approx(1.0)  # all 4 inside all 8
    assert phi[0, 3].item() == pytest.approx(0.0, abs=1e-12)  # second's top 4 are other directions
    # the second's top 6 are rows 4..7 and 0, 1: the first's top 2 (rows 0, 1) lie inside, rows 2, 3 do not
    assert phi[1, 5].item() == pytest.approx(1.0)  # 2 of 2
    assert phi[3, 5].item() == pytest.approx(0.5)  # 2 of 4


def test_orthogonal_subspaces_give_zero():
    rows = orthonormal_rows(16, 32, seed=2)
    phi = an.subspace_similarity(rows[:8] * 3, rows[8:] * 5)
    assert phi.abs().max().item() < 1e-12


def test_random_subspaces_give_the_expected_value():
    """E[phi(i, j)] = max(i, j) / d for independent random subspaces."""
    d, trials = 128, 200
    generator = torch.Generator().manual_seed(3)
    phis = torch.stack([an.subspace_similarity(torch.randn(8, d, generator=generator),
                                               torch.randn(32, d, generator=generator)) for _ in range(trials)])
    mean = phis.mean(0)
    for i, j in ((1, 1), (8, 8), (1, 32), (8, 32), (4, 16)):
        assert mean[i - 1, j - 1].item() == pytest.approx(max(i, j) / d, rel=0.15), (i, j)
    assert an.random_similarity(8, 32, d) == 32 / d  # what the report prints as the chance level


def test_subspaces_of_different_spaces_are_refused():
    with pytest.raises(lk.LoraError, match="fan_in 16 vs 32"):
        an.subspace_similarity(torch.randn(4, 16), torch.randn(4, 32))


# --- spectra and effective rank -----------------------------------------------------------------------------------------
def lora_update(values, d_out=24, d_in=40, seed=4) -> an.Update:
    """dW = B @ A with singular values `values`: B = U diag(values), A = V^T (scale 1)."""
    r = len(values)
    U, V = orthonormal_rows(r, d_out, seed).T, orthonormal_rows(r, d_in, seed + 1)
    B = U @ torch.diag(torch.tensor(values, dtype=torch.float64))
    return an.Update("m", lk.delta_weight(V, B, 1.0), V, None, r, "lora")


def test_spectrum_of_a_constructed_update():
    update = lora_update([5.0, 3.0, 0.5, 0.1])
    torch.testing.assert_close(an.spectrum(update), torch.tensor([5.0, 3.0, 0.5, 0.1], dtype=torch.float64))


def test_effective_rank_of_known_spectra():
    """exp(entropy of p = sigma / sum sigma), worked by hand."""
    # k equal non-zero values: p = 1/k each, entropy ln k, effective rank k; zeros do not count
    assert an.effective_rank(torch.ones(6)) == pytest.approx(6.0)
    assert an.effective_rank(torch.tensor([3.0, 3.0, 3.0, 0.0, 0.0])) == pytest.approx(3.0)
    # one non-zero value: p = (1), entropy 0, effective rank 1
    assert an.effective_rank(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1.0)
    # [2, 1, 1]: p = (1/2, 1/4, 1/4), entropy 1/2 ln 2 + 2 (1/4) ln 4 = 3/2 ln 2: 2^(3/2) = 2.8284...
    assert an.effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2.8284271247461903)
    assert an.effective_rank(torch.tensor([8.0, 4.0, 4.0])) == pytest.approx(2.8284271247461903)  # scale-free
    # [4, 2, 1, 1]: p = (1/2, 1/4, 1/8, 1/8), entropy (1/2 + 2/4 + 2 (3/8)) ln 2 = 7/4 ln 2: 2^(7/4) = 3.3635...
    assert an.effective_rank(torch.tensor([1.0, 4.0, 1.0, 2.0])) == pytest.approx(3.363585661014858)  # any order
    assert an.effective_rank(torch.zeros(3)) == 0.0


def test_energy_rank_is_the_fewest_directions_holding_the_share():
    values = torch.tensor([3.0, 1.0, 1.0, 1.0])  # energies 9, 1, 1, 1: 75%, 83%, 92%, 100%
    assert an.energy_rank(values) == 3
    assert an.energy_rank(values, share=0.75) == 1
    assert an.energy_rank(values, share=0.8) == 2
    assert an.energy_rank(torch.ones(4), share=0.5) == 2  # exactly half: 2 directions, no rounding surprise
    assert an.energy_rank(torch.zeros(4)) == 0


# --- amplification -----------------------------------------------------------------------------------------------
def weight_with_spectrum(values, d_out=20, d_in=30, seed=5):
    U, V = orthonormal_rows(len(values), d_out, seed).T, orthonormal_rows(len(values), d_in, seed + 1)
    return U @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ V, U, V


def test_an_update_along_w_top_direction_is_not_amplified():
    W, U, V = weight_with_spectrum([10.0, 4.0, 2.0, 1.0])
    delta = 0.5 * U[:, :1] @ V[:1]  # dW along W's top singular pair
    result = an.amplification(an.Update("m", delta, V[:1], W, 1, "lora"))
    assert result["projected"] == pytest.approx(10.0) and result["own"] == pytest.approx(10.0)
    assert result["factor"] == pytest.approx(0.5 / 10.0)
    assert result["weight_norm"] == pytest.approx(math.sqrt(100 + 16 + 4 + 1))


def test_an_update_along_w_weakest_direction_is_amplified():
    W, U, V = weight_with_spectrum([10.0, 4.0, 2.0, 0.01])
    delta = 2.0 * U[:, 3:] @ V[3:]
    result = an.amplification(an.Update("m", delta, V[3:], W, 1, "lora"))
    assert result["projected"] == pytest.approx(0.01)
    assert result["factor"] == pytest.approx(200.0)
    assert result["own"] == pytest.approx(10.0)


def test_random_directions_hold_their_share_of_w():
    """E ||Q_out^T W Q_in||_F^2 = r^2 / (d_out d_in) ||W||_F^2 for random orthonormal r-frames."""
    W = torch.randn(40, 60, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    update = an.Update("m", torch.randn(40, 60, dtype=torch.float64), torch.eye(60), W, 4, "full")
    result = an.amplification(update, rank=4, trials=200)
    expected = 4 / math.sqrt(40 * 60) * torch.linalg.matrix_norm(W).item()
    assert result["random"] == pytest.approx(expected, rel=0.1)
    assert result["rank"] == 4


def test_amplification_without_weights_says_what_to_give():
    with pytest.raises(lk.LoraError, match="--base"):
        an.amplification(lora_update([1.0]))


# --- updates from adapters and models, against the reference --------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(12, 20), "gpt": Conv1D(16, 12)}) for _ in range(2)])
        self.embed = nn.Embedding(30, 12)


def adapted(seed=0, rank=3, alpha=6.0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    lk.inject_(model, lk.LoraConfig(rank=rank, alpha=alpha, targets=("proj", "gpt", "embed")))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["default"].B.normal_()
    return model


def test_model_updates_match_the_reference_update_and_weight():
    model = adapted()
    updates = an.model_updates(model)
    assert set(updates) == {"layers.0.proj", "layers.0.gpt", "layers.1.proj", "layers.1.gpt", "embed"}
    for path, layer in lk.lora_layers(model):
        A, B, s = layer.adapters["default"].A.double(), layer.adapters["default"].B.double(), layer.adapters["default"].scale
        update = updates[path]
        torch.testing.assert_close(update.delta, reference.update(A, B, s))
        W = layer.base_layer.weight.double()
        torch.testing.assert_close(update.weight, W if isinstance(layer.base_layer, nn.Linear) else W.T)
        torch.testing.assert_close(update.basis, A)
        assert update.rank == 3 and update.kind == "lora"


def test_adapter_folder_updates_equal_the_models(tmp_path):
    model = adapted()
    lk.save_adapter(model, tmp_path / "a")
    from_file, from_model = an.adapter_updates(tmp_path / "a"), an.model_updates(model)
    assert set(from_file) == set(from_model)
    for path, update in from_file.items():
        torch.testing.assert_close(update.delta, from_model[path].delta)
        assert update.weight is None


def test_weight_updates_are_the_difference_found_by_path_suffix():
    torch.manual_seed(0)
    before = Net()
    after = nn.ModuleDict({"inner": Net()})  # a wrapper prefix, like BertForSequenceClassification's `bert.`
    after["inner"].load_state_dict(before.state_dict())
    with torch.no_grad():
        after["inner"].layers[1].proj.weight.add_(0.5)
        after["inner"].layers[0].gpt.weight.mul_(2)
    updates = an.weight_updates(before, after, ("proj", "gpt"))
    assert set(updates) == {"inner.layers.0.proj", "inner.layers.0.gpt", "inner.layers.1.proj", "inner.layers.1.gpt"}
    torch.testing.assert_close(updates["inner.layers.1.proj"].delta, torch.full((20, 12), 0.5, dtype=torch.float64))
    torch.testing.assert_close(updates["inner.layers.0.gpt"].delta, before.layers[0].gpt.weight.double().T)
    assert updates["inner.layers.0.proj"].delta.abs().max() == 0
    assert updates["inner.layers.1.proj"].rank == 12 and updates["inner.layers.1.proj"].kind == "full"
    with pytest.raises(lk.LoraError, match="targets=.*query,value"):
        an.weight_updates(before, after, ("nothing",))


def test_analyze_pairs_modules_and_reports_every_measure():
    first, second = an.model_updates(adapted(seed=0)), an.model_updates(adapted(seed=1, rank=5))
    result = an.analyze(first, second, directions=4)
    entry = next(m for m in result["modules"] if m["path"] == "layers.1.proj")
    assert entry["group"] == "layers.*.proj" and entry["layer"] == 1 and entry["rank"] == 3
    assert entry["spectrum"] == pytest.approx(torch.linalg.svdvals(first["layers.1.proj"].delta)[:3].tolist())
    phi = entry["similarity"]["phi"]  # A of rank 3 against the top 4 directions of A of rank 5
    assert (len(phi), len(phi[0]), entry["similarity"]["dimension"]) == (3, 4, 12)
    assert_phi_is_the_reference(phi, first["layers.1.proj"].basis, second["layers.1.proj"].basis)
    assert entry["amplification"]["rank"] == 3
    assert json.loads(json.dumps(result)) == result  # plain numbers only
    with pytest.raises(lk.LoraError, match="share no module"):
        an.analyze(first, {"elsewhere": first["embed"]})


def test_analyze_reports_the_known_measures_of_a_constructed_update():
    """dW with singular values (2, 1, 1): effective rank 2^(3/2) (worked above); energies 4, 1, 1 of 6, so
    90% of it needs all 3 directions and the top one holds 2/3; ||dW||_F = sqrt(6). Compared with
    itself, every phi(i, j) is 1."""
    update = lora_update([2.0, 1.0, 1.0])
    entry = an.analyze({"layers.0.q": update}, {"layers.0.q": update})["modules"][0]
    assert entry["spectrum"] == pytest.approx([2.0, 1.0, 1.0])
    assert entry["effective_rank"] == pytest.approx(2.8284271247461903)
    assert entry["energy_rank"] == 3 and entry["top_share"] == pytest.approx(2 / 3)
    assert entry["delta_norm"] == pytest.approx(math.sqrt(6))
    assert (entry["group"], entry["layer"], entry["rank"], entry["shape"]) == ("layers.*.q", 0, 3, [24, 40])
    assert entry["similarity"]["phi"] == [pytest.approx([1.0] * 3)] * 3


# --- lorakit analyze, end to end on a tiny Llama --------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"


def saved_adapter(model_dir, folder, rank: int, seed: int):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    lk.inject_(model, lk.LoraConfig(rank=rank, alpha=2.0 * rank, targets=("q_proj", "v_proj")))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["default"].B.normal_(std=0.1)
    lk.save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Llama, two adapters on it (rank 4 and rank 8), and a 'fully fine-tuned' copy of it."""
    root = tmp_path_factory.mktemp("analyze")
    base = tiny.causal_lm_dir(root / "lm")
    full = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, p in full.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    full.save_pretrained(root / "full")
    return {"base": base, "r4": saved_adapter(base, root / "r4", 4, seed=0),
            "r8": saved_adapter(base, root / "r8", 8, seed=1), "full": root / "full"}


def analyze(capsys, *argv):
    code = main(["analyze", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_writes_the_report_and_figures(runs, tmp_path, capsys):
    out = tmp_path / "report"
    code, printed, err = analyze(capsys, runs["r4"], "--compare", runs["r8"], "--base", runs["base"], "--out", out)
    assert code == 0, err
    assert f"report: {out / 'report.md'}" in printed and "phi(1, 1)" in printed and "amplification" in printed
    text = (out / "report.md").read_text()
    for heading in ("## 1. How many directions", "## 2. Do the two updates learn the same directions?",
                    "## 3. Does the update amplify", "](spectra.png)", "](similarity.png)"):
        assert heading in text
    for figure in ("spectra.png", "similarity.png", "similarity_layers.png"):
        assert (out / figure).read_bytes()[:8] == PNG and f"]({figure})" in text
    result = json.loads((out / "report.json").read_text())
    assert len(result["modules"]) == 4  # 2 layers x (q_proj, v_proj)
    for m in result["modules"]:
        assert len(m["similarity"]["phi"]) == 4 and len(m["similarity"]["phi"][0]) == 8
        assert m["path"] in text and m["amplification"]["rank"] == 4
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_analyze_the_adapter_alone_needs_no_base(runs, tmp_path, capsys):
    out = tmp_path / "alone"
    code, printed, err = analyze(capsys, runs["r8"], "--out", out)
    assert code == 0, err
    text = (out / "report.md").read_text()
    assert "## 1." in text and "## 2." not in text and "## 3." not in text and "not given" in text
    assert not (out / "similarity.png").exists() and (out / "spectra.png").is_file()
    result = json.loads((out / "report.json").read_text())
    assert all(len(m["spectrum"]) == 8 and "amplification" not in m for m in result["modules"])


def test_analyze_a_full_fine_tuning_run_against_an_adapter(runs, tmp_path, capsys):
    out = tmp_path / "full"
    code, printed, err = analyze(capsys, runs["full"], "--compare", runs["r4"], "--base", runs["base"], "--out", out)
    assert code == 0, err
    result = json.loads((out / "report.json").read_text())
    assert result["sources"]["kinds"]["adapter"].startswith("full fine-tuning")
    assert {m["path"].rsplit(".", 1)[-1] for m in result["modules"]} == {"q_proj", "v_proj"}  # the adapter's modules
    q = next(m for m in result["modules"] if m["path"].endswith("0.self_attn.q_proj"))
    assert q["kind"] == "full" and q["rank"] == 32 and len(q["similarity"]["phi"][0]) == 4


@pytest.mark.parametrize("argv, fragment", [
    (["{full}", "--targets", "q_proj"], "--base"),
    (["{full}", "--base", "{base}"], "--targets"),
    (["{r4}", "--rank", "-1"], "--rank=-1"),
    (["{r4}", "--directions", "0"], "--directions=0"),
])
def test_analyze_errors_name_the_option(runs, tmp_path, capsys, argv, fragment):
    argv = [a.format(**runs) for a in argv]
    code, _, err = analyze(capsys, *argv, "--out", tmp_path / "x")
    assert code == 2 and fragment in err
    assert not (tmp_path / "x").exists()


def test_basis_delta_compares_the_updates_own_directions():
    first, second = an.model_updates(adapted(seed=0)), an.model_updates(adapted(seed=1, rank=5))
    result = an.analyze(first, second, directions=4, basis="delta")
    phi = next(m for m in result["modules"] if m["path"] == "layers.0.gpt")["similarity"]["phi"]
    assert (len(phi), len(phi[0])) == (3, 4)  # dW of rank 3 has 3 directions, however many are asked for
    assert_phi_is_the_reference(phi, first["layers.0.gpt"].delta, second["layers.0.gpt"].delta)
    assert result["basis"] == "delta"
    with pytest.raises(lk.LoraError, match="basis='B'.*A, delta"):
        an.analyze(first, basis="B")


def test_a_full_update_is_amplified_over_the_compared_adapters_rank():
    torch.manual_seed(0)
    before, after = Net(), Net()
    full = an.weight_updates(before, after, ("proj",))
    lora = an.model_updates(adapted(rank=3))
    with_lora = {m["path"]: m for m in an.analyze(full, lora)["modules"]}
    alone = {m["path"]: m for m in an.analyze(full)["modules"]}
    assert with_lora["layers.0.proj"]["amplification"]["rank"] == 3
    assert alone["layers.0.proj"]["amplification"]["rank"] == an.FULL_UPDATE_RANK
    assert an.analyze(full, rank=2)["modules"][0]["amplification"]["rank"] == 2
