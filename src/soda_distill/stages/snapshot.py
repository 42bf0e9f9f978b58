"""Stage 2 — the untouched student q0 answers every training prompt once: y_s ~ q0(·|x).

One batched inference pass. Finished batches go to an append-only log as they complete, so a killed run
resumes where it stopped and produces the same records an uninterrupted run would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..errors import SodaError
from ..generation import Sampling, generate_transformers, generate_vllm, prompt_tokens, vllm_engine
from ..manifest import RunDir, StageResult
from ..models import context_length, load_model, load_tokenizer, resolve_model, use_bf16
from ..pipeline import execute
from ..append_log import AppendLog
from ..records import atomic_write_jsonl, read_examples


@dataclass
class SnapshotResult(StageResult):
    records: int
    skipped_too_long: int  # prompts with no room for snapshot.max_new_tokens in q0's context
    truncated: int  # answers cut at snapshot.max_new_tokens
    mean_tokens: float
    generated_tokens_per_s: float | None  # None: every answer came from the log of an earlier piece
    backend: str
    dtype: str
    sampling: dict  # the decoding rule (generation.Sampling.describe)


def snapshot_body(cfg: Config, run: RunDir, inputs: dict[str, Path]) -> SnapshotResult:
    """Write `snapshot.jsonl`: one `messages` record per prompt, ending with q0's own answer. Each batch goes to
    `snapshot.partial.jsonl` as it finishes (the stage's scratch), so a killed run resumes where it stopped."""
    s = cfg.snapshot
    teacher_path = inputs["teacher"]
    examples = read_examples(teacher_path, want_response=True)
    sampling = Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    log = AppendLog(run.file("snapshot.partial.jsonl"), "id")
    model_path = resolve_model(cfg.student.model, cfg.student.gguf_file)
    bf16 = use_bf16(cfg.student.bf16)
    tokenizer = load_tokenizer(model_path, cfg.student.trust_remote_code)
    # A prompt that leaves no room for max_new_tokens in q0's context is skipped and counted: its answer could
    # not be generated in full (pairs then drops it as no_student_response).
    context = context_length(model_path, cfg.student.trust_remote_code)
    lengths = prompt_tokens(tokenizer, [ex.prompt for ex in examples])
    fits = [context is None or n + s.max_new_tokens <= context for n in lengths]
    if not any(fits):
        raise SodaError(f"{teacher_path}: no prompt leaves room for snapshot.max_new_tokens ({s.max_new_tokens}) "
                        f"in the student's context of {context} tokens")
    examples = [ex for ex, ok in zip(examples, fits) if ok]
    todo = [ex for ex in examples if ex.id not in log]
    start, new_tokens = time.perf_counter(), 0

    def keep(results):
        nonlocal new_tokens
        new_tokens += sum(g.num_tokens for _, g in results)
        log.append([
            {"id": examples[i].id, "messages": examples[i].prompt + [{"role": "assistant", "content": g.text}],
             "finish_reason": g.finish_reason, "num_tokens": g.num_tokens}
            for i, g in results
        ])

    if todo and s.backend == "vllm":
        index = {ex.id: i for i, ex in enumerate(examples)}
        results = generate_vllm(vllm_engine(model_path, bf16, s.seed), [ex.prompt for ex in todo], sampling,
                                [index[ex.id] for ex in todo])
        keep([(index[ex.id], g) for ex, g in zip(todo, results)])
    elif todo and s.backend == "transformers":
        model = load_model(model_path, torch.bfloat16 if bf16 else torch.float32, cfg.student.trust_remote_code)
        generate_transformers(
            model, tokenizer, [ex.prompt for ex in examples], sampling, s.batch_size,
            done=lambda i: examples[i].id in log, on_batch=keep, desc="snapshot",
        )
        del model
    elif todo:
        raise SodaError(f"snapshot.backend: unknown backend {s.backend!r} (expected 'transformers' or 'vllm')")
    records = [log.records[ex.id] for ex in examples]
    atomic_write_jsonl(run.output("snapshot"), records)
    elapsed = time.perf_counter() - start
    return SnapshotResult(
        records=len(records),
        skipped_too_long=fits.count(False),
        truncated=sum(r["finish_reason"] == "length" for r in records),
        mean_tokens=round(sum(r["num_tokens"] for r in records) / len(records), 1),
        generated_tokens_per_s=round(new_tokens / elapsed, 1) if new_tokens else None,
        backend=s.backend,
        dtype="bfloat16" if bf16 else "float32",
        sampling=sampling.describe(),
    )


def run_snapshot(cfg: Config, run: RunDir) -> Path:
    """The snapshot stage (pipeline.execute): `snapshot.jsonl`, unless finished."""
    return execute("snapshot", cfg, run)
