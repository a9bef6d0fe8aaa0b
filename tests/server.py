"""Test helpers for `lorakit serve`: a tiny model with a chat template and adapters, and a real server
process on 127.0.0.1 that is always stopped."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx  # the HTTP library the openai client itself uses
from openai import OpenAI
import torch
import transformers

import lorakit as lk
import tiny

CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
                 "{% if add_generation_prompt %} the lord said{% endif %}")
STARTUP_S = 90  # loading torch, transformers and the model on a busy 2-core machine
STOP_S = 30


def chat_model_dir(path: Path) -> Path:
    """tiny.causal_lm_dir with a chat template on its tokenizer."""
    tiny.causal_lm_dir(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def random_adapter(model_dir: Path, out: Path, seed: int, rank: int = 4,
                   targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """An adapter with seeded random B (a fresh one is a no-op), so that it changes what the model writes."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    lk.inject_(model, lk.LoraConfig(rank=rank, alpha=2 * rank, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["default"].B.copy_(torch.randn(layer.adapters["default"].B.shape, generator=g) * 0.5)
    return lk.save_adapter(model, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `lorakit serve` process: its base URL, process, and the log it wrote."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, api_key: str = "-", **kwargs):
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics without labels, by name."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line and not line.startswith("#") and "{" not in line}

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@contextmanager
def running(args: list[str], tmp: Path):
    """`lorakit serve ARGS --port P` until the block ends; then SIGTERM (kill after STOP_S)."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", *args, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, port, log)
    try:
        _wait_healthy(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"lorakit serve exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"lorakit serve did not answer /health within {STARTUP_S} s:\n{server.log.read_text()}")
