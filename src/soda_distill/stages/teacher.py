"""Stage 1 — teacher responses y_t for every prompt, from an OpenAI-compatible chat API or an existing file.

Every answer is appended to `teacher_cache.jsonl` the moment it arrives (see `endpoint.collect`), so an interrupted
collection resumes without asking again for anything already answered.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import Config, fingerprint
from ..endpoint import collect, estimate, request_key, sum_usage
from ..errors import SodaError
from ..manifest import RunDir, combine
from ..records import AppendLog, Example, atomic_write_jsonl, read_examples, shown_data_path, source_digest


def _source_fingerprint(cfg: Config, digest: str, shown=shown_data_path) -> str:
    """A shipped teacher file counts as `builtin:NAME`, not its path, so a run resumes from another checkout or venv."""
    teacher = dataclasses.replace(cfg.teacher, file=shown(cfg.teacher.file)) if cfg.teacher.file else cfg.teacher
    return combine(fingerprint(teacher), digest, str(cfg.data.limit),
                   *([json.dumps(cfg.data.columns, sort_keys=True)] if cfg.data.columns else []))


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


def _collect(cfg: Config, run: RunDir, examples: list[Example], info: dict) -> list[dict]:
    t = cfg.teacher
    cache = AppendLog(run.file("teacher_cache.jsonl"), "key")
    keys, jobs = _jobs(cfg, examples)
    collect(t, "teacher", jobs, cache, run.file("teacher_failed.jsonl"), "prompts got no teacher answer", "run the stage again")
    answers = [cache.records[key] for key in keys]
    info["usage"] = sum_usage(answers)
    info["truncated"] = sum(a.get("finish_reason") == "length" for a in answers)
    if t.top_logprobs is not None:
        info["with_logprobs"] = sum("logprobs" in a for a in answers)
    return [
        {"id": ex.id, "messages": ex.prompt + [{"role": "assistant", "content": a["content"]}], "finish_reason": a.get("finish_reason"),
         **({"logprobs": a["logprobs"]} if "logprobs" in a else {})}
        for ex, a in zip(examples, answers)
    ]


def run_teacher(cfg: Config, run: RunDir) -> Path:
    """Write `teacher.jsonl`: one `messages` record per prompt, ending with the teacher's answer."""
    source = Path(cfg.teacher.file or cfg.data.prompts or "")
    if not cfg.teacher.file and not cfg.data.prompts:
        raise SodaError("set data.prompts (prompts to send to the teacher API) or teacher.file (existing responses)")
    out = run.output("teacher")
    digest = source_digest(source)  # hashed once: a prompt file may be large
    fp = _source_fingerprint(cfg, digest)
    if run.done("teacher", fp, legacy=_source_fingerprint(cfg, digest, shown=str)):  # older runs: the path itself
        return out
    run.record_input(source)
    with run.stage("teacher", fp) as info:
        if cfg.teacher.file:
            examples = read_examples(source, want_response=True, limit=cfg.data.limit, columns=cfg.data.columns)
            records = [{"id": ex.id, "messages": ex.prompt + [{"role": "assistant", "content": ex.response}]} for ex in examples]
            info["source"] = "file"
        else:
            examples = read_examples(source, limit=cfg.data.limit, columns=cfg.data.columns)
            records = _collect(cfg, run, examples, info)
            info["source"] = "api"
        atomic_write_jsonl(out, records)
        info["records"] = len(records)
    return out


def plan_teacher(cfg: Config, run_path: Path) -> str:
    """--dry-run: the file the answers are read from, or the requests the stage would send and their cost at most."""
    if cfg.teacher.file:
        return f"reads the teacher's answers from {cfg.teacher.file}"
    if not cfg.data.prompts:
        raise SodaError("set data.prompts (prompts to send to the teacher API) or teacher.file (existing responses)")
    _, jobs = _jobs(cfg, read_examples(Path(cfg.data.prompts), limit=cfg.data.limit, columns=cfg.data.columns))
    cache = run_path / "teacher_cache.jsonl"
    cached = set(AppendLog(cache, "key").records) if cache.exists() else set()
    return estimate(cfg.teacher, "teacher", [body for key, (_, body) in jobs.items() if key not in cached],
                    len(cached & set(jobs)))
