"""The sections that call an OpenAI-compatible chat endpoint: `EndpointConfig` says where and how patiently (retries,
spend and rate limits, the Batch API), and its subclasses add what each caller needs: the teacher, whose answers are
distilled (`teacher`), and the evaluation's reference model and judge, whose token usage is priced in the results
(`evaluate.reference`, `evaluate.judge`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from ..errors import SodaError
from .fields import added, operational


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat endpoint, and how patiently to call it."""

    section: typing.ClassVar[str] = "endpoint"  # its name in the config, for error messages

    base_url: str | None = field(default=None, metadata={
        "help": "the endpoint's base URL, any OpenAI-compatible one, e.g. https://api.openai.com/v1 (credentials in "
                "it are never written out)"})
    model: str | None = field(default=None, metadata={"help": "the model name sent with each request"})
    api_key_env: str | None = field(default="OPENAI_API_KEY", metadata={
        "help": "the *name* of the environment variable holding the API key (the key is written nowhere); null: no "
                "key"})
    headers_env: dict[str, str] | None = operational(None, help=(
        "extra request headers, each value read from the environment variable named here (a gateway's token, an "
        "organization id), e.g. {X-Gateway-Token: GATEWAY_TOKEN}; like the key, the values are written nowhere"))
    temperature: float = field(default=0.0, metadata={
        "help": "the sampling temperature sent with each request; 0: greedy"})
    max_tokens: int = field(default=1024, metadata={
        "help": "most tokens of each answer (the request's max_tokens); a longer answer is cut"})
    concurrency: int = operational(8, help="requests in flight at once (mode: sync)")
    max_retries: int = operational(6, help=(
        "retries of a request that failed transiently (HTTP 408, 409, 429, 5xx, a timeout, a connection error, an "
        "empty or malformed reply) before it counts as failed; 401, 403 and 404 stop the stage at once"))
    backoff_initial_s: float = operational(1.0, help=(
        "seconds before the first retry, doubled at each further one (with random jitter); a Retry-After the "
        "endpoint sends is waited instead"))
    backoff_max_s: float = operational(60.0, help="the longest wait between retries, in seconds, a Retry-After's too")
    timeout_s: float = operational(120.0, help="seconds a request may take before it counts as timed out")
    price_input_per_1m: float | None = operational(None, help=(
        "USD per million prompt tokens, for the cost estimate printed before sending and for max_cost_usd; null: "
        "unpriced"))
    price_output_per_1m: float | None = operational(None, help=(
        "USD per million completion tokens; as price_input_per_1m"))
    max_cost_usd: float | None = operational(None, help=(
        "stop the collection cleanly before its cost could pass this many USD, over every answer this directory has "
        "cached for the stage (they stay cached: run again with a higher limit to go on); needs both prices; null: "
        "no limit"))
    max_total_tokens: int | None = operational(None, help=(
        "the same limit in prompt + completion tokens; null: no limit"))
    requests_per_minute: int | None = operational(None, help=(
        "the provider's request rate limit, kept to before any 429 (over the last 60 s); null: none"))
    tokens_per_minute: int | None = operational(None, help=(
        "the provider's token rate limit, each request counted as its prompt's estimate (characters / 4) + "
        "max_tokens; null: none"))
    mode: str = operational("sync", help=(
        "\"sync\": requests sent as they go, `concurrency` at a time; \"batch\": the OpenAI Batch API (batch.py; "
        "half the price, answers within batch_window)"))
    batch_window: str = operational("24h", help="the Batch API's completion_window (mode: batch)")
    batch_poll_s: float = operational(30.0, help="seconds between checks of a submitted batch's status (mode: batch)")

    def __post_init__(self):
        if self.mode not in ("sync", "batch"):
            raise SodaError(f"{self.section}.mode: {self.mode!r} is not one (sync, or batch for the OpenAI Batch API)")


@dataclass
class TeacherConfig(EndpointConfig):
    section = "teacher"
    file: str | None = field(default=None, metadata={
        "help": "a JSONL of existing teacher answers (`messages` ending in an assistant turn), read instead of "
                "calling the endpoint"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "a system message sent before every prompt; null: none"})
    temperature: float = field(default=0.7, metadata={"help": "the teacher's sampling temperature"})
    top_p: float = field(default=1.0, metadata={
        "help": "the teacher's nucleus sampling: draw from the fewest tokens holding this much probability; 1: no cut"})
    seed: int | None = field(default=None, metadata={
        "help": "a seed sent with each request, for endpoints that honour it (best-effort determinism); null: none"})
    top_logprobs: int | None = added(None, help=(
        "grey-box teachers: ask for each answer token's log-probability and its top N alternatives (OpenAI: up to 20; "
        "vLLM's server: more), kept in teacher.jsonl for warmup.teacher_kl; null: none asked"))


@dataclass
class ScoredEndpointConfig(EndpointConfig):
    """An evaluation endpoint whose token usage is priced in the results (defaults: GPT-4o's list price, USD)."""

    price_input_per_1m: float | None = field(default=2.5, metadata={
        "help": "USD per million prompt tokens, for the cost in the results and for max_cost_usd; null: tokens "
                "reported only"})
    price_output_per_1m: float | None = field(default=10.0, metadata={
        "help": "USD per million completion tokens; as price_input_per_1m"})


@dataclass
class ReferenceConfig(ScoredEndpointConfig):
    """The reference model the judge compares against (GPT-4o in the paper); greedy. No base_url: the benchmark's
    own reference answers instead."""

    section = "evaluate.reference"
    max_tokens: int = field(default=1536, metadata={"help": "most tokens of each reference answer (the paper's 1536)"})


@dataclass
class JudgeConfig(ScoredEndpointConfig):
    """The LLM judge (GPT-4o in the paper); no base_url: no judge, offline metrics only."""

    section = "evaluate.judge"
    max_tokens: int = field(default=512, metadata={"help": "most tokens of each judgment"})
    template: str = field(default="fastchat", metadata={
        "help": "\"fastchat\": FastChat's pairwise review prompt, the paper's lineage (GAD, MiniLLM); \"soda\": this "
                "package's own stricter wording; or a text file with {question}, {answer_1}, {answer_2}"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "the judge's system message; null: the template's own (FastChat's for a file)"})
    parse_retries: int = field(default=2, metadata={
        "help": "times the judge is asked again when its reply's first line does not hold two scores from 1 to 10; "
                "then the judgment counts as unparseable"})
