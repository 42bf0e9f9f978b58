"""Calling an OpenAI-compatible chat endpoint many times: the client, bounded retries with backoff, and a
concurrent collection whose every answer is appended to a cache the moment it arrives.

The requests go out from one asyncio event loop through the openai SDK's aiohttp transport: a thread per request
(and the GIL they share) held one process at 256 requests/s, the event loop reaches 583 (bench/collect.py).

Shared by the teacher (stage 1) and by evaluation (reference answers and the judge). A cache entry is keyed by a
hash of the request (endpoint, model, messages, sampling settings), so an interrupted collection resumes without
asking again for anything already answered. The API key is read from the environment variable the config names
and goes nowhere else.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from tqdm.auto import tqdm

from .config import EndpointConfig, redact_url
from .errors import SodaError
from .batch import collect_batch, state_path
from .append_log import AppendLog
from .records import atomic_write_jsonl, token_logprobs

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


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def make_client(section: EndpointConfig, name: str, asynchronous: bool = False):
    """An OpenAI client for `section` (`name` is its place in the config, e.g. "teacher", for messages): the
    asynchronous one, on aiohttp, for concurrent requests; the blocking one for the Batch API's few calls."""
    import openai

    if not section.base_url or not section.model:
        raise SodaError(f"{name}.base_url and {name}.model are needed to call the {name} endpoint")
    if section.api_key_env:
        key = os.environ.get(section.api_key_env)
        if not key:
            raise SodaError(f"environment variable {section.api_key_env} ({name}.api_key_env) is not set")
    else:
        key = "unused"  # local servers take no key, but the client requires a string
    headers = {}
    for header, variable in (section.headers_env or {}).items():
        if not os.environ.get(variable):
            raise SodaError(f"environment variable {variable} ({name}.headers_env.{header}) is not set")
        headers[header] = os.environ[variable]
    url = urlsplit(section.base_url)
    if url.username or url.password:  # sent as basic auth, as httpx did (aiohttp refuses credentials in the URL)
        credentials = f"{unquote(url.username or '')}:{unquote(url.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        url = url._replace(netloc=url.netloc.rpartition("@")[2])
    settings = dict(base_url=urlunsplit(url), api_key=key, max_retries=0, timeout=section.timeout_s,
                    default_headers=headers or None)
    if asynchronous:
        return openai.AsyncOpenAI(**settings, http_client=openai.DefaultAioHttpClient(timeout=section.timeout_s))
    return openai.OpenAI(**settings)


async def ask(client, body: dict, section: EndpointConfig, name: str) -> dict:
    """One chat completion with bounded retries and exponential backoff (honouring Retry-After); `client` is
    asynchronous (make_client(..., asynchronous=True))."""
    import openai
    from openai.types.chat import ChatCompletion

    reason = ""
    for attempt in range(section.max_retries + 1):
        wait = None
        try:
            # The SDK's documented plain request: our body is JSON already, and checking it against the typed
            # parameters of chat.completions.create took a quarter of the client's CPU per request.
            resp = await client.post("/chat/completions", body=body, cast_to=ChatCompletion)
            choices = getattr(resp, "choices", None)
            if not choices:
                reason = "malformed response (no choices)"
            elif not (choices[0].message.content or "").strip():
                reason = "empty completion"
            else:
                usage = getattr(resp, "usage", None)
                logprobs = getattr(choices[0], "logprobs", None)
                return {
                    "content": choices[0].message.content,
                    "finish_reason": choices[0].finish_reason,
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens} if usage else None,
                    **token_logprobs(logprobs.model_dump() if logprobs is not None else None),
                }
        except openai.APIStatusError as e:
            if e.status_code in FATAL_STATUS:
                raise SodaError(f"{name} endpoint {redact_url(section.base_url)} answered {e.status_code}: {e.message}") from None
            if e.status_code not in RETRYABLE_STATUS:
                raise RequestFailed(f"HTTP {e.status_code}: {e.message}") from None
            reason, wait = f"HTTP {e.status_code}", _retry_after(e)
        except openai.APITimeoutError as e:
            # The aiohttp transport reports a refused connection as a connect timeout: name what really happened.
            cause = _root_cause(e)
            reason = f"connection error ({cause})" if isinstance(cause, OSError) and not isinstance(cause, TimeoutError) else "timeout"
        except openai.APIConnectionError as e:
            reason = f"connection error ({e.__cause__ or e})"
        except (openai.APIResponseValidationError, json.JSONDecodeError, AttributeError, TypeError) as e:
            reason = f"malformed response ({type(e).__name__})"
        if attempt < section.max_retries:
            backoff = min(section.backoff_initial_s * 2**attempt, section.backoff_max_s) * random.uniform(0.5, 1.0)
            await asyncio.sleep(min(wait, section.backoff_max_s) if wait is not None else backoff)
    raise RequestFailed(f"{reason} (after {section.max_retries + 1} attempts)")


def sum_usage(answers) -> dict:
    usage = [a["usage"] for a in answers if a.get("usage")]
    return {
        "prompt_tokens": sum(u["prompt_tokens"] for u in usage),
        "completion_tokens": sum(u["completion_tokens"] for u in usage),
    }


def cost_usd(usage: dict, section: EndpointConfig) -> float | None:
    """What `usage` costs at the section's prices; None where they are not set."""
    if section.price_input_per_1m is None or section.price_output_per_1m is None:
        return None
    return round((usage["prompt_tokens"] * section.price_input_per_1m
                  + usage["completion_tokens"] * section.price_output_per_1m) / 1e6, 4)


def estimated_usage(body: dict) -> dict:
    """A request's tokens before it is sent: its text at ~4 characters a token, and at most max_tokens back."""
    text = sum(len(str(m.get("content", ""))) + 16 for m in body.get("messages", []))
    return {"prompt_tokens": text // 4 + 1, "completion_tokens": int(body.get("max_tokens") or 0)}


class Spend:
    """A collection's spending against the section's limits: what its cached answers cost, plus the most that the
    requests in flight can still add, so that a limit is never passed."""

    def __init__(self, section: EndpointConfig, answered: list[dict]):
        self.section, self.usage = section, sum_usage(answered)
        self.in_flight: dict = {}
        if section.max_cost_usd is not None and cost_usd(self.usage, section) is None:
            raise SodaError("max_cost_usd needs this endpoint's prices (price_input_per_1m, price_output_per_1m)")

    def _total(self, extra: list[dict]) -> dict:
        return {k: self.usage[k] + sum(u[k] for u in extra) for k in self.usage}

    def limit_reached(self, estimate: dict) -> str | None:
        """Why a request of this `estimated_usage` may not be sent, or None."""
        s, worst = self.section, self._total([*self.in_flight.values(), estimate])
        if s.max_total_tokens is not None and sum(worst.values()) > s.max_total_tokens:
            return f"max_total_tokens = {s.max_total_tokens}"
        if s.max_cost_usd is not None and cost_usd(worst, s) > s.max_cost_usd:
            return f"max_cost_usd = {s.max_cost_usd}"
        return None

    def answered(self, answer: dict) -> None:
        for k, v in (answer.get("usage") or {}).items():
            self.usage[k] += v

    def describe(self) -> str:
        cost = cost_usd(self.usage, self.section)
        return f"{sum(self.usage.values())} tokens" + (f", {cost:.4f} USD" if cost is not None else "")


class RateLimit:
    """Requests and tokens per minute, as a provider states its limits: a request waits until the last minute's
    sends leave room for it (checked and counted with no await between, so concurrent senders cannot overrun it)."""

    WINDOW_S = 60.0

    def __init__(self, section: EndpointConfig):
        self.rpm, self.tpm, self.sent = section.requests_per_minute, section.tokens_per_minute, []

    async def wait(self, tokens: int) -> None:
        if not (self.rpm or self.tpm):
            return
        while True:
            now = time.monotonic()
            self.sent = [(t, n) for t, n in self.sent if now - t < self.WINDOW_S]
            if (not self.rpm or len(self.sent) < self.rpm) and (
                    not self.tpm or not self.sent or sum(n for _, n in self.sent) + tokens <= self.tpm):
                break
            await asyncio.sleep(max(0.01, self.WINDOW_S - (now - self.sent[0][0])))
        self.sent.append((time.monotonic(), tokens))


def estimate(section: EndpointConfig, name: str, todo: list[dict], cached: int) -> str:
    """How many requests are to be sent, and what they may cost at most: printed before sending, and by --dry-run."""
    usage = {k: sum(estimated_usage(b)[k] for b in todo) for k in ("prompt_tokens", "completion_tokens")}
    cost = cost_usd(usage, section)
    return (f"{name}: {len(todo)} requests to send to {section.model} at {redact_url(section.base_url or '')} "
            f"({cached} answered before); at most ~{usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
            f"completion tokens" + (f", ≤ {cost:.4f} USD" if cost is not None else " (no prices set)"))


def collect(
    section: EndpointConfig,
    name: str,
    jobs: dict[str, tuple[str, dict]],
    cache: AppendLog,
    failed_path: Path,
    what: str,
    rerun: str,
    call: Callable | None = None,
    record: Callable | None = None,
) -> int:
    """Answer every job (request key → (id, request body)) not yet in `cache`, `section.concurrency` at a time,
    appending `{"key", "id", **answer}` as each answer arrives. `await call(client, body)` makes one answer (default:
    `ask`); with `mode: batch` the Batch API does (batch.py), and `record(answer)` makes what is cached of an answer it
    got.
    Prints the requests to make and their cost at most first (`estimate`); keeps to the section's spend
    and rate limits. Requests that fail after their retries are listed in `failed_path` and reported in one error
    ("N of M {what} after retries ...") once the others are done; a spend limit reached is an error too, once the
    requests in flight are in. Returns how many requests were made."""
    call = call or (lambda client, body: ask(client, body, section, name))
    todo = [(key, rid, body) for key, (rid, body) in jobs.items() if key not in cache]
    failures, stopped, sent = [], None, 0
    if todo:
        print(estimate(section, name, [body for _, _, body in todo], len(jobs) - len(todo)), file=sys.stderr)
        spend = Spend(section, [cache.records[k] for k in jobs if k in cache])
    if todo and section.mode == "batch":
        total = {k: sum(estimated_usage(body)[k] for _, _, body in todo) for k in ("prompt_tokens", "completion_tokens")}
        limit = spend.limit_reached(total)
        if limit and not state_path(cache).exists():  # a batch is all or nothing: it is not submitted past a limit
            raise SodaError(f"{name}: a batch of {len(todo)} requests could pass {name}.{limit} (spent {spend.describe()}); "
                            f"raise the limit or send fewer prompts")
        failures, sent = collect_batch(make_client(section, name), section, name, todo, cache, record), len(todo)
    elif todo:
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=name, unit="request") as bar:
            try:
                stopped, sent = _run(_answer_concurrently(section, name, todo, call, cache, spend, failures, bar))
            finally:
                cache.sync()
    if failures:
        atomic_write_jsonl(failed_path, failures)
        raise SodaError(
            f"{len(failures)} of {len(jobs)} {what} after retries "
            f"(first: {failures[0]['reason']}; all in {failed_path}); the {len(jobs) - len(failures)} answered are cached — "
            f"{rerun} to retry only the failed ones"
        )
    if stopped:
        answered = sum(k in cache for k in jobs)
        raise SodaError(f"{name}: stopped at its spend limit ({name}.{stopped}; spent {spend.describe()}): "
                        f"{answered} of {len(jobs)} answered and cached — raise the limit and {rerun} to go on")
    failed_path.unlink(missing_ok=True)
    return sent


def _run(coroutine):
    """asyncio.run, also where an event loop runs already (a notebook): then on a thread of its own, which an
    interrupt stops too."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    loop = asyncio.new_event_loop()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(loop.run_until_complete, coroutine)
            try:
                return future.result()
            except BaseException:
                loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
                raise
    finally:
        loop.close()


async def _answer_concurrently(section: EndpointConfig, name: str, todo: list, call: Callable, cache: AppendLog,
                               spend: Spend, failures: list, bar) -> tuple[str | None, int]:
    """`section.concurrency` workers on one event loop, each sending the next request while the spend and rate limits
    allow it. Answers that arrive in the same turn of the loop are appended together. Returns (the limit that stopped
    the collection or None, requests sent)."""
    queue, rate, loop = iter(todo), RateLimit(section), asyncio.get_running_loop()
    arrived, state, workers, write_error = [], {"stopped": None, "sent": 0}, [], []

    def write() -> None:
        if not arrived or write_error:
            return
        try:
            cache.append(arrived)
        except OSError as e:  # a full disk: nothing more is sent, and the caller reports it in one line
            write_error.append(e)
            for w in workers:
                w.cancel()
            return
        bar.update(len(arrived))
        arrived.clear()

    async def worker(client) -> None:
        while state["stopped"] is None and (item := next(queue, None)) is not None:
            key, rid, body = item
            estimate = estimated_usage(body)
            state["stopped"] = spend.limit_reached(estimate)
            if state["stopped"]:
                return
            ticket = object()
            spend.in_flight[ticket] = estimate  # counted from the check on, through any wait for the rate limit
            try:
                await rate.wait(sum(estimate.values()))
                state["sent"] += 1
                answer = await call(client, body)
            except RequestFailed as e:
                failures.append({"id": rid, "reason": str(e)})
            else:
                if not arrived:
                    loop.call_soon(write)
                arrived.append({"key": key, "id": rid, **answer})
                spend.answered(answer)
            finally:
                del spend.in_flight[ticket]

    async with make_client(section, name, asynchronous=True) as client:
        workers.extend(asyncio.ensure_future(worker(client)) for _ in range(section.concurrency))
        try:
            await asyncio.gather(*workers)
        except BaseException:  # a fatal answer, an interrupt or a failed write: the others stop, what arrived is kept
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if not write_error:
                raise
        finally:
            write()
    if write_error:
        raise write_error[0]
    return state["stopped"], state["sent"]
