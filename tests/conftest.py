"""Shared fixtures: the embedded student (converted once), a tiny random Llama, a real OpenAI-compatible server
(`transformers serve` on loopback) and a request-counting proxy in front of it."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from soda_distill.models import resolve_model

    return resolve_model("embedded")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_path) -> Path:
    """A random two-layer Llama with the embedded student's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def send_json(handler, status: int, data: bytes, headers: dict | None = None, body: bytes | None = None) -> None:
    """Answer an http.server request with JSON `data`; `body` (a cut-short `data`) is sent instead when given."""
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(data)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data if body is None else body)


def forward(url: str, body: bytes) -> tuple[int, bytes]:
    """POST `body` to the real server; its status and body, errors included."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


QUESTIONS = [
    "Name a primary color.", "What is 2 + 2?", "Give a synonym for happy.", "Name a planet.",
    "What do bees make?", "Name a fruit that is yellow.", "What is the opposite of cold?", "Name an ocean.",
    "What animal says moo?", "Name a day of the week.", "What is frozen water called?", "Name a musical instrument.",
]
ANSWERS = [
    "Red.", "4.", "Joyful.", "Mars.", "Honey.", "Banana.", "Hot.", "The Pacific.",
    "A cow.", "Monday.", "Ice.", "The piano.",
]


# Prompts with reference answers, in the `messages` format.
QA = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
      for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", QA)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """The questions of QA without their answers, as a teacher API run reads them."""
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])


@pytest.fixture(scope="session")
def chat_server(embedded_path):
    """`transformers serve` with the embedded student on a loopback port: a real OpenAI-compatible endpoint."""
    port = free_port()
    log = open(Path(os.environ.get("PYTEST_SERVER_LOG", "/tmp/soda-serve.log")), "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "transformers"), "serve", "--host", "127.0.0.1", "--port", str(port), embedded_path],
        stdout=log, stderr=subprocess.STDOUT,
        # One thread: on a CPU shared with the tests (and whatever else runs), torch's thread pool answers a
        # request 5-10x slower than a single thread does.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise RuntimeError("transformers serve exited; see its log")
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("transformers serve did not start")
    yield {"url": url, "model": embedded_path}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # still busy with requests a fault test abandoned
        proc.kill()
        proc.wait()


class CountingProxy:
    """A loopback HTTP proxy that forwards to the real server, counts chat requests per last user message and keeps
    each request's Authorization header."""

    def __init__(self, upstream: str):
        self.upstream, self.asked, self.authorizations = upstream, Counter(), []
        self.fail_after: int | None = None  # once this many requests were forwarded, answer 503 to the rest
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if proxy.fail_after is not None and sum(proxy.asked.values()) >= proxy.fail_after:
                    self.send_error(503, "injected failure")
                    return
                proxy.authorizations.append(self.headers.get("authorization"))
                try:
                    proxy.asked[json.loads(body)["messages"][-1]["content"]] += 1
                except (ValueError, KeyError):
                    pass
                send_json(self, *forward(proxy.upstream + self.path, body))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def counting_proxy(chat_server):
    proxy = CountingProxy(chat_server["url"])
    yield proxy
    proxy.close()
