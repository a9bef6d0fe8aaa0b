"""The serving engine: continuous (iteration-level) batching of many adapters over one causal LM.

    engine = Engine(model, tokenizer, cache)         # cache: an lk.AdapterCache on `model`
    engine.start()                                   # a thread that steps while there is work
    engine.submit(Request(prompt_ids, "kjv", Sampling(max_tokens=32), emit=print))

Each step admits waiting requests into the running batch (prefilled together, at most
`prefill_tokens` prompt tokens a step so that prefill cannot starve decoding), then decodes one
token for every running row. A row goes through its own adapter (lk.mixed_batch) and keeps its own
KV cache: the batch's caches are left-padded to a common length and masked, so a request joins or
leaves between two steps without touching the others. A request that arrives while others decode
starts at the next step. Adapters load on first use through the cache, which never evicts one that
a running or admitted request uses.

All model work (forward passes, adapter loads and unloads) happens on the engine's thread; other
threads hand it work with `submit` and `call`.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..core.adapters import disabled
from ..core.mixed import Stacks, mixed_batch
from ..errors import LoraError
from ..training.batches import padding_id
from . import kv_cache
from .cache import AdapterCache

_ids = itertools.count(1)


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded: temperature 0 is greedy; `seed` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Event:
    """What the engine tells a request's owner: new text, the end (with usage), or an error."""

    kind: str  # "text" | "finish" | "error"
    text: str = ""
    finish_reason: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0


class QueueFull(LoraError):
    """The engine's waiting queue is full; the caller should retry later."""


class Request:
    """One generation: its prompt tokens, adapter (None: the base), sampling, and where events go.

    `emit` is called on the engine thread; it must not block.
    """

    def __init__(self, prompt_ids: Sequence[int], adapter: str | None, sampling: Sampling,
                 emit: Callable[[Event], None]) -> None:
        if not prompt_ids:
            raise LoraError("prompt: empty after tokenization; give some text")
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter
        self.sampling = sampling
        self.emit = emit
        self.generated: list[int] = []
        self.text = ""  # the completion so far, cut at a stop string
        self.sent = 0  # characters of `text` already emitted
        self.finish_reason: str | None = None
        self.cancelled = False  # set from any thread: the engine drops the row at its next step
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.generator: torch.Generator | None = None
        if sampling.temperature > 0:
            self.generator = torch.Generator().manual_seed(
                sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item()))

    def cancel(self) -> None:
        self.cancelled = True


class Observer:
    """Hooks the engine calls as requests move (metrics subclass it); every hook does nothing here."""

    def first_token(self, request: Request, seconds: float) -> None: ...
    def next_token(self, request: Request, seconds: float) -> None: ...
    def finished(self, request: Request, seconds: float) -> None: ...
    def batch(self, waiting: int, running: int) -> None: ...
    def adapter_loaded(self, seconds: float) -> None: ...


@dataclass
class _Rows:
    """The running batch: one row per request, its KV cache left-padded to a common length."""

    requests: list[Request] = field(default_factory=list)
    cache: DynamicCache | None = None  # per layer (B, heads, T, head_dim)
    mask: torch.Tensor | None = None  # (B, T): 1 where the cache holds a real token
    lengths: torch.Tensor | None = None  # (B,): real tokens per row, the next token's position
    last: torch.Tensor | None = None  # (B,): each row's newest token, the next step's input


class Engine:
    """Continuous batching over `model` (a causal LM, eval mode) with adapters from `cache`."""

    def __init__(self, model: nn.Module, tokenizer, cache: AdapterCache | None = None, max_batch: int = 32,
                 max_queue: int = 256, max_model_len: int | None = None, prefill_tokens: int = 2048,
                 observer: Observer | None = None) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_tokens", prefill_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LoraError(f"{name}={value!r}: must be a positive integer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or context, context)
        self.observer = observer or Observer()
        self.pad_id = padding_id(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._waiting: deque[Request] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._rows = _Rows()
        self._stacks = Stacks()  # each layer's stacked adapter weights, rebuilt only when the loaded set changes
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # --- other threads -------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue `request`; QueueFull when `max_queue` requests already wait."""
        if len(request.prompt_ids) + request.sampling.max_tokens > self.max_model_len:
            raise LoraError(f"prompt ({len(request.prompt_ids)} tokens) plus max_tokens "
                            f"({request.sampling.max_tokens}) is over the context of {self.max_model_len} tokens; "
                            "shorten the prompt or lower max_tokens")
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(request)
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps (model changes such as adapter loads go here)."""
        future: Future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        if self._thread is None:  # not started: run in place
            self._run_calls()
        return future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows.requests)

    def in_flight(self) -> set[str]:
        """Adapter names used by waiting or running requests (a snapshot)."""
        with self._wake:
            return {r.adapter for r in list(self._waiting) + self._rows.requests if r.adapter is not None}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Take no more requests, finish those queued and running (up to `timeout` s), then stop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for request in list(self._waiting) + self._rows.requests:  # still there after the timeout
            self._fail(request, 503, "the server stopped before this request finished")

    # --- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._calls or self._waiting or self._rows.requests or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self._calls or self._waiting or self._rows.requests):
                    return
            try:
                self.step()
            except Exception as err:  # a failed forward: fail the batch, keep serving the next requests
                for request in self._rows.requests:
                    self._fail(request, 500, f"the engine failed: {type(err).__name__}: {err}")
                self._rows = _Rows()

    def step(self) -> None:
        """One iteration: pending calls, drop cancelled rows, admit and prefill, decode one token."""
        self._run_calls()
        self._drop_cancelled()
        with torch.no_grad():
            self._admit()
            if self._rows.requests:
                self._decode()
        self.steps += 1
        self.observer.batch(len(self._waiting), len(self._rows.requests))

    def _run_calls(self) -> None:
        while True:
            with self._wake:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as err:  # handed to the caller
                    future.set_exception(err)

    def _drop_cancelled(self) -> None:
        with self._wake:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
        gone = [i for i, r in enumerate(self._rows.requests) if r.cancelled]
        if gone:
            self._remove(gone)

    def _admit(self) -> None:
        """Move waiting requests into the batch while rows, adapter slots and the prefill budget allow."""
        admitted, budget = [], self.prefill_tokens
        with self._wake:
            while self._waiting and len(self._rows.requests) + len(admitted) < self.max_batch:
                request = self._waiting[0]
                if admitted and len(request.prompt_ids) > budget:
                    break
                if not self._fits(request, admitted):
                    break
                admitted.append(self._waiting.popleft())
                budget -= len(request.prompt_ids)
        if not admitted:
            return
        admitted = self._load_adapters(admitted)
        try:
            if admitted:
                self._prefill(admitted)
        except Exception as err:  # neither waiting nor running: they would never hear back
            for request in admitted:
                if request.finish_reason is None:
                    self._fail(request, 500, f"the engine failed: {type(err).__name__}: {err}")
            raise

    def _fits(self, request: Request, admitted: list[Request]) -> bool:
        if self.cache is None or request.adapter is None:
            return True
        names = {r.adapter for r in self._rows.requests + admitted + [request] if r.adapter is not None}
        return len(names) <= self.cache.capacity

    def _load_adapters(self, admitted: list[Request]) -> list[Request]:
        """Load the admitted requests' adapters (keeping the running ones); a request whose adapter fails
        to load gets an error and is dropped."""
        if self.cache is None:
            return admitted
        running = [r.adapter for r in self._rows.requests]
        ok = []
        for request in admitted:
            if request.adapter is not None:
                misses, start = self.cache.misses, time.perf_counter()
                try:
                    self.cache.ensure([request.adapter], keep=running + [r.adapter for r in ok])
                except LoraError as err:
                    self._fail(request, 400, f"adapter {request.adapter!r} could not be loaded: {err}")
                    continue
                if self.cache.misses > misses:
                    self.observer.adapter_loaded(time.perf_counter() - start)
            ok.append(request)
        return ok

    def _forward(self, names: list[str | None], **inputs):
        """The model on a batch whose row i goes through adapter names[i] (loaded by _load_adapters)."""
        if all(n is None for n in names):
            with disabled(self.model):
                return self.model(**inputs, use_cache=True, logits_to_keep=1)
        pool = self.cache.loaded() if self.cache is not None else None
        with mixed_batch(self.model, names, pool=pool, stacks=self._stacks):
            return self.model(**inputs, use_cache=True, logits_to_keep=1)

    def _prefill(self, requests: list[Request]) -> None:
        """Run the new prompts as one left-padded batch and join them to the running batch."""
        longest = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids):] = 1
        device = _device(self.model)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward([r.adapter for r in requests], input_ids=ids, attention_mask=mask,
                            position_ids=positions, cache=kv_cache.new_cache(self.model))
        new = _Rows(list(requests), out.past_key_values, mask, mask.sum(-1), None)
        new.last = self._sample(out.logits[:, -1], requests)
        self._join(new)
        self._after_tokens(self._rows.requests[-len(requests):], new.last.tolist(),
                           range(len(self._rows.requests) - len(requests), len(self._rows.requests)))

    def _decode(self) -> None:
        rows = self._rows
        rows.mask = torch.cat([rows.mask, torch.ones_like(rows.mask[:, :1])], dim=1)
        out = self._forward([r.adapter for r in rows.requests], input_ids=rows.last[:, None],
                            attention_mask=rows.mask, position_ids=rows.lengths[:, None],
                            cache=rows.cache)
        rows.cache, rows.lengths = out.past_key_values, rows.lengths + 1
        rows.last = self._sample(out.logits[:, -1], rows.requests)
        self._after_tokens(list(rows.requests), rows.last.tolist(), range(len(rows.requests)))

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The next token of each row: argmax where greedy, else from the row's own generator."""
        tokens = logits.argmax(dim=-1)
        for i, request in enumerate(requests):
            if request.generator is not None:
                tokens[i] = sample_token(logits[i], request.sampling, request.generator)
        return tokens

    def _after_tokens(self, requests: list[Request], tokens: list[int], rows: Sequence[int]) -> None:
        """Record each row's new token, emit its text, and remove the rows that finished."""
        now = time.perf_counter()
        done = []
        for request, token, row in zip(requests, tokens, rows):
            if request.first_token_at is None:
                request.first_token_at = now
                self.observer.first_token(request, now - request.arrived)
            else:
                self.observer.next_token(request, now - request.last_token_at)
            request.last_token_at = now
            request.generated.append(token)
            self._update_text(request, token)
            if request.finish_reason is not None:
                done.append(row)
        if done:
            self._remove(done)

    def _update_text(self, request: Request, token: int) -> None:
        stops = request.sampling.stop
        if token in self.eos_ids:
            request.finish_reason = "stop"
        else:
            text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            cut = _first_stop(text, stops, start=max(0, request.sent - max((len(s) for s in stops), default=0)))
            if cut is not None:
                text, request.finish_reason = text[:cut], "stop"
            elif len(request.generated) >= request.sampling.max_tokens:
                request.finish_reason = "length"
            request.text = text
        if request.finish_reason is None:
            # Hold back what could still become a stop string, and an unfinished multi-byte character.
            safe = len(request.text) - max((len(s) - 1 for s in stops), default=0)
            while safe > request.sent and request.text[safe - 1] == "\ufffd":
                safe -= 1
        else:
            safe = len(request.text)
        if safe > request.sent:
            request.emit(Event("text", request.text[request.sent:safe]))
            request.sent = safe
        if request.finish_reason is not None:
            request.emit(Event("finish", finish_reason=request.finish_reason, prompt_tokens=len(request.prompt_ids),
                               completion_tokens=len(request.generated)))
            self.observer.finished(request, time.perf_counter() - request.arrived)

    def _fail(self, request: Request, status: int, message: str) -> None:
        request.finish_reason = "error"
        request.emit(Event("error", text=message, status=status))

    # --- the batch's KV cache --------------------------------------------------------------------------
    def _join(self, new: _Rows) -> None:
        """Append `new` rows to the running batch, left-padding whichever side is shorter."""
        rows = self._rows
        if not rows.requests:
            self._rows = new
            return
        width = max(rows.mask.shape[1], new.mask.shape[1])
        self._rows = _Rows(rows.requests + new.requests, kv_cache.joined(self.model, rows.cache, new.cache, width),
                           torch.cat([kv_cache.pad_left(rows.mask, width), kv_cache.pad_left(new.mask, width)]),
                           torch.cat([rows.lengths, new.lengths]), torch.cat([rows.last, new.last]))

    def _remove(self, gone: Sequence[int]) -> None:
        """Drop rows `gone` from the batch, and the cache columns no remaining row uses."""
        rows = self._rows
        keep = [i for i in range(len(rows.requests)) if i not in set(gone)]
        if not keep:
            self._rows = _Rows()
            return
        index = torch.tensor(keep, device=rows.mask.device)
        mask = rows.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every row
        self._rows = _Rows([rows.requests[i] for i in keep], kv_cache.selected(self.model, rows.cache, index, start),
                           mask[:, start:], rows.lengths.index_select(0, index), rows.last.index_select(0, index))


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from softmax(logits / temperature), kept to the smallest set holding `top_p` of the mass."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1).cpu()
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # the mass before it already covers top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _eos_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return frozenset(ids)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
