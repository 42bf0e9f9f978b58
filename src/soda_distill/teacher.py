"""Stage 1 — teacher responses y_t for every prompt, from an OpenAI-compatible chat API or an existing file.

Every answer is appended to `teacher_cache.jsonl`, keyed by a hash of the request (endpoint, model, messages,
sampling settings), the moment it arrives; an interrupted collection resumes without asking again for anything
already answered. The API key is read from the environment variable the config names and goes nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from .config import Config, fingerprint
from .errors import SodaError
from .manifest import RunDir
from .records import AppendLog, Example, atomic_write_jsonl, read_examples, sha256_file

# Status codes worth asking again: timeouts, conflicts, rate limits and server-side failures.
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Status codes that no retry fixes and that would fail every prompt the same way.
FATAL_STATUS = {401, 403, 404}


class RequestFailed(Exception):
    """One prompt could not be answered within the retry budget."""


def _source_fingerprint(cfg: Config, path: Path) -> str:
    parts = [fingerprint(cfg.teacher), sha256_file(path), str(cfg.data.limit)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def request_body(cfg: Config, ex: Example) -> dict:
    t = cfg.teacher
    messages = ([{"role": "system", "content": t.system_prompt}] if t.system_prompt else []) + ex.prompt
    body = {"model": t.model, "messages": messages, "temperature": t.temperature, "top_p": t.top_p, "max_tokens": t.max_tokens}
    if t.seed is not None:
        body["seed"] = t.seed
    return body


def request_key(base_url: str, body: dict) -> str:
    return hashlib.sha256(json.dumps({"base_url": base_url, **body}, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _retry_after(error) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def ask(client, body: dict, cfg: Config) -> dict:
    """One chat completion with bounded retries and exponential backoff (honouring Retry-After)."""
    import openai

    t = cfg.teacher
    reason = ""
    for attempt in range(t.max_retries + 1):
        wait = None
        try:
            resp = client.chat.completions.create(**body)
            choices = getattr(resp, "choices", None)
            if not choices:
                reason = "malformed response (no choices)"
            elif not (choices[0].message.content or "").strip():
                reason = "empty completion"
            else:
                usage = getattr(resp, "usage", None)
                return {
                    "content": choices[0].message.content,
                    "finish_reason": choices[0].finish_reason,
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens} if usage else None,
                }
        except openai.APIStatusError as e:
            if e.status_code in FATAL_STATUS:
                raise SodaError(f"teacher endpoint {t.base_url} answered {e.status_code}: {e.message}") from None
            if e.status_code not in RETRYABLE_STATUS:
                raise RequestFailed(f"HTTP {e.status_code}: {e.message}") from None
            reason, wait = f"HTTP {e.status_code}", _retry_after(e)
        except openai.APITimeoutError:
            reason = "timeout"
        except openai.APIConnectionError as e:
            reason = f"connection error ({e.__cause__ or e})"
        except (openai.APIResponseValidationError, json.JSONDecodeError, AttributeError, TypeError) as e:
            reason = f"malformed response ({type(e).__name__})"
        if attempt < t.max_retries:
            backoff = min(t.backoff_initial_s * 2**attempt, t.backoff_max_s) * random.uniform(0.5, 1.0)
            time.sleep(min(wait, t.backoff_max_s) if wait is not None else backoff)
    raise RequestFailed(f"{reason} (after {t.max_retries + 1} attempts)")


def make_client(cfg: Config):
    import openai

    t = cfg.teacher
    if not t.base_url or not t.model:
        raise SodaError("teacher.base_url and teacher.model are needed to call a teacher API (or set teacher.file)")
    if t.api_key_env:
        key = os.environ.get(t.api_key_env)
        if not key:
            raise SodaError(f"environment variable {t.api_key_env} (teacher.api_key_env) is not set")
    else:
        key = "unused"  # local servers take no key, but the client requires a string
    return openai.OpenAI(base_url=t.base_url, api_key=key, max_retries=0, timeout=t.timeout_s)


def _collect(cfg: Config, run: RunDir, examples: list[Example], info: dict) -> list[dict]:
    t = cfg.teacher
    cache = AppendLog(run.file("teacher_cache.jsonl"), "key")
    jobs = {}
    for ex in examples:
        body = request_body(cfg, ex)
        jobs[ex.id] = (request_key(t.base_url, body), body)
    todo = [ex for ex in examples if jobs[ex.id][0] not in cache]
    failures = []
    if todo:
        client = make_client(cfg)
        with ThreadPoolExecutor(max_workers=t.concurrency) as pool, tqdm(
            total=len(examples), initial=len(examples) - len(todo), desc="teacher", unit="prompt"
        ) as bar:
            futures = {pool.submit(ask, client, jobs[ex.id][1], cfg): ex for ex in todo}
            try:
                for fut in as_completed(futures):
                    ex = futures[fut]
                    try:
                        answer = fut.result()
                    except RequestFailed as e:
                        failures.append({"id": ex.id, "reason": str(e)})
                        continue
                    cache.append([{"key": jobs[ex.id][0], "id": ex.id, **answer}])  # only this thread writes
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    failed_path = run.file("teacher_failed.jsonl")
    if failures:
        atomic_write_jsonl(failed_path, failures)
        raise SodaError(
            f"{len(failures)} of {len(examples)} prompts got no teacher answer after retries "
            f"(first: {failures[0]['reason']}; all in {failed_path}); the {len(examples) - len(failures)} answered are cached — "
            "run the stage again to retry only the failed ones"
        )
    failed_path.unlink(missing_ok=True)
    answers = [cache.records[jobs[ex.id][0]] for ex in examples]
    usage = [a["usage"] for a in answers if a.get("usage")]
    info["usage"] = {
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "completion_tokens": sum(u["completion_tokens"] for u in usage),
    }
    info["truncated"] = sum(a.get("finish_reason") == "length" for a in answers)
    return [
        {"id": ex.id, "messages": ex.prompt + [{"role": "assistant", "content": a["content"]}], "finish_reason": a.get("finish_reason")}
        for ex, a in zip(examples, answers)
    ]


def run_teacher(cfg: Config, run: RunDir) -> Path:
    """Write `teacher.jsonl`: one `messages` record per prompt, ending with the teacher's answer."""
    source = Path(cfg.teacher.file or cfg.data.prompts or "")
    if not cfg.teacher.file and not cfg.data.prompts:
        raise SodaError("set data.prompts (prompts to send to the teacher API) or teacher.file (existing responses)")
    out = run.file("teacher.jsonl")
    fp = _source_fingerprint(cfg, source)
    if run.done("teacher", fp):
        return out
    run.record_input(source)
    with run.stage("teacher", fp) as info:
        if cfg.teacher.file:
            examples = read_examples(source, want_response=True, limit=cfg.data.limit)
            records = [{"id": ex.id, "messages": ex.prompt + [{"role": "assistant", "content": ex.response}]} for ex in examples]
            info["source"] = "file"
        else:
            examples = read_examples(source, limit=cfg.data.limit)
            records = _collect(cfg, run, examples, info)
            info["source"] = "api"
        atomic_write_jsonl(out, records)
        info["records"] = len(records)
    return out
