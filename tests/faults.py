"""A fault-injecting HTTP proxy for a real OpenAI-compatible server: each request is, at random (seeded), forwarded
untouched or answered with one of the failures a real endpoint shows."""

from __future__ import annotations

import http.server
import json
import random
import socket
import struct
import threading
import time
from collections import Counter

from conftest import forward, send_json

FAULTS = ("429", "429-retry-after", "500", "502", "503", "reset", "timeout", "truncated", "not-json", "empty", "length")


class FaultProxy:
    def __init__(self, upstream: str, fault_rate: float, seed: int = 0, hang_s: float = 1.0):
        self.upstream, self.fault_rate, self.hang_s = upstream, fault_rate, hang_s
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.asked: Counter = Counter()  # requests per prompt (last user message)
        self.faults: Counter = Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with proxy.lock:
                    proxy.asked[json.loads(body)["messages"][-1]["content"]] += 1
                    fault = proxy.rng.choice(FAULTS) if proxy.rng.random() < proxy.fault_rate else None
                    proxy.faults[fault or "none"] += 1
                if fault in ("429", "500", "502", "503"):
                    return send_json(self, int(fault), b'{"error": {"message": "injected"}}')
                if fault == "429-retry-after":
                    return send_json(self, 429, b'{"error": {"message": "slow down"}}', {"retry-after": "0.05"})
                if fault == "reset":  # RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault == "timeout":
                    time.sleep(proxy.hang_s)
                    self.close_connection = True
                    return
                if fault == "not-json":
                    return send_json(self, 200, b"<html>502 Bad Gateway</html>")
                status, data = forward(proxy.upstream + self.path, body)
                if status == 200 and fault in ("empty", "length"):
                    answer = json.loads(data)
                    if fault == "empty":
                        answer["choices"][0]["message"]["content"] = ""
                    else:
                        answer["choices"][0]["finish_reason"] = "length"
                    data = json.dumps(answer).encode()
                if fault == "truncated":  # promise the whole body, send half, hang up
                    send_json(self, 200, data, body=data[: len(data) // 2])
                    self.close_connection = True
                    return
                send_json(self, status, data)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up (timeout) makes the late reply fail: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
