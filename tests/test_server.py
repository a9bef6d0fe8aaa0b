"""`lorakit serve` as a client sees it: real server processes on 127.0.0.1, driven with the official
`openai` client (and raw HTTP for malformed bodies), on a tiny Llama with a chat template and adapters."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import server as harness
import tiny
from lorakit.serving.server import ServeConfig
from server import chat_model_dir, random_adapter, running
from test_cli import run

httpx = harness.httpx
PROMPTS = ["the lord said unto", "in the day that the king of the land came", "they made the house and"]
CAP = 24  # --max-tokens of the main server


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = chat_model_dir(root / "lm")
    adapters = {"a": random_adapter(model, root / "a", seed=1),
                "b": random_adapter(model, root / "b", seed=2, rank=2, targets=("up_proj", "down_proj")),
                "c": random_adapter(model, root / "c", seed=3, rank=8)}
    lib = root / "library"
    lib.mkdir()
    random_adapter(model, lib / "shelved", seed=4)
    random_adapter(model, lib / "runtime", seed=5)
    broken = lib / "broken"
    shutil.copytree(lib / "runtime", broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[:-40])  # truncated
    tiny.causal_lm_dir(root / "other", seed=9)  # same shapes, other weights: the fingerprint differs
    random_adapter(root / "other", lib / "foreign", seed=6)
    os.symlink(adapters["a"], lib / "escape")  # a link out of the root
    (root / "outside").mkdir()
    return {"root": root, "model": model, "adapters": adapters, "lib": lib}


@pytest.fixture(scope="module")
def main(files, tmp_path_factory):
    args = ["--model", str(files["model"]), "--adapter-root", str(files["lib"]), "--runtime-lora",
            "--max-loaded", "2", "--max-batch", "8", "--max-tokens", str(CAP)]
    for name, folder in files["adapters"].items():
        args += ["--adapter", f"{name}={folder}"]
    with running(args, tmp_path_factory.mktemp("main-log")) as srv:
        yield srv


def generate_cli(files, prompt: str, adapter: str | None, tokens: int, chat: bool) -> str:
    argv = ["generate", "--model", str(files["model"]), "--prompt", prompt, "--max-new-tokens", str(tokens), "--json"]
    argv += [] if adapter is None else ["--adapter", str(files["adapters"][adapter])]
    argv += [] if chat else ["--no-chat"]
    code, out, err = run(argv)
    assert code == 0, err
    return json.loads(out)["completion"]


def complete(srv, model: str, prompt: str, **kw):
    return srv.client().completions.create(model=model, prompt=prompt, **{"max_tokens": 12, "temperature": 0, **kw})


# --- what it writes ---------------------------------------------------------------------------------------
def test_models_lists_the_base_and_every_registered_adapter(main, files):
    ids = [m.id for m in main.client().models.list().data]
    assert ids[0] == str(files["model"])
    assert set(ids[1:]) == {"a", "b", "c", "shelved", "runtime", "broken", "foreign", "escape"}


def test_concurrent_mixed_adapter_greedy_equals_alone_and_lorakit_generate(main, files):
    base = str(files["model"])
    jobs = [(p, m) for p in PROMPTS for m in (base, "a", "b", "c")]
    alone = {job: complete(main, job[1], job[0]) for job in jobs}
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: complete(main, job[1], job[0]), jobs)))
    for (prompt, model), got in together.items():
        assert got.choices[0].text == alone[(prompt, model)].choices[0].text
        assert got.usage == alone[(prompt, model)].usage
        reference = generate_cli(files, prompt, None if model == base else model, 12, chat=False)
        assert got.choices[0].text.strip() == reference
    assert len({r.choices[0].text for r in together.values()}) > len(PROMPTS)  # the adapters do change the text
    counters = main.metrics()
    assert counters["lorakit_adapter_cache_evictions_total"] >= 1  # three adapters through --max-loaded 2


def test_chat_uses_the_template_and_equals_lorakit_generate(main, files):
    got = main.client().chat.completions.create(model="a", messages=[{"role": "user", "content": PROMPTS[1]}],
                                                max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content.strip() == generate_cli(files, PROMPTS[1], "a", 10, chat=True)
    assert got.usage.prompt_tokens == len(f"<s> {PROMPTS[1]} </s> the lord said".split())


def test_streaming_sends_the_same_text_and_usage_as_one_answer(main):
    whole = complete(main, "c", PROMPTS[0], max_tokens=10)
    chunks = list(main.client().completions.create(model="c", prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage
    chat = main.client().chat.completions.create(model="b", messages=[{"role": "user", "content": PROMPTS[2]}],
                                                 max_tokens=8, temperature=0, stream=True)
    pieces = list(chat)
    one = main.client().chat.completions.create(model="b", messages=[{"role": "user", "content": PROMPTS[2]}],
                                                max_tokens=8, temperature=0)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == one.choices[0].message.content


def test_seeded_sampling_repeats_and_stop_strings_cut(main):
    first, second = (complete(main, "a", PROMPTS[1], temperature=1.0, top_p=0.9, seed=11) for _ in range(2))
    assert first.choices[0].text == second.choices[0].text
    greedy = complete(main, "a", PROMPTS[1]).choices[0].text
    stop = " ".join(greedy.split()[3:5])
    cut = complete(main, "a", PROMPTS[1], stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_several_prompts_in_one_request_are_choices_in_order(main):
    both = main.client().completions.create(model="a", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [complete(main, "a", p, max_tokens=6).choices[0].text for p in PROMPTS[:2]]


def test_max_tokens_is_capped_by_the_server(main):
    got = complete(main, "a", PROMPTS[0], max_tokens=90)
    assert got.usage.completion_tokens <= CAP
    assert got.choices[0].finish_reason == "stop" or got.usage.completion_tokens == CAP


# --- what it refuses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, says", [
    ('{"model": "a", "prompt": ', 400, "JSON"),
    ({"model": "a"}, 400, "prompt"),
    ({"model": "a", "prompt": "the", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "a", "prompt": "the", "temperature": -1}, 400, "temperature"),
    ({"model": "a", "prompt": "the", "n": 2}, 400, "n must be 1"),
    ({"model": "a", "prompt": "the", "logprobs": 3}, 400, "logprobs=3"),
    ({"model": "a", "prompt": ""}, 400, "non-empty prompt"),
    ({"model": "nobody", "prompt": "the"}, 404, "nobody"),
    ({"model": "a", "prompt": " ".join(["the"] * 120), "max_tokens": 20}, 400, "over the context of 128"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(main, body, status, says):
    content = body if isinstance(body, str) else json.dumps(body)
    answer = httpx.post(f"{main.url}/v1/completions", content=content, headers={"content-type": "application/json"},
                        timeout=30)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert says in error["message"] and error["type"] and error["code"] == status
    assert complete(main, "a", PROMPTS[0], max_tokens=2).choices[0].text


def test_chat_bad_messages_are_400(main):
    with pytest.raises(openai.BadRequestError, match="messages"):
        main.client().chat.completions.create(model="a", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="role"):
        main.client().chat.completions.create(model="a", messages=[{"role": "wizard", "content": "x"}])


# --- adapters at run time --------------------------------------------------------------------------------
def load(srv, name: str, path) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=60)


def test_runtime_loads_read_only_under_the_root_and_are_strict(main, files):
    before = [m.id for m in main.client().models.list().data]
    refused = {"../a": "outside the adapter root", str(files["root"] / "outside"): "outside the adapter root",
               "escape": "outside the adapter root", "broken": "broken", "foreign": "base",
               "nowhere": "nowhere"}
    for path, says in refused.items():
        answer = load(main, "new1", path)
        assert answer.status_code == 400 and says in answer.json()["error"]["message"], (path, answer.text)
    assert [m.id for m in main.client().models.list().data] == before
    with pytest.raises(openai.NotFoundError):
        complete(main, "new1", PROMPTS[0])
    assert load(main, "a", "runtime").status_code == 400  # taken
    assert load(main, "new1", "runtime").status_code == 200
    served = complete(main, "new1", PROMPTS[2]).choices[0].text
    shelved_dir = files["adapters"]["a"].parent / "runtime-copy"
    shutil.copytree(files["lib"] / "runtime", shelved_dir, dirs_exist_ok=True)
    files["adapters"]["runtime-copy"] = shelved_dir
    assert served.strip() == generate_cli(files, PROMPTS[2], "runtime-copy", 12, chat=False)
    unloaded = httpx.post(f"{main.url}/v1/unload_lora_adapter", json={"lora_name": "new1"}, timeout=60)
    assert unloaded.status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(main, "new1", PROMPTS[0])


# --- a guarded server: API key, one row, one waiting -------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(files, tmp_path_factory):
    args = ["--model", str(files["model"]), "--adapter", f"a={files['adapters']['a']}", "--api-key", "sesame",
            "--max-batch", "1", "--max-queue", "1", "--max-tokens", "100"]
    with running(args, tmp_path_factory.mktemp("guarded-log")) as srv:
        yield srv


def test_api_key_is_required_on_v1_only(guarded):
    with pytest.raises(openai.AuthenticationError):
        guarded.client().models.list()
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").models.list()
    assert [m.id for m in guarded.client(api_key="sesame").models.list().data][1:] == ["a"]
    assert guarded.health()["status"] == "ok"


def test_a_full_queue_is_refused_with_429_and_retry_after(guarded):
    def post(_):
        return httpx.post(f"{guarded.url}/v1/completions", headers={"authorization": "Bearer sesame"},
                          json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0}, timeout=120)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post, range(6)))
    statuses = sorted(a.status_code for a in answers)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(guarded):
    tokens_before = guarded.metrics()["lorakit_generation_tokens_total"]
    with httpx.stream("POST", f"{guarded.url}/v1/completions", headers={"authorization": "Bearer sesame"},
                      json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0,
                            "stream": True}, timeout=60) as answer:
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 20
    while guarded.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guarded.health()["running"] == 0
    time.sleep(0.3)
    assert guarded.metrics()["lorakit_generation_tokens_total"] - tokens_before < 100
    assert guarded.client(api_key="sesame").completions.create(model="a", prompt="the", max_tokens=2).choices


# --- lifecycle -----------------------------------------------------------------------------------------------
def test_sigterm_finishes_requests_in_flight_then_exits(files, tmp_path):
    with running(["--model", str(files["model"]), "--max-tokens", "100"], tmp_path) as srv:
        result = {}

        def ask():
            result["answer"] = srv.client().completions.create(model=str(files["model"]), prompt=PROMPTS[0],
                                                                max_tokens=60, temperature=0, stop=["never"])
        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 20
        while not srv.health()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.process.send_signal(signal.SIGTERM)
        asker.join(60)
        # uvicorn drains, runs the lifespan's shutdown, then re-raises SIGTERM: a clean exit by that signal
        assert srv.process.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in srv.log.read_text()
        answer = result["answer"]
        assert answer.usage.completion_tokens == 60 or answer.choices[0].finish_reason == "stop"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health", timeout=5)


def test_serve_binds_localhost_unless_told_and_checks_its_options(files):
    code, _, err = run(["serve", "--adapter", "no-equals-sign"])
    assert code == 2 and "NAME=DIR" in err
    code, _, err = run(["serve", "--model", str(files["model"]), "--runtime-lora"])
    assert code == 2 and "--adapter-root" in err
    code, _, err = run(["serve", "--model", str(files["model"]), "--max-batch", "0"])
    assert code == 2 and "--max-batch" in err
    assert ServeConfig().host == "127.0.0.1"


# --- a bounded load test -------------------------------------------------------------------------------------
def test_bounded_load_every_request_answered_or_refused_and_memory_flat(main, files):
    """6 clients for 6 s, stopping by themselves: every request gets a status, none is lost; RSS flat."""
    names = [str(files["model"]), "a", "b", "c", "shelved"]
    stop_at = time.monotonic() + 2
    outcomes: list[object] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        i = seed
        while time.monotonic() < stop_at:
            body = {"model": names[i % len(names)], "prompt": PROMPTS[i % 3], "max_tokens": 6, "temperature": 0,
                    "stream": i % 2 == 0}
            try:
                answer = httpx.post(f"{main.url}/v1/completions", json=body, timeout=60)
                outcome = answer.status_code
            except httpx.HTTPError as err:
                outcome = err
            with lock:
                outcomes.append(outcome)
            i += 1

    def wave(seconds: float) -> None:
        nonlocal stop_at
        stop_at = time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)

    wave(2)  # warm up: allocator pools, every adapter loaded once
    rss_start = main.rss_mb()
    outcomes.clear()
    wave(6)
    rss_end = main.rss_mb()
    assert outcomes and all(o in (200, 429, 503) for o in outcomes), [o for o in outcomes if o not in (200, 429, 503)]
    assert main.health()["running"] == 0 and main.health()["waiting"] == 0
    assert rss_end - rss_start < 40, (rss_start, rss_end)


# --- the real model -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_smollm2_concurrent_chat_and_completions_equal_lorakit_generate(tmp_path, base_dtype):
    """SmolLM2-135M with its own chat template and a rank-8 q,v adapter, base and adapter rows in one batch.

    A bfloat16 base is served one request at a time here: on CPU its matmuls round differently with the
    number of rows (the same prompt's logits differ by up to 0.375 between a batch of 1 and of 8, with no
    adapter at all), so batched bfloat16 greedy output can part from the single-row one at a near tie.
    """
    from lorakit.zoo import model_directory

    adapter = random_adapter(model_directory("smollm2-135m"), tmp_path / "kjv", seed=0, rank=8)
    files = {"model": "smollm2-135m", "adapters": {"kjv": adapter}}
    prompts = ["Who made the heaven?", "Write one sentence about the sea."]
    jobs = [(p, m, chat) for p in prompts for m in ("smollm2-135m", "kjv") for chat in (False, True)]
    with running(["--model", "smollm2-135m", "--adapter", f"kjv={adapter}", "--base-dtype", base_dtype], tmp_path) as srv:
        def ask(job):
            prompt, model, chat = job
            if chat:
                answer = srv.client().chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0)
                return answer.choices[0].message.content
            return srv.client().completions.create(model=model, prompt=prompt, max_tokens=16,
                                                   temperature=0).choices[0].text
        with ThreadPoolExecutor(len(jobs) if base_dtype == "float32" else 1) as pool:
            served = dict(zip(jobs, pool.map(ask, jobs)))
    for (prompt, model, chat), text in served.items():
        argv = ["generate", "--model", "smollm2-135m", "--prompt", prompt, "--max-new-tokens", "16", "--json",
                "--base-dtype", base_dtype] + ([] if model == "smollm2-135m" else ["--adapter", str(adapter)])
        code, out, err = run(argv + ([] if chat else ["--no-chat"]))
        assert code == 0, err
        assert text.strip() == json.loads(out)["completion"], (prompt, model, chat)
