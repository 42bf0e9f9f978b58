"""Calling an OpenAI-compatible chat endpoint many times: the client, bounded retries with backoff, and a
concurrent collection whose every answer is appended to a cache the moment it arrives.

Shared by the teacher (stage 1) and by evaluation (reference answers and the judge). A cache entry is keyed by a
hash of the request (endpoint, model, messages, sampling settings), so an interrupted collection resumes without
asking again for anything already answered. The API key is read from the environment variable the config names
and goes nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from .config import EndpointConfig, redact_url
from .errors import SodaError
from .records import AppendLog, atomic_write_jsonl

# Status codes worth asking again: timeouts, conflicts, rate limits and server-side failures.
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
# Status codes that no retry fixes and that would fail every request the same way.
FATAL_STATUS = {401, 403, 404}


class RequestFailed(Exception):
    """One request could not be answered within the retry budget."""


def request_key(base_url: str, body: dict) -> str:
    """The cache key of a request: the same whatever credentials the URL carries (they do not change the answer)."""
    return hashlib.sha256(json.dumps({"base_url": redact_url(base_url), **body}, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _retry_after(error) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def make_client(section: EndpointConfig, name: str):
    """An OpenAI client for `section` (`name` is its place in the config, e.g. "teacher", for messages)."""
    import openai

    if not section.base_url or not section.model:
        raise SodaError(f"{name}.base_url and {name}.model are needed to call the {name} endpoint")
    if section.api_key_env:
        key = os.environ.get(section.api_key_env)
        if not key:
            raise SodaError(f"environment variable {section.api_key_env} ({name}.api_key_env) is not set")
    else:
        key = "unused"  # local servers take no key, but the client requires a string
    return openai.OpenAI(base_url=section.base_url, api_key=key, max_retries=0, timeout=section.timeout_s)


def ask(client, body: dict, section: EndpointConfig, name: str) -> dict:
    """One chat completion with bounded retries and exponential backoff (honouring Retry-After)."""
    import openai

    reason = ""
    for attempt in range(section.max_retries + 1):
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
                raise SodaError(f"{name} endpoint {redact_url(section.base_url)} answered {e.status_code}: {e.message}") from None
            if e.status_code not in RETRYABLE_STATUS:
                raise RequestFailed(f"HTTP {e.status_code}: {e.message}") from None
            reason, wait = f"HTTP {e.status_code}", _retry_after(e)
        except openai.APITimeoutError:
            reason = "timeout"
        except openai.APIConnectionError as e:
            reason = f"connection error ({e.__cause__ or e})"
        except (openai.APIResponseValidationError, json.JSONDecodeError, AttributeError, TypeError) as e:
            reason = f"malformed response ({type(e).__name__})"
        if attempt < section.max_retries:
            backoff = min(section.backoff_initial_s * 2**attempt, section.backoff_max_s) * random.uniform(0.5, 1.0)
            time.sleep(min(wait, section.backoff_max_s) if wait is not None else backoff)
    raise RequestFailed(f"{reason} (after {section.max_retries + 1} attempts)")


def sum_usage(answers) -> dict:
    usage = [a["usage"] for a in answers if a.get("usage")]
    return {
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "completion_tokens": sum(u["completion_tokens"] for u in usage),
    }


def collect(
    section: EndpointConfig,
    name: str,
    jobs: dict[str, tuple[str, dict]],
    cache: AppendLog,
    failed_path: Path,
    what: str,
    rerun: str,
    call: Callable | None = None,
) -> int:
    """Answer every job (request key → (id, request body)) not yet in `cache`, `section.concurrency` at a time,
    appending `{"key", "id", **answer}` as each answer arrives. `call(client, body)` makes one answer (default: `ask`).
    Requests that fail after their retries are listed in `failed_path` and reported in one error ("N of M {what}
    after retries ...") once the others are done. Returns how many requests were made."""
    call = call or (lambda client, body: ask(client, body, section, name))
    todo = [(key, rid, body) for key, (rid, body) in jobs.items() if key not in cache]
    failures = []
    if todo:
        client = make_client(section, name)
        with ThreadPoolExecutor(max_workers=section.concurrency) as pool, tqdm(
            total=len(jobs), initial=len(jobs) - len(todo), desc=name, unit="request"
        ) as bar:
            futures = {pool.submit(call, client, body): (key, rid) for key, rid, body in todo}
            try:
                for fut in as_completed(futures):
                    key, rid = futures[fut]
                    try:
                        answer = fut.result()
                    except RequestFailed as e:
                        failures.append({"id": rid, "reason": str(e)})
                        continue
                    cache.append([{"key": key, "id": rid, **answer}])  # only this thread writes
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    if failures:
        atomic_write_jsonl(failed_path, failures)
        raise SodaError(
            f"{len(failures)} of {len(jobs)} {what} after retries "
            f"(first: {failures[0]['reason']}; all in {failed_path}); the {len(jobs) - len(failures)} answered are cached — "
            f"{rerun} to retry only the failed ones"
        )
    failed_path.unlink(missing_ok=True)
    return len(todo)
