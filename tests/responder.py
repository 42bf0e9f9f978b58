"""A tiny OpenAI-compatible chat endpoint on loopback, answering at once: for measuring and limiting *our* client,
where a real model server would be the bottleneck. Every answer reports the same usage; requests are counted and
timed. Used by tests/test_spend.py and bench/collect.py (`python tests/responder.py PORT` serves alone)."""

from __future__ import annotations

import threading
import time

from loopback import LoopbackJSON

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


class Responder(LoopbackJSON):
    def __init__(self, port: int = 0):
        self.lock, self.times, self.asked, self.headers = threading.Lock(), [], [], []
        super().__init__(port)

    def answer(self, body: dict, headers) -> dict:
        with self.lock:
            self.times.append(time.monotonic())
            self.asked.append(body["messages"][-1]["content"])
            self.headers.append({k.lower(): v for k, v in headers.items()})
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "usage": USAGE,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok: " + body["messages"][-1]["content"]}}]}


if __name__ == "__main__":  # serve on the given port until killed (bench/collect.py runs it as its own process)
    import sys

    r = Responder(int(sys.argv[1]))
    print(r.url, flush=True)
    threading.Event().wait()
