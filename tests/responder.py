"""A tiny OpenAI-compatible chat endpoint on loopback, answering at once: for measuring and limiting *our* client,
where a real model server would be the bottleneck. Every answer reports the same usage; requests are counted and
timed. Used by tests/test_spend.py and bench/collect.py (`python tests/responder.py PORT` serves alone)."""

from __future__ import annotations

import http.server
import json
import threading
import time


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


class Responder:
    def __init__(self, port: int = 0):
        self.lock, self.times, self.asked, self.headers = threading.Lock(), [], [], []
        responder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with responder.lock:
                    responder.times.append(time.monotonic())
                    responder.asked.append(body["messages"][-1]["content"])
                    responder.headers.append({k.lower(): v for k, v in self.headers.items()})
                answer = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "usage": USAGE,
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": "ok: " + body["messages"][-1]["content"]}}]}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":  # serve on the given port until killed (bench/collect.py runs it as its own process)
    import sys

    r = Responder(int(sys.argv[1]))
    print(r.url, flush=True)
    threading.Event().wait()
