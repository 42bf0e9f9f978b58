"""A loopback server speaking the OpenAI Files + Batches protocol (the parts a batch client uses: upload a file,
create, retrieve and list batches, download a file's content), answering each request of a batch by sending it to
a real chat endpoint upstream (`transformers serve` in the tests). `hold` keeps batches in progress until released;
`fail` names requests (by their last message) to answer with an error, as a provider's error file does."""

from __future__ import annotations

import email.parser
import http.server
import json
import threading
import time
import urllib.request


class BatchServer:
    def __init__(self, upstream: str):
        self.upstream, self.files, self.batches = upstream.rstrip("/"), {}, {}
        self.uploads = self.batches_created = 0
        self.hold, self.fail, self.lock = threading.Event(), set(), threading.Lock()
        self.hold.set()  # set: batches run; cleared: they wait in progress
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self, obj, status=200, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == "/v1/files":
                    form = email.parser.BytesParser().parsebytes(
                        b"content-type: " + self.headers["content-type"].encode() + b"\r\n\r\n" + body)
                    parts = {p.get_param("name", header="content-disposition"): p for p in form.get_payload()}
                    server.uploads += 1
                    self.reply(server.add_file(parts["file"].get_payload(decode=True), parts["purpose"].get_payload()))
                elif self.path == "/v1/batches":
                    self.reply(server.create_batch(json.loads(body)))
                else:
                    self.reply({"error": {"message": f"no route {self.path}"}}, 404)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/v1/batches":
                    with server.lock:
                        data = sorted(server.batches.values(), key=lambda b: -b["created_at"])
                    self.reply({"object": "list", "data": data, "has_more": False})
                elif path.startswith("/v1/batches/"):
                    self.reply(server.batches[path.rsplit("/", 1)[1]])
                elif path.startswith("/v1/files/") and path.endswith("/content"):
                    self.reply(None, raw=server.files[path.split("/")[3]]["content"])
                else:
                    self.reply({"error": {"message": f"no route {path}"}}, 404)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_file(self, content: bytes, purpose: str) -> dict:
        with self.lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = {"content": content, "meta": {
                "id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": f"{file_id}.jsonl", "purpose": purpose, "status": "processed"}}
        return self.files[file_id]["meta"]

    def create_batch(self, request: dict) -> dict:
        with self.lock:
            self.batches_created += 1
            batch_id = f"batch_{len(self.batches) + 1}"
            lines = [json.loads(x) for x in self.files[request["input_file_id"]]["content"].splitlines() if x.strip()]
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": request["endpoint"], "input_file_id": request["input_file_id"],
                "completion_window": request["completion_window"], "status": "in_progress", "created_at": time.time_ns(),
                "metadata": request.get("metadata"), "output_file_id": None, "error_file_id": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        threading.Thread(target=self._run, args=(batch_id, lines), daemon=True).start()
        return self.batches[batch_id]

    def _run(self, batch_id: str, lines: list[dict]) -> None:
        self.hold.wait()
        out, errors = [], []
        for line in lines:
            if line["body"]["messages"][-1]["content"] in self.fail:
                errors.append({"custom_id": line["custom_id"], "response": None,
                               "error": {"code": "server_error", "message": "the provider failed this request"}})
                self.batches[batch_id]["request_counts"]["failed"] += 1
                continue
            ask = urllib.request.Request(self.upstream + line["url"], json.dumps(line["body"]).encode(),
                                         {"content-type": "application/json"})
            with urllib.request.urlopen(ask, timeout=300) as r:
                out.append({"custom_id": line["custom_id"], "response": {"status_code": r.status, "body": json.loads(r.read())},
                            "error": None})
            self.batches[batch_id]["request_counts"]["completed"] += 1
        to_bytes = lambda records: "".join(json.dumps(r) + "\n" for r in records).encode()
        batch = self.batches[batch_id]
        batch["output_file_id"] = self.add_file(to_bytes(out), "batch_output")["id"] if out else None
        batch["error_file_id"] = self.add_file(to_bytes(errors), "batch_output")["id"] if errors else None
        batch["status"] = "completed"

    def close(self):
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()
