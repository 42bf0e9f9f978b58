"""Stage 1 — teacher responses y_t for every prompt, from an OpenAI-compatible chat API or an existing file.

Every answer is appended to `teacher_cache.jsonl` the moment it arrives (see `endpoint.collect`), so an interrupted
collection resumes without asking again for anything already answered.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..endpoint import collect, estimate, request_key, sum_usage
from ..errors import SodaError
from ..keys import KeyParts
from ..manifest import RunDir, StageResult
from ..pipeline import execute
from ..append_log import AppendLog
from ..records import Example, atomic_write_jsonl, read_examples, shown_data_path, source_digest


@dataclass
class TeacherResult(StageResult):
    source: str  # "file" or "api"
    records: int
    usage: dict | None = None  # the API's: tokens, requests
    truncated: int | None = None  # answers cut at teacher.max_tokens
    with_logprobs: int | None = None  # answers with their top-k log-probabilities (teacher.top_logprobs)


def _source(cfg: Config) -> Path:
    if not cfg.teacher.file and not cfg.data.prompts:
        raise SodaError("set data.prompts (prompts to send to the teacher API) or teacher.file (existing responses)")
    return Path(cfg.teacher.file or cfg.data.prompts)


def teacher_key(cfg: Config) -> KeyParts:
    """The teacher section, the source's digest (hashed once: a prompt file may be large), data.limit and
    data.columns. A shipped teacher file counts as `builtin:NAME`, not its path, so a run resumes from another
    checkout or venv; runs made before keyed the path itself."""
    rest = [source_digest(_source(cfg)), str(cfg.data.limit),
            json.dumps(cfg.data.columns, sort_keys=True) if cfg.data.columns else None]
    shown = dataclasses.replace(cfg.teacher, file=shown_data_path(cfg.teacher.file)) if cfg.teacher.file else cfg.teacher
    return KeyParts([shown, *rest], legacy=[cfg.teacher, *rest])


def request_body(cfg: Config, ex: Example) -> dict:
    t = cfg.teacher
    messages = ([{"role": "system", "content": t.system_prompt}] if t.system_prompt else []) + ex.prompt
    body = {"model": t.model, "messages": messages, "temperature": t.temperature, "top_p": t.top_p, "max_tokens": t.max_tokens}
    if t.seed is not None:
        body["seed"] = t.seed
    if t.top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=t.top_logprobs)
    return body


def _jobs(cfg: Config, examples: list[Example]) -> tuple[list[str], dict[str, tuple[str, dict]]]:
    """Each prompt's request key, and the requests by key: (the prompt's id, the request body)."""
    bodies = [request_body(cfg, ex) for ex in examples]
    keys = [request_key(cfg.teacher.base_url, body) for body in bodies]
    return keys, {key: (ex.id, body) for key, ex, body in zip(keys, examples, bodies)}


def _collect(cfg: Config, run: RunDir, examples: list[Example]) -> tuple[list[dict], dict]:
    """The teacher's answers to `examples` as `messages` records, and their figures."""
    t = cfg.teacher
    cache = AppendLog(run.file("teacher_cache.jsonl"), "key")
    keys, jobs = _jobs(cfg, examples)
    collect(t, "teacher", jobs, cache, run.file("teacher_failed.jsonl"), "prompts got no teacher answer", "run the stage again")
    answers = [cache.records[key] for key in keys]
    figures = {"usage": sum_usage(answers), "truncated": sum(a.get("finish_reason") == "length" for a in answers),
               **({"with_logprobs": sum("logprobs" in a for a in answers)} if t.top_logprobs is not None else {})}
    return [
        {"id": ex.id, "messages": ex.prompt + [{"role": "assistant", "content": a["content"]}], "finish_reason": a.get("finish_reason"),
         **({"logprobs": a["logprobs"]} if "logprobs" in a else {})}
        for ex, a in zip(examples, answers)
    ], figures


def teacher_body(cfg: Config, run: RunDir, inputs: dict) -> TeacherResult:
    """Write `teacher.jsonl`: one `messages` record per prompt, ending with the teacher's answer."""
    source = _source(cfg)
    run.record_input(source)
    if cfg.teacher.file:
        examples = read_examples(source, want_response=True, limit=cfg.data.limit, columns=cfg.data.columns)
        records = [{"id": ex.id, "messages": ex.prompt + [{"role": "assistant", "content": ex.response}]} for ex in examples]
        result = TeacherResult(source="file", records=len(records))
    else:
        examples = read_examples(source, limit=cfg.data.limit, columns=cfg.data.columns)
        records, figures = _collect(cfg, run, examples)
        result = TeacherResult(source="api", records=len(records), **figures)
    atomic_write_jsonl(run.output("teacher"), records)
    return result


def run_teacher(cfg: Config, run: RunDir) -> Path:
    """The teacher stage (pipeline.execute): `teacher.jsonl`, unless finished."""
    return execute("teacher", cfg, run)


def plan_teacher(cfg: Config, run_path: Path) -> str:
    """--dry-run: the file the answers are read from, or the requests the stage would send and their cost at most."""
    if cfg.teacher.file:  # read as the stage reads it: a missing or malformed file is an error here too
        answers = read_examples(_source(cfg), want_response=True, limit=cfg.data.limit, columns=cfg.data.columns)
        return f"reads {len(answers)} teacher answers from {cfg.teacher.file}"
    _, jobs = _jobs(cfg, read_examples(_source(cfg), limit=cfg.data.limit, columns=cfg.data.columns))
    cache = run_path / "teacher_cache.jsonl"
    cached = set(AppendLog(cache, "key").records) if cache.exists() else set()
    return estimate(cfg.teacher, "teacher", [body for key, (_, body) in jobs.items() if key not in cached],
                    len(cached & set(jobs)))
