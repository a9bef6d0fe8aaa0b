"""The serving engine, stepped by hand on a tiny Llama: every row of a continuous, mixed-adapter batch
writes what the same request writes alone (transformers' own greedy generate), whatever joins or leaves."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import lorakit as lk
from lorakit.errors import LoraError
from lorakit.serving.engine import Engine, Event, QueueFull, Request, Sampling, sample_token
from server import random_adapter
import tiny

PROMPTS = ["the lord said unto", "in the day that the king of the land came to the house", "he was",
           "they made the house and", "the son of god"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    model_dir = tiny.causal_lm_dir(root / "lm")
    adapters = {"a": random_adapter(model_dir, root / "a", seed=1),
                "b": random_adapter(model_dir, root / "b", seed=2, rank=2, targets=("up_proj", "down_proj")),
                "c": random_adapter(model_dir, root / "c", seed=3)}
    return model_dir, adapters


def base(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def engine(setup, capacity: int = 3, **kwargs) -> Engine:
    model_dir, adapters = setup
    model = base(model_dir)
    cache = lk.AdapterCache(model, capacity=capacity)
    cache.register_many(adapters)
    return Engine(model, transformers.AutoTokenizer.from_pretrained(model_dir), cache, **kwargs)


def alone(setup, prompt: str, adapter: str | None, new_tokens: int) -> list[int]:
    """transformers' greedy generate of one prompt, no padding, the adapter loaded as the only one."""
    model_dir, adapters = setup
    model = base(model_dir)
    if adapter is not None:
        lk.load_adapter(model, adapters[adapter])
    ids = transformers.AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "text")

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1].kind in ("finish", "error")


def request(eng: Engine, prompt: str, adapter: str | None, sampling: Sampling) -> tuple[Request, Recorder]:
    recorder = Recorder()
    return Request(eng.tokenizer(prompt)["input_ids"], adapter, sampling, recorder), recorder


def run_until_done(eng: Engine, recorders: list[Recorder], limit: int = 200) -> None:
    for _ in range(limit):
        if all(r.finished for r in recorders):
            return
        eng.step()
    raise AssertionError("requests did not finish")


def test_rows_that_join_and_leave_at_different_steps_write_what_each_writes_alone(setup):
    eng = engine(setup)
    plan = [(PROMPTS[0], "a", 9, 0), (PROMPTS[1], None, 4, 0), (PROMPTS[2], "b", 12, 2), (PROMPTS[3], "c", 6, 3),
            (PROMPTS[4], "a", 10, 5), (PROMPTS[1], "b", 7, 5)]  # prompt, adapter, max_tokens, step it arrives at
    submitted = []
    for step in range(40):
        for prompt, adapter, n, at in plan:
            if at == step:
                submitted.append((request(eng, prompt, adapter, Sampling(max_tokens=n)), prompt, adapter, n))
                eng.submit(submitted[-1][0][0])
        eng.step()
    assert len(submitted) == len(plan)
    for (req, recorder), prompt, adapter, n in submitted:
        assert recorder.finished and recorder.events[-1].kind == "finish"
        assert req.generated == alone(setup, prompt, adapter, n)[:len(req.generated)]
        assert len(req.generated) == n or req.generated[-1] in eng.eos_ids


def test_a_request_that_arrives_mid_decode_starts_at_the_next_step(setup):
    eng = engine(setup)
    first, _ = request(eng, PROMPTS[0], "a", Sampling(max_tokens=30))
    eng.submit(first)
    for _ in range(3):
        eng.step()
    late, _ = request(eng, PROMPTS[1], "c", Sampling(max_tokens=30))
    eng.submit(late)
    before = len(first.generated)
    eng.step()
    assert late.generated and len(first.generated) == before + 1  # the running row did not wait
    assert eng.running == 2


def test_prefill_is_rationed_so_decoding_continues(setup):
    eng = engine(setup, prefill_tokens=4)
    first, _ = request(eng, PROMPTS[2], None, Sampling(max_tokens=30))
    eng.submit(first)
    eng.step()
    waiting = [request(eng, PROMPTS[0], "a", Sampling(max_tokens=30))[0] for _ in range(3)]
    for r in waiting:
        eng.submit(r)
    for step in range(3):  # one 4-token prompt a step; the running row gets a token every step
        count = len(first.generated)
        eng.step()
        assert len(first.generated) == count + 1
        assert sum(1 for r in waiting if r.generated) == step + 1


def test_a_cancelled_row_leaves_at_the_next_step_and_hears_nothing_more(setup):
    eng = engine(setup)
    keep, kept = request(eng, PROMPTS[0], "a", Sampling(max_tokens=20))
    drop, dropped = request(eng, PROMPTS[1], "b", Sampling(max_tokens=20))
    eng.submit(keep), eng.submit(drop)
    eng.step(), eng.step()
    heard = len(dropped.events)
    drop.cancel()
    eng.step()
    assert eng.running == 1 and len(dropped.events) == heard
    run_until_done(eng, [kept])
    assert keep.generated == alone(setup, PROMPTS[0], "a", 20)[:len(keep.generated)]


def test_adapters_in_flight_are_never_evicted_and_others_wait_for_a_slot(setup):
    eng = engine(setup, capacity=1)
    reqs = [request(eng, PROMPTS[i], name, Sampling(max_tokens=5)) for i, name in enumerate(["a", "b", "a", "c"])]
    for r, _ in reqs:
        eng.submit(r)
    seen = []
    for _ in range(60):
        eng.step()
        live = {r.adapter for r in eng._rows.requests}
        assert len(live) <= 1 and live <= set(eng.cache.loaded())
        seen.append(live)
        if all(rec.finished for _, rec in reqs):
            break
    for (r, rec), prompt in zip(reqs, PROMPTS):
        assert rec.events[-1].kind == "finish"
        assert r.generated == alone(setup, prompt, r.adapter, 5)[:len(r.generated)]
    assert eng.cache.evictions >= 2


def test_stop_strings_cut_the_text_and_are_never_streamed(setup):
    eng = engine(setup)
    probe, probed = request(eng, PROMPTS[3], "c", Sampling(max_tokens=12))
    eng.submit(probe)
    run_until_done(eng, [probed])
    words = probed.text.split()
    stop = " ".join(words[4:6])
    cut, recorder = request(eng, PROMPTS[3], "c", Sampling(max_tokens=12, stop=(stop, "never there")))
    eng.submit(cut)
    run_until_done(eng, [recorder])
    assert recorder.text == probed.text[:probed.text.index(stop)]
    assert recorder.events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in recorder.events)


def test_seeded_sampling_repeats_whatever_else_is_in_the_batch(setup):
    eng = engine(setup)
    sampling = Sampling(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    solo, solo_rec = request(eng, PROMPTS[0], "a", sampling)
    eng.submit(solo)
    run_until_done(eng, [solo_rec])
    crowd = [request(eng, p, n, Sampling(max_tokens=8, temperature=1.0)) for p, n in zip(PROMPTS, "abcab")]
    again, again_rec = request(eng, PROMPTS[0], "a", sampling)
    for r, _ in crowd[:3] + [(again, again_rec)] + crowd[3:]:
        eng.submit(r)
    run_until_done(eng, [again_rec] + [rec for _, rec in crowd])
    assert again.generated == solo.generated


def test_top_p_keeps_the_smallest_set_that_covers_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    g = torch.Generator().manual_seed(0)
    seen = {sample_token(logits, Sampling(max_tokens=1, temperature=1.0, top_p=0.5), g) for _ in range(300)}
    assert seen == {0, 1}
    seen = {sample_token(logits, Sampling(max_tokens=1, temperature=1.0, top_p=0.4), g) for _ in range(100)}
    assert seen == {0}
    seen = {sample_token(logits, Sampling(max_tokens=1, temperature=1.0), g) for _ in range(500)}
    assert seen == {0, 1, 2, 3}


def test_an_adapter_that_fails_to_load_fails_its_request_only(setup, tmp_path):
    eng = engine(setup)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((setup[1]["a"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    eng.cache.register("broken", broken)
    good, good_rec = request(eng, PROMPTS[0], "a", Sampling(max_tokens=4))
    bad, bad_rec = request(eng, PROMPTS[0], "broken", Sampling(max_tokens=4))
    eng.submit(bad), eng.submit(good)
    run_until_done(eng, [good_rec, bad_rec])
    assert bad_rec.events[-1].kind == "error" and bad_rec.events[-1].status == 400
    assert "broken" in bad_rec.events[-1].text
    assert good_rec.events[-1].kind == "finish"
    assert "broken" not in eng.cache.loaded()


def test_limits_refuse_at_submission(setup):
    eng = engine(setup, max_queue=2)
    with pytest.raises(LoraError, match="over the context of 128 tokens"):
        eng.submit(request(eng, PROMPTS[0], None, Sampling(max_tokens=126))[0])
    eng.submit(request(eng, PROMPTS[0], None, Sampling(max_tokens=4))[0])
    eng.submit(request(eng, PROMPTS[0], None, Sampling(max_tokens=4))[0])
    with pytest.raises(QueueFull, match="max_queue=2"):
        eng.submit(request(eng, PROMPTS[0], None, Sampling(max_tokens=4))[0])
    with pytest.raises(LoraError, match="max_batch=0"):
        Engine(eng.model, eng.tokenizer, max_batch=0)
