"""The OpenAI Batch API for an endpoint stage (`mode: batch` on the teacher, the reference or the judge): half the
price at scale, answers within the completion window instead of at once.

The requests not yet cached go into one JSONL file (custom_id = the cache key), which is uploaded (Files API) and
submitted as a batch (Batches API); the batch is polled until it ends, and every answer in its output file is
appended to the same cache the synchronous path fills, so the stage then finds everything answered. The uploaded
file's and the batch's ids are written to BATCH_STATE beside the cache before each next step: a killed process picks
the batch up again and never submits the same requests twice.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .config import EndpointConfig
from .errors import SodaError
from .append_log import AppendLog
from .records import atomic_write_jsonl, atomic_write_text, token_logprobs

ENDED = ("completed", "failed", "expired", "cancelled")
CHAT = "/v1/chat/completions"


def state_path(cache: AppendLog) -> Path:
    return cache.path.with_name(cache.path.stem + ".batch.json")


def _save(path: Path, state: dict) -> None:
    atomic_write_text(path, json.dumps(state, indent=1) + "\n")


def _submit(client, section: EndpointConfig, name: str, todo: list[tuple[str, str, dict]], cache: AppendLog) -> dict:
    """Upload the requests and create their batch, recording each id as soon as it exists; a batch created just
    before a kill (its id not yet recorded) is found again by its input file."""
    path = state_path(cache)
    state = json.loads(path.read_text()) if path.exists() else {}
    if "input_file_id" not in state:
        requests = cache.path.with_name(cache.path.stem + ".batch_input.jsonl")
        atomic_write_jsonl(requests, [{"custom_id": key, "method": "POST", "url": CHAT, "body": body} for key, _, body in todo])
        with open(requests, "rb") as f:
            state = {"input_file_id": client.files.create(file=f, purpose="batch").id,
                     "ids": {key: rid for key, rid, _ in todo}}
        _save(path, state)
    if "batch_id" not in state:
        found = [b for b in client.batches.list(limit=100).data if b.input_file_id == state["input_file_id"]]
        batch = found[0] if found else client.batches.create(
            input_file_id=state["input_file_id"], endpoint=CHAT, completion_window=section.batch_window,
            metadata={"tool": "soda-distill", "stage": name})
        state["batch_id"] = batch.id
        _save(path, state)
        print(f"{name}: batch {batch.id} submitted ({len(state['ids'])} requests); a rerun picks it up", file=sys.stderr)
    return state


def _answers(client, file_id: str | None, ids: dict[str, str]) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """The (key, answer) in a batch output (or error) file, as `endpoint.ask` returns an answer, and the reason of
    each request it failed (by key)."""
    answered, failed = [], {}
    for line in client.files.content(file_id).text.splitlines() if file_id else []:
        record = json.loads(line) if line.strip() else {}
        key = record.get("custom_id")
        if key not in ids:
            continue
        response, error = record.get("response") or {}, record.get("error")
        body = response.get("body") or {}
        choice = (body.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content")
        if error or response.get("status_code") != 200:
            failed[key] = (error or {}).get("message") or f"HTTP {response.get('status_code')}"
        elif not (content or "").strip():
            failed[key] = "empty completion"
        else:
            usage = body.get("usage")
            answered.append((key, {"content": content, "finish_reason": choice.get("finish_reason"),
                                   "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens")} if usage else None,
                                   **token_logprobs(choice.get("logprobs"))}))
    return answered, failed


def collect_batch(client, section: EndpointConfig, name: str, todo: list[tuple[str, str, dict]], cache: AppendLog,
                  record: Callable[[dict], dict] | None = None) -> list[dict]:
    """Answer `todo` ((key, id, body) not in `cache`) through one batch, resuming a submitted one; appends each
    answer to `cache` (as `record` makes it from the answer, default as it is) and returns the failures (a request
    the batch did not answer is one)."""
    path = state_path(cache)
    state = _submit(client, section, name, todo, cache)
    with tqdm(total=len(state["ids"]), desc=f"{name} (batch)", unit="request") as bar:
        while True:
            batch = client.batches.retrieve(state["batch_id"])
            counts = batch.request_counts
            bar.n = (counts.completed + counts.failed) if counts else 0
            bar.set_postfix_str(batch.status)
            bar.refresh()
            if batch.status in ENDED:
                break
            time.sleep(section.batch_poll_s)
    answered, failed = _answers(client, batch.output_file_id, state["ids"])
    failed |= _answers(client, batch.error_file_id, state["ids"])[1]
    cache.append([{"key": key, "id": state["ids"][key], **(record(answer) if record else answer)} for key, answer in answered])
    cache.sync()
    got = {key for key, _ in answered}
    failures = [{"id": rid, "reason": f"batch {batch.id}: " + failed.get(key, f"ended {batch.status} without answering it")}
                for key, rid in state["ids"].items() if key not in got]
    path.unlink()  # the batch is used up: a rerun sends what is still missing as a new one
    if batch.status == "failed" and not answered:
        errors = getattr(batch, "errors", None)
        raise SodaError(f"{name}: batch {batch.id} failed ({errors.data[0].message if errors and errors.data else 'no reason given'})")
    return failures
