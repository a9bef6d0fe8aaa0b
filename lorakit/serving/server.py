"""`lorakit serve`: one frozen base, many adapters, behind the OpenAI API (FastAPI on uvicorn).

    lorakit serve --model smollm2-135m --adapter kjv=out/demo/kjv/adapter --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    client.completions.create(model="kjv", prompt="In the beginning", max_tokens=20, temperature=0)

`model` names an adapter or the base. Requests run through the engine (engine.py): continuous
batching, each row through its own adapter. Endpoints: /v1/models, /v1/completions,
/v1/chat/completions (both with "stream": true as server-sent events), /v1/load_lora_adapter and
/v1/unload_lora_adapter (with --runtime-lora, as vLLM spells them), /health and /metrics
(Prometheus text). Errors are OpenAI-style JSON; the server keeps serving.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import uvicorn
from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..core.config import option
from ..core.identity import check_adapter_name
from ..core.precision import BasePrecision
from ..errors import LoraError
from ..io.adapter_files import check_adapter_directory
from . import protocol as api
from .cache import AdapterCache
from .engine import Engine, Event, QueueFull, Request, Sampling
from .inference import load_for_inference, prompt_texts
from .metrics import CONTENT_TYPE, ServeMetrics
from .protocol import ApiError

RETRY_AFTER = "1"  # seconds a refused client should wait


@dataclass(frozen=True)
class ServeConfig:
    """A server's settings; every field is a `lorakit serve` option (adapters: --adapter NAME=DIR)."""

    model: str = option("smollm2-135m", "base model: bundled name (smollm2-135m) or a transformers model directory")
    adapters: tuple[tuple[str, str], ...] = ()  # (name, folder) pairs; the CLI's --adapter NAME=DIR
    adapter_root: str | None = option(None, "folder of adapter folders: each subfolder is registered under its "
                                            "name, and /v1/load_lora_adapter reads only below it")
    base: BasePrecision = field(default_factory=BasePrecision, metadata={"help": "how the frozen base is stored"})
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "port to listen on")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 routes")
    max_loaded: int = option(8, "adapters kept loaded on the model (least recently used evicted)")
    max_batch: int = option(32, "requests decoded together")
    max_queue: int = option(256, "requests waiting beyond the batch; more are refused with 429")
    max_tokens: int = option(512, "the most tokens a request may generate (larger max_tokens are capped)")
    prefill_tokens: int = option(512, "prompt tokens prefilled per step, at most (one longer prompt still goes alone): "
                                      "what new requests may cost the running ones' next token")
    max_model_len: int = option(2048, "prompt plus generated tokens, at most (and at most the model's context)")
    runtime_lora: bool = option(False, "enable /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-root)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple((str(n), str(d)) for n, d in self.adapters))
        problems = [f"{name}={getattr(self, name)!r}: must be a positive integer"
                    for name in ("max_loaded", "max_batch", "max_queue", "max_tokens", "prefill_tokens", "max_model_len")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if not 0 <= self.port < 65536:
            problems.append(f"port={self.port!r}: must be 0-65535")
        if self.runtime_lora and self.adapter_root is None:
            problems.append(f"adapter_root={self.adapter_root!r}: runtime_lora=True needs the folder runtime loads "
                            "may read from")
        if problems:
            raise LoraError("; ".join(problems))


class Served:
    """What a running server holds: the model and tokenizer, its adapter cache, engine and metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        loaded = load_for_inference(config.model, base=config.base)
        if loaded.task != "causal-lm":
            raise LoraError(f"model={config.model!r}: lorakit serve needs a causal LM")
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.base_name = str(config.model)
        self.root = Path(config.adapter_root).resolve() if config.adapter_root else None
        self.cache = AdapterCache(self.model, capacity=config.max_loaded)
        self.cache.register_many(dict(config.adapters) | self._root_adapters())
        if self.base_name in self.cache.registered():
            raise LoraError(f"adapter {self.base_name!r}: the base model has that name; rename the adapter")
        self.metrics = ServeMetrics(self.cache)
        self.engine = Engine(self.model, self.tokenizer, self.cache, max_batch=config.max_batch,
                             max_queue=config.max_queue, max_model_len=config.max_model_len,
                             prefill_tokens=config.prefill_tokens, observer=self.metrics)
        self.created = int(time.time())
        # The model and tokenizer are hundreds of thousands of objects that live as long as the server: out of the
        # collector's reach, a full collection no longer scans them (0.7-0.8 s pauses of the engine thread, every
        # 50-70 adapter loads, measured by bench/serve.py).
        gc.collect()
        gc.freeze()

    def _root_adapters(self) -> dict[str, Path]:
        if self.root is None:
            return {}
        if not self.root.is_dir():
            raise LoraError(f"adapter_root={self.config.adapter_root!r}: no such folder")
        return {d.name: d for d in sorted(self.root.iterdir()) if (d / "adapter_config.json").is_file()}

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 for any other name."""
        if model == self.base_name:
            return None
        if model in self.cache.registered():
            return model
        raise ApiError(404, f"The model `{model}` does not exist. GET /v1/models lists the base and adapters.",
                       param="model")


# --- the app ---------------------------------------------------------------------------------------------
def create_app(served: Served) -> FastAPI:
    """The ASGI app over `served`; its lifespan starts the engine and, on shutdown, drains it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(served.engine.stop)

    app = FastAPI(title="lorakit", lifespan=lifespan)
    auth = [Depends(_bearer(served.config.api_key))]

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, err: ApiError):
        return _error_response(served, request, err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request body")
        return _error_response(served, request, ApiError(400, message, param=where))

    _info_routes(app, served, auth)
    _generation_routes(app, served, auth)
    if served.config.runtime_lora:
        _adapter_routes(app, served, auth)
    return app


def _info_routes(app: FastAPI, served: Served, auth: list) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": served.engine.running, "waiting": served.engine.waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        loaded = set(served.cache.loaded())
        cards = [api.model_card(served.base_name, served.base_name, served.created, None)]
        cards += [api.model_card(n, served.base_name, served.created, n in loaded) for n in served.cache.registered()]
        return {"object": "list", "data": cards}


def _generation_routes(app: FastAPI, served: Served, auth: list) -> None:
    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: api.CompletionRequest, request: HttpRequest):
        body.refuse_unsupported(api.UNSUPPORTED)
        prompts = [served.tokenizer(p)["input_ids"] for p in body.prompts()]
        return await _answer(served, request, "completions", body, prompts, body.max_tokens)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: api.ChatRequest, request: HttpRequest):
        body.refuse_unsupported(api.UNSUPPORTED)
        if not getattr(served.tokenizer, "chat_template", None):
            raise ApiError(400, f"model {served.base_name!r} has no chat template; use /v1/completions")
        text = served.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                                    tokenize=False, add_generation_prompt=True)
        ids = served.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await _answer(served, request, "chat", body, [ids], body.token_limit())


def _adapter_routes(app: FastAPI, served: Served, auth: list) -> None:
    @app.post("/v1/load_lora_adapter", dependencies=auth)
    async def load(body: api.LoadAdapterRequest):
        try:
            check_adapter_name(body.lora_name)
        except LoraError as err:
            raise ApiError(400, str(err), param="lora_name")
        directory = _under_root(served.root, body.lora_path)
        future = served.engine.call(lambda: _load_now(served, body.lora_name, directory))
        await asyncio.wrap_future(future)
        return Response(f"Success: adapter {body.lora_name!r} loaded from {directory}", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    async def unload(body: api.UnloadAdapterRequest):
        served.adapter_of(body.lora_name)
        if body.lora_name == served.base_name:
            raise ApiError(400, "the base model cannot be unloaded", param="lora_name")
        await asyncio.wrap_future(served.engine.call(lambda: _unload_now(served, body.lora_name)))
        return Response(f"Success: adapter {body.lora_name!r} unloaded", media_type="text/plain")


def _load_now(served: Served, name: str, directory: Path) -> None:
    """On the engine thread: register `name` and load it with the strict loader; on failure, nothing stays."""
    cache = served.cache
    if name == served.base_name or name in cache.registered():  # checked here: loads run one at a time
        raise ApiError(400, f"adapter {name!r} is already registered; unload it first", param="lora_name")
    try:
        cache.register(name, directory)
        cache.ensure([name], keep=served.engine.in_flight())
    except LoraError as err:
        if name in cache.registered():
            cache.unregister(name)
        status = 503 if "capacity=" in str(err) else 400
        raise ApiError(status, f"adapter {name!r} from {directory}: {err}", param="lora_path",
                       headers={"Retry-After": RETRY_AFTER} if status == 503 else None)


def _unload_now(served: Served, name: str) -> None:
    if name in served.engine.in_flight():
        raise ApiError(409, f"adapter {name!r} is used by requests in flight; retry when they finish",
                       param="lora_name", headers={"Retry-After": RETRY_AFTER})
    served.cache.unregister(name)


def _under_root(root: Path, path: str) -> Path:
    """`path` (relative to root, or absolute) resolved with its symlinks; 400 unless it and its files lie under root."""
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise ApiError(400, f"lora_path={path!r} resolves outside the adapter root; give a folder under --adapter-root",
                       param="lora_path")
    try:
        check_adapter_directory(resolved)
    except LoraError as err:
        raise ApiError(400, f"lora_path={path!r}: {err}", param="lora_path")
    for file in resolved.iterdir():
        if not file.resolve().is_relative_to(root):
            raise ApiError(400, f"lora_path={path!r}: {file.name} links outside the adapter root", param="lora_path")
    return resolved


def _bearer(key: str | None):
    async def check(request: HttpRequest) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           headers={"WWW-Authenticate": "Bearer"})
    return check


def _error_response(served: Served, request: HttpRequest, err: ApiError) -> JSONResponse:
    served.metrics.answered(request.url.path, err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --- generating --------------------------------------------------------------------------------------------
class _Events:
    """The events of a request's engine rows, delivered on the event loop as (row, Event)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def emitter(self, row: int):
        def emit(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (row, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return emit


async def _answer(served: Served, request: HttpRequest, endpoint: str, body, prompts: list[list[int]],
                  max_tokens: int | None) -> Response:
    adapter = served.adapter_of(body.model)
    limit = min(max_tokens or served.config.max_tokens, served.config.max_tokens)
    sampling = Sampling(limit, body.temperature, body.top_p, body.stops(), body.seed)
    events = _Events()
    rows = []
    try:
        for i, ids in enumerate(prompts):
            rows.append(Request(ids, adapter, sampling, events.emitter(i)))
            served.engine.submit(rows[-1])
    except QueueFull as err:
        _cancel(rows)
        raise ApiError(429 if "waiting" in str(err) else 503, f"{err}; retry later",
                       headers={"Retry-After": RETRY_AFTER})
    except LoraError as err:
        _cancel(rows)
        raise ApiError(400, str(err), param="max_tokens")
    rid = api.new_id("cmpl" if endpoint == "completions" else "chatcmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _stream_chunks(endpoint, rid, body.model, events, rows, include_usage)
        served.metrics.answered(request.url.path, 200)
        return StreamingResponse(_sse(chunks, rows), media_type="text/event-stream")
    result = await _collect(request, events, rows)
    served.metrics.answered(request.url.path, 200)
    if endpoint == "completions":
        return JSONResponse(api.completion(rid, body.model, result["choices"], *result["usage"]))
    choice = result["choices"][0]
    return JSONResponse(api.chat_completion(rid, body.model, choice["text"], choice["finish_reason"], *result["usage"]))


def _cancel(rows: list[Request]) -> None:
    for row in rows:
        row.cancel()


async def _collect(request: HttpRequest, events: _Events, rows: list[Request]) -> dict:
    """Wait for every row to finish; a client that goes away cancels them."""
    texts, reasons, completion_tokens = [""] * len(rows), [None] * len(rows), 0
    try:
        while any(r is None for r in reasons):
            try:
                row, event = await asyncio.wait_for(events.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError
                continue
            if event.kind == "error":
                raise ApiError(event.status, event.text)
            texts[row] += event.text
            if event.kind == "finish":
                reasons[row], completion_tokens = event.finish_reason, completion_tokens + event.completion_tokens
    finally:
        _cancel(rows)
    prompt_tokens = sum(len(r.prompt_ids) for r in rows)
    return {"choices": [{"text": t, "finish_reason": f} for t, f in zip(texts, reasons)],
            "usage": (prompt_tokens, completion_tokens)}


async def _stream_chunks(endpoint: str, rid: str, model: str, events: _Events, rows: list[Request],
                         include_usage: bool) -> AsyncIterator[dict]:
    if endpoint == "chat":
        yield api.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None)
    open_rows, completion_tokens = len(rows), 0
    while open_rows:
        row, event = await events.queue.get()
        if event.kind == "error":
            yield api.error_body(event.status, event.text)
            return
        if event.kind == "finish":
            open_rows -= 1
            completion_tokens += event.completion_tokens
        if event.text or event.kind == "finish":
            reason = event.finish_reason if event.kind == "finish" else None
            yield (api.completion_chunk(rid, model, row, event.text, reason) if endpoint == "completions" else
                   api.chat_chunk(rid, model, {"content": event.text} if event.text else {}, reason))
    if include_usage:
        obj = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
        yield api.usage_chunk(rid, model, obj, sum(len(r.prompt_ids) for r in rows), completion_tokens)


async def _sse(chunks: AsyncIterator[dict], rows: list[Request]) -> AsyncIterator[str]:
    """Server-sent events; a client that disconnects cancels the rows (its slots free at the next step)."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        _cancel(rows)


# --- running --------------------------------------------------------------------------------------------
def serve(config: ServeConfig) -> None:
    """Load the model, then serve until SIGINT/SIGTERM: stop accepting, finish what is in flight, exit."""
    served = Served(config)
    uvicorn.run(create_app(served), host=config.host, port=config.port, log_level="info",
                timeout_graceful_shutdown=60)
