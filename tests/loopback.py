"""The plumbing of this suite's loopback JSON endpoints (responder.py, logprobs_server.py): an HTTP server on
127.0.0.1 answering every POST with `answer(body, headers)` as JSON, each request on its own thread."""

from __future__ import annotations

import http.server
import json
import threading


class LoopbackJSON:
    def __init__(self, port: int = 0):
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                data = json.dumps(endpoint.answer(body, self.headers)).encode()
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

    def answer(self, body: dict, headers) -> dict:
        raise NotImplementedError

    def close(self):
        self.server.shutdown()
        self.server.server_close()
