"""lorakit.serving.cache: lazy loading, LRU eviction within capacity, counters, errors; outputs through the cache
equal each adapter loaded directly with lk.load_adapter (the reference), also with hundreds registered."""
from pathlib import Path

import pytest
import torch
import transformers

import lorakit as lk
import tiny
from walks import counting_walks

# Three adapters with different targets and ranks, so a mixed batch stacks and pads them.
ADAPTERS = {
    "qv": lk.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
    "q": lk.LoraConfig(rank=2, alpha=4, targets=("q_proj",)),
    "mlp": lk.LoraConfig(rank=8, alpha=8, targets=("up_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """A tiny Llama folder and, per adapter name, a folder written by lk.save_adapter (random, non-zero B)."""
    root = tmp_path_factory.mktemp("cache")
    model_dir = tiny.causal_lm_dir(root / "lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    result = {"model": model_dir}
    for name, config in ADAPTERS.items():
        lk.inject_(model, config, adapter=name)
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                if layer.holds(name):
                    layer.adapters[name].B.copy_(torch.randn(layer.adapters[name].B.shape, generator=g) * 0.5)
        result[name] = lk.save_adapter(model, root / name, adapter=name)
    return result


def base(folders) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folders["model"]).eval()


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(6, 60, (n, 7), generator=torch.Generator().manual_seed(seed))  # (N, T), no specials


@torch.no_grad()
def reference_logits(folders, directories: list[Path | None], ids: torch.Tensor) -> torch.Tensor:
    """Row i: a fresh base with directories[i] loaded by lk.load_adapter (None: the base alone)."""
    rows = []
    for directory, row in zip(directories, ids):
        model = base(folders)
        if directory is not None:
            lk.load_adapter(model, directory)
        rows.append(model(input_ids=row[None]).logits[0])
    return torch.stack(rows)


def cache_for(folders, capacity: int = 8) -> tuple[torch.nn.Module, lk.AdapterCache]:
    model = base(folders)
    cache = lk.AdapterCache(model, capacity)
    cache.register_many({name: folders[name] for name in ADAPTERS})
    return model, cache


# --- lazy loading, hits, load times -------------------------------------------------------------------
def test_register_loads_nothing(folders):
    model, cache = cache_for(folders)
    assert cache.registered() == list(ADAPTERS)
    assert lk.adapters(model) == [] and not list(lk.lora_layers(model)) and cache.loaded() == []
    assert cache.stats() == {"capacity": 8, "registered": 3, "resident": [], "hits": 0, "misses": 0,
                             "evictions": 0, "load_seconds": {}}


def test_first_use_loads_and_times_it_reuse_is_a_hit(folders):
    model, cache = cache_for(folders)
    cache.ensure(["qv", None, "qv"])
    assert lk.adapters(model) == ["qv"] and cache.loaded() == ["qv"]
    assert (cache.hits, cache.misses) == (0, 1)
    first = cache.load_times
    assert list(first) == ["qv"] and 0 < first["qv"] < 60
    cache.ensure(["qv"])
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 0)
    assert cache.load_times == first  # not loaded again
    cache.ensure([None, None])  # the base alone loads nothing
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1


def test_loading_leaves_the_active_adapter_alone(folders):
    model, cache = cache_for(folders)
    ids = tokens(2)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        cache.ensure(["qv", "q"])
        assert lk.active_adapter(model) is None
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # outside a batch: the base


# --- LRU ---------------------------------------------------------------------------------------------
def test_lru_order_and_eviction_within_capacity(folders):
    model, cache = cache_for(folders, capacity=2)
    cache.ensure(["qv"])
    cache.ensure(["q"])
    assert cache.loaded() == ["qv", "q"]  # least recently used first
    cache.ensure(["qv"])
    assert cache.loaded() == ["q", "qv"]
    cache.ensure(["mlp"])  # full: evicts the least recently used, "q"
    assert cache.loaded() == ["qv", "mlp"] and sorted(lk.adapters(model)) == ["mlp", "qv"]
    cache.ensure(["q"])
    assert cache.loaded() == ["mlp", "q"] and sorted(lk.adapters(model)) == ["mlp", "q"]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 4, 2)


def test_never_evicts_an_adapter_the_call_needs(folders):
    model, cache = cache_for(folders, capacity=2)
    cache.ensure(["qv"])
    cache.ensure(["q"])  # "qv" is now the least recently used ...
    cache.ensure(["mlp", "qv"])  # ... but this call needs it: "q" goes
    assert cache.loaded() == ["mlp", "qv"] and sorted(lk.adapters(model)) == ["mlp", "qv"]


def test_an_open_batch_keeps_its_adapters(folders):
    model, cache = cache_for(folders, capacity=2)
    with cache.batch(["qv", None]):
        cache.ensure(["q"])
        cache.ensure(["mlp"])  # full: "qv" is older, but the open batch uses it, so "q" goes
        assert cache.loaded() == ["qv", "mlp"]
        with pytest.raises(lk.LoraError, match=r"capacity=2.*2 different adapters at once, 1 more held by an open "
                                                r"batch.*capacity=3"):
            cache.ensure(["q", "mlp"])
    cache.ensure(["q"])  # after the block "qv" may go
    assert cache.loaded() == ["mlp", "q"] and sorted(lk.adapters(model)) == ["mlp", "q"]


def test_keep_protects_adapters_the_call_does_not_name(folders):
    model, cache = cache_for(folders, capacity=2)
    cache.ensure(["qv"])
    cache.ensure(["q"])  # "qv" is now the least recently used ...
    cache.ensure(["mlp"], keep=["qv", None, "mlp"])  # ... but kept: "q" goes
    assert cache.loaded() == ["qv", "mlp"] and sorted(lk.adapters(model)) == ["mlp", "qv"]
    cache.ensure(["q"], keep=["q"])  # keeping what the call names anyway changes nothing: "qv" goes
    assert cache.loaded() == ["mlp", "q"]
    with pytest.raises(lk.LoraError, match=r"capacity=2.*1 different adapters at once, 2 more in keep.*capacity=3"):
        cache.ensure(["qv"], keep=["mlp", "q"])
    assert cache.loaded() == ["mlp", "q"] and cache.misses == 4  # checked before evicting anything
    with pytest.raises(lk.LoraError, match=r"keep: unknown adapter\(s\) \['sql'\]"):
        cache.ensure(["q"], keep=["sql"])
    with pytest.raises(lk.LoraError, match=r"keep='q': give a list"):
        cache.ensure(["q"], keep="q")


def test_keep_counts_only_resident_adapters(folders):
    model, cache = cache_for(folders, capacity=1)
    cache.ensure(["q"], keep=["qv", "mlp"])  # not loaded: nothing to keep, and room for "q"
    assert cache.loaded() == ["q"]


def test_hold_pins_like_batch_without_a_mixed_batch(folders):
    model, cache = cache_for(folders, capacity=2)
    ids = tokens(2)
    with torch.no_grad():
        base_out = model(input_ids=ids).logits
    with cache.hold(["qv", None]) as held:
        assert held is model and cache.loaded() == ["qv"]
        assert all(m.routing is None for _, m in lk.lora_layers(model))  # not a mixed batch: the caller routes
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, base_out, rtol=0, atol=0)  # active: none
        with cache.hold(["q"]):  # nested: both held
            with pytest.raises(lk.LoraError, match=r"capacity=2.*1 different adapters at once, 2 more held by an "
                                                    r"open batch\(\) or hold\(\)"):
                cache.ensure(["mlp"])
        cache.ensure(["mlp"])  # "q" is free again; "qv" is still held
        assert cache.loaded() == ["qv", "mlp"]
        with pytest.raises(lk.LoraError, match=r"'qv': in use by an open cache.batch\(\) or cache.hold\(\)"):
            cache.register("qv", folders["q"])
    cache.ensure(["q"])  # after the block "qv" may go
    assert cache.loaded() == ["mlp", "q"]


def test_more_adapters_in_one_call_than_capacity_is_an_error(folders):
    model, cache = cache_for(folders, capacity=2)
    with pytest.raises(lk.LoraError, match=r"capacity=2.*3 different adapters.*capacity=3"):
        cache.ensure(["qv", "q", None, "mlp", "q"])
    assert lk.adapters(model) == [] and cache.stats()["misses"] == 0  # checked before loading anything


def test_an_adapter_deleted_behind_the_cache_is_loaded_again(folders):
    model, cache = cache_for(folders)
    cache.ensure(["qv"])
    lk.delete_adapter(model, "qv")
    cache.ensure(["qv"])
    assert lk.adapters(model) == ["qv"] and (cache.hits, cache.misses) == (0, 2)
    cache.ensure(["q", "mlp"])
    lk.delete_adapter(model, "q")
    lk.unload_(model)  # and every LoRA layer replaced: the layers the cache loaded into are gone
    lk.inject_(model, ADAPTERS["mlp"], adapter="mlp")  # an adapter of a cached name, but not the cache's
    cache.ensure(["mlp"])  # as before: a name on the model counts as loaded
    assert cache.loaded() == ["mlp"] and (cache.hits, cache.misses) == (1, 4)


def test_registering_a_new_folder_for_a_name_reloads_it(folders):
    model, cache = cache_for(folders)
    ids = tokens(1)
    cache.ensure(["qv"])
    cache.register("qv", folders["q"])  # same name, other adapter
    assert cache.loaded() == [] and lk.adapters(model) == []
    with torch.no_grad(), cache.batch(["qv"]):
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, reference_logits(folders, [folders["q"]], ids), rtol=1e-5, atol=1e-5)


# --- outputs equal the reference --------------------------------------------------------------------------
def test_batch_outputs_equal_each_adapter_loaded_directly(folders):
    model, cache = cache_for(folders, capacity=3)
    names = ["qv", None, "mlp", "q", "qv", None]
    ids = tokens(len(names))
    expected = reference_logits(folders, [folders[n] if n else None for n in names], ids)
    with torch.no_grad(), cache.batch(names) as served:
        assert served is model
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_evicted_and_reloaded_adapters_give_the_same_outputs(folders):
    model, cache = cache_for(folders, capacity=1)
    ids = tokens(1)
    outputs = {}
    for name in ("qv", "q", "mlp", "qv"):  # every call evicts the previous adapter
        with torch.no_grad(), cache.batch([name]):
            outputs.setdefault(name, []).append(model(input_ids=ids).logits)
        assert lk.adapters(model) == [name]
    assert cache.evictions == 3
    torch.testing.assert_close(outputs["qv"][0], outputs["qv"][1], rtol=0, atol=0)
    torch.testing.assert_close(outputs["mlp"][0], reference_logits(folders, [folders["mlp"]], ids),
                               rtol=1e-5, atol=1e-5)


def test_hundreds_of_registered_names_serve_batches_within_capacity(folders):
    model = base(folders)
    cache = lk.AdapterCache(model, capacity=4)
    kinds = list(ADAPTERS)
    task_folder = {f"task{i:03d}": folders[kinds[i % 3]] for i in range(200)}  # 200 tasks, three real folders
    cache.register_many(task_folder)
    assert len(cache.registered()) == 200 and lk.adapters(model) == []
    for seed, names in enumerate([["task000", "task101", None, "task002", "task000", "task199"],
                                  ["task150", None, "task151", "task000", "task152"]]):
        ids = tokens(len(names), seed)
        expected = reference_logits(folders, [task_folder[n] if n else None for n in names], ids)
        with torch.no_grad(), cache.batch(names):
            out = model(input_ids=ids).logits
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert len(lk.adapters(model)) <= 4
    assert cache.loaded() == ["task150", "task151", "task000", "task152"]
    assert cache.evictions == 3 and cache.hits == 1 and cache.misses == 7
    assert set(cache.load_times) == {"task000", "task101", "task002", "task199", "task150", "task151", "task152"}


def test_many_cycling_adapters_give_fresh_load_outputs_and_each_miss_does_the_same_work(folders, tmp_path, monkeypatch):
    """Twelve distinct adapters cycle four times through capacity 3: every miss (an eviction and a load) walks the
    model four times, however many adapters came before, probes no base weight after the first load and, once
    the cache is full, builds no module (the evicted adapter's are reused); the outputs after all cycles equal a
    fresh base with each adapter loaded directly."""
    model = base(folders)
    writer = base(folders)
    g = torch.Generator().manual_seed(3)
    directories = {}
    for i in range(12):
        lk.inject_(writer, ADAPTERS["qv"], adapter="w")
        with torch.no_grad():
            for _, layer in lk.lora_layers(writer):
                layer.adapters["w"].B.copy_(torch.randn(layer.adapters["w"].B.shape, generator=g))
        directories[f"t{i}"] = lk.save_adapter(writer, tmp_path / f"t{i}", adapter="w")
        lk.delete_adapter(writer, "w")
    cache = lk.AdapterCache(model, capacity=3)
    cache.register_many(directories)
    probed, real = [], lk.io.integrity._probe_weights
    monkeypatch.setattr(lk.io.integrity, "_probe_weights", lambda weights: probed.append(len(weights)) or real(weights))
    built, module_init = [], torch.nn.Module.__init__
    monkeypatch.setattr(torch.nn.Module, "__init__",
                        lambda self, *a, **k: built.append(1) or module_init(self, *a, **k))
    walks = []
    with counting_walks(model) as children:
        for cycle in range(4):
            for name in directories:
                before, probes_before, built_before = children.listed, len(probed), len(built)
                cache.ensure([name])
                walks.append(children.listed - before)
                assert cycle == 0 and name == "t0" or sum(probed[probes_before:]) == 0, name  # remembered
                assert cycle == 0 and name in ("t0", "t1", "t2") or len(built) == built_before, name
    # the eviction, the active adapter before and after (the first follower only), the load's listing of modules;
    # the check for adapters deleted behind the cache's back looks at the layers they were loaded into
    assert walks[3:] == [4] * (len(walks) - 3), walks
    assert cache.misses == 48 and cache.evictions == 45
    names = ["t9", None, "t10", "t11", "t9"]
    ids = tokens(len(names), seed=5)
    with torch.no_grad(), cache.batch(names):
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, reference_logits(folders, [directories[n] if n else None for n in names], ids),
                               rtol=1e-5, atol=1e-5)


# --- errors ----------------------------------------------------------------------------------------------------
def test_unknown_name_lists_the_registered_ones(folders):
    model, cache = cache_for(folders)
    with pytest.raises(lk.LoraError, match=r"unknown adapter\(s\) \['sql'\]; registered: qv, q, mlp.*cache.register"):
        cache.ensure(["qv", "sql"])
    assert lk.adapters(model) == []
    many = lk.AdapterCache(base(folders))
    many.register_many({f"t{i}": folders["q"] for i in range(30)})
    with pytest.raises(lk.LoraError, match=r"registered: t0, t1, .*t19 and 10 more"):
        many.ensure(["nope"])


@pytest.mark.parametrize("make_bad, message", [
    (lambda d: d / "missing", r"is not a directory"),
    (lambda d: d / "no_weights", r"adapter_model.safetensors: file not found"),
    (lambda d: d / "no_config", r"adapter_config.json: file not found"),
])
def test_bad_directory_is_named_and_nothing_registers(folders, tmp_path, make_bad, message):
    for name, keep in (("no_weights", "adapter_config.json"), ("no_config", "adapter_model.safetensors")):
        (tmp_path / name).mkdir()
        (tmp_path / name / keep).write_bytes((folders["q"] / keep).read_bytes())
    bad = make_bad(tmp_path)
    model, cache = cache_for(folders)
    with pytest.raises(lk.LoraError, match=message) as err:
        cache.register_many({"fine": folders["q"], "broken": bad})
    assert "'broken'" in str(err.value) and str(bad) in str(err.value)
    assert cache.registered() == list(ADAPTERS)  # all or none


def test_bad_arguments_name_the_value_and_the_fix(folders):
    model, cache = cache_for(folders)
    for capacity in (0, -1, 2.5, True):
        with pytest.raises(lk.LoraError, match=rf"capacity={capacity!r}: must be a positive integer"):
            lk.AdapterCache(model, capacity)
    with pytest.raises(lk.LoraError, match=r"'bad name'.*letters, digits"):
        cache.register("bad name", folders["q"])
    with pytest.raises(lk.LoraError, match=r"names='qv': give a list"):
        cache.ensure("qv")
    with pytest.raises(lk.LoraError, match=r"mapping=list: give a dict"):
        cache.register_many([("x", folders["q"])])
    lk.load_adapter(model, folders["q"], adapter="mine")
    with pytest.raises(lk.LoraError, match=r"already has an adapter 'mine' that this cache did not load"):
        cache.register("mine", folders["q"])
