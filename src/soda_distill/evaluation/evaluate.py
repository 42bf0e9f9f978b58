"""Evaluation — responses of every compared model on every benchmark, offline metrics, the judge (judge.py) when
an endpoint is configured, and one results table (JSON, Markdown in the layout of the paper's Table 1, a bar chart).

The rows are models: Base (the run's student) and every trained method of each run directory whose stage finished
(registry.METHODS: SeqKD, SODA, GAD, ...), plus any model or file of responses named in `evaluate.models`.
Responses are greedy and appended to `generations.jsonl` as each batch finishes, keyed by (model weights, dtype, backend, max_new_tokens, the exact prompt), so an interrupted
evaluation resumes, a model shared by two runs (their base) is asked once, and only new rows or prompts cost time.
Offline metrics (metrics.py) need no endpoint; the table's Markdown is table.py's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, EvaluateConfig, fingerprint, load_config, save_config
from ..errors import InputError, SodaError
from ..generation import Sampling, generate_transformers, generate_vllm, prompt_tokens, vllm_engine
from ..manifest import RunDir
from ..model_card import add_evaluation
from ..models import context_length, load_model, load_tokenizer, model_digest, resolve_model, use_bf16
from ..plots import plot_results
from ..append_log import AppendLog
from ..records import (atomic_write_jsonl, atomic_write_text, is_jsonl, read_examples, read_jsonl, resolve_data_path,
                       shown_data_path)
from ..registry import METHODS, methods_named
from ..stats import bootstrap_ci
from ..tracking import evaluation_scalars, log_scalars
from .benchmarks import Benchmark, load_benchmarks, student_prompt
from .judge import plan_requests, reference_answers, run_judge
from .metrics import offline_metrics, rouge_l_per_prompt
from .paired import across_runs, paired, preference_margins, ranked
from .nll import reference_nll, scoring_dtype
from .table import render_markdown

@dataclass
class Row:
    """One row of the table: a model to generate with, or a file of responses."""

    group: str  # the "Model" column
    method: str  # the "Method" column
    model: str | None = None  # as `student.model` takes it
    gguf_file: str | None = None
    trust_remote_code: bool = False
    responses: str | None = None  # a JSONL of responses instead of a model

    @property
    def label(self) -> str:
        return f"{self.group}/{self.method}" if self.method else self.group


def _table_place(row: Row) -> tuple:
    """Rows grouped by model in natural order (seed-9 before seed-10), each group's methods in the registry's order
    (a variant `SODA (w3)` beside SODA, what no method names after them), as given where these tie."""
    families = [m.column.split(" (")[0] for m in METHODS.values()]
    family = row.method.split(" (")[0]
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", row.group)]
    return natural, families.index(family) if family in families else len(families)


def table_rows(cfg: Config) -> list[Row]:
    """Base and the finished trained methods of each run in `evaluate.runs` (those in `evaluate.methods`, when
    set), then `evaluate.models`; grouped and ordered by `_table_place`."""
    rows = []
    wanted = set(m.name for m in methods_named(cfg.evaluate.methods)) if cfg.evaluate.methods is not None else None
    paths = list(map(Path, cfg.evaluate.runs))
    names = [p.name for p in paths]
    for path in paths:
        if not (path / "config.yaml").is_file():
            raise SodaError(f"{path}: not a run directory (no config.yaml)")
        student = load_config(path / "config.yaml").student
        group = path.name if names.count(path.name) == 1 else f"{path.parent.name}/{path.name}"  # compare's seed-42s
        if wanted is None or "base" in wanted:
            rows.append(Row(group, METHODS["base"].column, student.model, student.gguf_file, student.trust_remote_code))
        for method, model in RunDir(path).trained_models():
            if wanted is None or method.name in wanted:
                rows.append(Row(group, method.column, str(model), None, student.trust_remote_code))
    for name, source in cfg.evaluate.models.items():
        group, _, method = name.rpartition("/") if "/" in name else (name, "", "")
        if is_jsonl(source):
            rows.append(Row(group, method, responses=resolve_data_path(source)))
        else:
            rows.append(Row(group, method, source, trust_remote_code=cfg.student.trust_remote_code))
    rows.sort(key=_table_place)
    labels = [r.label for r in rows]
    if not rows:
        raise SodaError("nothing to evaluate: give run directories, or models in evaluate.models")
    if len(set(labels)) < len(labels):
        raise SodaError(f"two rows share a name ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))}); "
                        "give distinct run directory names or evaluate.models keys")
    return rows


def _refuse_overlong(row: Row, model_path: str, tokenizer, benchmarks: list[Benchmark], ev: EvaluateConfig) -> None:
    """A prompt with no room for max_new_tokens in the model's context is an error, not a skip: a benchmark's score
    must be over all of its prompts."""
    context = context_length(model_path, row.trust_remote_code)
    if context is None:
        return
    for b in benchmarks:
        for item, n in zip(b.items, prompt_tokens(tokenizer, [student_prompt(it, ev.prompt_format) for it in b.items])):
            if n + ev.max_new_tokens > context:
                raise InputError(b.path, item.line, "messages", f"the prompt is {n} tokens: with evaluate.max_new_tokens "
                                 f"({ev.max_new_tokens}) it does not fit {row.label}'s context of {context} tokens")


def _key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _generate(cfg: Config, evaldir: Path, row: Row, benchmarks: list[Benchmark],
              q0: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], int]:
    """The row's model's response to every benchmark prompt, and under it the NLL of each reference answer (None
    without one) and of q0's answer (`q0`: its run's Base row's responses); only what is not in the logs yet is
    computed."""
    ev = cfg.evaluate
    model_path = resolve_model(row.model, row.gguf_file)
    bf16 = use_bf16(cfg.student.bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32  # the answers'
    nll_dtype = scoring_dtype(cfg)
    identity = {
        "model": model_digest(Path(model_path)) if Path(model_path).is_dir() else model_path,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": ev.backend,
        "max_new_tokens": ev.max_new_tokens,
    }
    log, nll_log = AppendLog(evaldir / "generations.jsonl", "key"), AppendLog(evaldir / "nll.jsonl", "key")
    prompts, keys, scored, nll_keys = {}, {}, {}, {}
    for b in benchmarks:
        keys[b.name], nll_keys[b.name] = [], []
        for item in b.items:
            prompt = student_prompt(item, ev.prompt_format)
            key = _key({**identity, "prompt": prompt})
            keys[b.name].append(key)
            prompts[key] = prompt
            per_answer = []
            for answer, open_end in ((item.reference, False), *_q0_answer(q0, b.name, len(keys[b.name]) - 1)):
                nll_key = _key({"model": identity["model"], "dtype": str(nll_dtype).removeprefix("torch."), "prompt": prompt,
                                "reference": answer, **({"open_end": True} if open_end else {})})
                per_answer.append(nll_key)
                scored[nll_key] = (prompt, answer, open_end)
            nll_keys[b.name].append(per_answer)
    todo = [k for k in prompts if k not in log]
    nll_todo = [k for k in scored if k not in nll_log]
    model = None
    if todo or nll_todo:
        tokenizer = load_tokenizer(model_path, row.trust_remote_code)
        _refuse_overlong(row, model_path, tokenizer, benchmarks, ev)
    if nll_todo:
        model = load_model(model_path, nll_dtype, row.trust_remote_code)
    for start in range(0, len(nll_todo), 32):  # appended a chunk at a time: a kill loses at most one chunk
        chunk = nll_todo[start : start + 32]
        chunk_prompts, answers, open_ends = (list(column) for column in zip(*(scored[k] for k in chunk)))
        values = reference_nll(model, tokenizer, chunk_prompts, answers, open_ends=open_ends,
                               desc=f"{row.label} NLL {start // 32 + 1}/{-(-len(nll_todo) // 32)}")
        nll_log.append([{"key": k, "model": row.label, "nll": v} for k, v in zip(chunk, values)])
    if todo:
        sampling = Sampling(max_new_tokens=ev.max_new_tokens)  # greedy
        if ev.backend == "transformers" and (model is None or nll_dtype != dtype):
            model = None  # the scoring model's memory back first
            model = load_model(model_path, dtype, row.trust_remote_code)

        def keep(results):
            log.append([{"key": todo[i], "model": row.label, "text": g.text, "finish_reason": g.finish_reason,
                         "num_tokens": g.num_tokens} for i, g in results])

        if ev.backend == "vllm":
            keep(list(enumerate(generate_vllm(vllm_engine(model_path, bf16, seed=0), [prompts[k] for k in todo], sampling))))
        elif ev.backend == "transformers":
            generate_transformers(model, tokenizer, [prompts[k] for k in todo], sampling, ev.batch_size, on_batch=keep, desc=row.label)
        else:
            raise SodaError(f"evaluate.backend: unknown backend {ev.backend!r} (expected 'transformers' or 'vllm')")
    del model
    nll = lambda keys: [nll_log.records[k]["nll"] for k in keys] + [None]  # [reference, q0's answer (or None)]
    return {name: [{**log.records[k], "reference_nll": nll(n)[0], "q0_answer_nll": nll(n)[1]}
                   for k, n in zip(ks, nll_keys[name])] for name, ks in keys.items()}, len(todo)


def _q0_answer(q0: dict[str, list[dict]], bench: str, i: int) -> list[tuple[str, bool]]:
    """q0's answer to a benchmark's i-th prompt, and whether it was cut at max_new_tokens; [] when there is none."""
    answer = q0.get(bench, [None] * (i + 1))[i]
    return [] if answer is None or not answer["text"].strip() else [(answer["text"], answer["finish_reason"] == "length")]


def _from_file(cfg: Config, row: Row, benchmarks: list[Benchmark]) -> dict[str, list[dict]]:
    """A response file's answers, matched to the benchmark prompts by id; a benchmark it has no ids of is left out.
    The figures an evaluation wrote beside each answer (`responses/ROW/BENCH.jsonl`: the NLLs, finish reason, token
    count) are kept, so a row evaluated once — in another session, say — joins a table without its model; its
    reference NLLs only on a benchmark whose references they were scored on (`reference_digest`): another reference
    set for the same prompts has none."""
    path = Path(row.responses)
    examples = read_examples(path, want_response=True)
    answers = {ex.id: ex for ex in examples}
    # each answer's record by the id its example goes by (a record without an `id`: its prompt's)
    figures = {ex.id: obj for ex, (_, obj) in zip(examples, read_jsonl(path), strict=True)}
    out = {}
    for b in benchmarks:
        found = [it for it in b.items if it.id in answers]
        if not found:
            continue
        if len(found) < len(b.items):
            missing = [it.id for it in b.items if it.id not in answers]
            raise InputError(path, None, "id", f"answers {len(found)} of the {len(b.items)} {b.name} prompts "
                                               f"(missing: {', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})")
        for it in found:
            if answers[it.id].prompt not in (it.prompt, student_prompt(it, cfg.evaluate.prompt_format)):
                raise InputError(path, None, "messages", f"record {it.id!r}: its prompt differs from {b.name}'s prompt of that id")
        out[b.name] = [{"text": answers[it.id].response,
                        **{k: _figure(path, figures[it.id], k) for k in ("finish_reason", "num_tokens", "reference_nll", "q0_answer_nll")}}
                       for it in b.items]
        # reference NLLs only if scored on these references, all of them (a mean over a few would pass for the whole)
        if any(figures[it.id].get("reference_digest") != reference_digest(it.reference) for it in b.items):
            for answer in out[b.name]:
                answer["reference_nll"] = None
    if not out:
        raise InputError(path, None, "id", f"answers none of the prompts of {', '.join(b.name for b in benchmarks)} "
                                           "(responses are matched to benchmark prompts by id)")
    return out


def reference_digest(reference: str | None) -> str | None:
    """Which reference answer a response record's reference NLL was scored against."""
    return None if reference is None else hashlib.sha256(reference.encode()).hexdigest()[:16]


def _figure(path: Path, record: dict, key: str):
    """A figure of a response record (None where absent), checked for its kind."""
    value = record.get(key)
    kind = str if key == "finish_reason" else (int, float)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise InputError(path, None, key, f"record {record.get('id')!r}: expected {'a string' if kind is str else 'a number'}, got {value!r}")
    return value


def slug(text: str) -> str:
    """A file name from a row or benchmark name: no separators, and no leading dot (so never `..`)."""
    return re.sub(r"[^\w.-]+|^\.", "_", text) or "_"


def _nll(responses: list[dict]) -> dict:
    values = [r["reference_nll"] for r in responses if r["reference_nll"] is not None]
    margins = [m for m in preference_margins(responses) if m is not None]
    wins = [r for r in ranked(responses) if r is not None]
    return {"reference_nll": round(statistics.fmean(values), 4) if values else None,
            "reference_nll_ci95": bootstrap_ci(values),
            "preference_margin": round(statistics.fmean(margins), 4) if margins else None,
            "preference_margin_ci95": bootstrap_ci(margins),
            "preference_accuracy": round(statistics.fmean(wins), 2) if wins else None,
            "preference_accuracy_ci95": bootstrap_ci(wins)}


def prepare_evaluation(cfg: Config, out: str | Path) -> RunDir:
    """Open the evaluation directory and record the resolved config in it (run directories made absolute)."""
    cfg.evaluate = dataclasses.replace(cfg.evaluate, runs=list(dict.fromkeys(str(Path(r).resolve()) for r in cfg.evaluate.runs)))
    evaldir = RunDir(out).lock()
    save_config(cfg, evaldir.file("config.yaml"))
    return evaldir


def plan_evaluation(cfg: Config, out: str | Path, rows: int | None = None) -> list[str]:
    """--dry-run: the rows and benchmarks an evaluation into `out` would cover, and what it would ask endpoints for;
    nothing generated, written or sent. `rows`: how many (compare's, whose runs may not exist yet); else those of
    evaluate.runs and evaluate.models."""
    ev = cfg.evaluate
    labels = [r.label for r in table_rows(cfg)] if rows is None else []
    benchmarks = load_benchmarks(ev)
    count = rows if rows is not None else len(labels)
    shown = f" ({', '.join(labels)})" if labels else ""
    return [f"evaluate: {count} rows{shown} on " + ", ".join(f"{b.name} ({len(b.items)} prompts)" for b in benchmarks)
            + f", greedy answers of at most {ev.max_new_tokens} tokens", *plan_requests(ev, Path(out), benchmarks, count)]


def run_evaluate(cfg: Config, evaldir: RunDir) -> dict:
    """Evaluate every row on every benchmark; write results.json, results.md, results.png (and per-row responses
    and judgments) into `evaldir`, and return the results."""
    ev = cfg.evaluate
    rows = table_rows(cfg)
    methods = {r.method for r in rows}
    if unknown := [m for method, others in ev.paired_with.items() for m in [method, *others] if m not in methods]:
        raise SodaError(f"evaluate.paired_with: no row is {unknown[0]!r} (the rows: {', '.join(sorted(methods))})")
    benchmarks = load_benchmarks(ev)
    with evaldir.stage("evaluate", fingerprint(ev)) as info:
        responses, generated = {}, 0
        for row in sorted(rows, key=lambda r: r.method != METHODS["base"].column):  # every Base first, file or model
            if row.responses:
                per_bench = _from_file(cfg, row, benchmarks)
            else:
                # q0 is the group's Base row, a model or a file of its answers; a model's own answers are known only
                # once generated, so a second pass scores them (the answers come from the log)
                base = next((r for r in rows if r.group == row.group and r.method == METHODS["base"].column), None)
                q0 = {b.name: responses[base.label, b.name] for b in benchmarks if (base.label, b.name) in responses} \
                    if base is not None and base is not row else {}
                per_bench, n = _generate(cfg, evaldir.path, row, benchmarks, q0)
                if base is row:
                    per_bench, _ = _generate(cfg, evaldir.path, row, benchmarks, per_bench)
                generated += n
            for b in benchmarks:
                if b.name in per_bench:
                    responses[row.label, b.name] = per_bench[b.name]
                    atomic_write_jsonl(evaldir.file(f"responses/{slug(row.label)}/{slug(b.name)}.jsonl"), [
                        {"id": it.id, "messages": it.prompt + [{"role": "assistant", "content": r["text"]}],
                         "finish_reason": r["finish_reason"], "num_tokens": r["num_tokens"],
                         "rouge_l": score, "reference_nll": r["reference_nll"], "q0_answer_nll": r["q0_answer_nll"],
                         "reference_digest": reference_digest(it.reference)}
                        for it, r, score in zip(b.items, per_bench[b.name],
                                                rouge_l_per_prompt([it.reference for it in b.items], per_bench[b.name]))
                    ])
        judged, judge_totals, reference_info = {}, None, None
        if ev.judge.base_url:
            references, reference_info = reference_answers(ev, evaldir.path, benchmarks)
            items = {b.name: b.items for b in benchmarks}
            cells = {
                cell: [(it, r["text"], ref) for it, r, ref in zip(items[cell[1]], answers, references[cell[1]]) if ref is not None]
                for cell, answers in responses.items()
            }
            judged, judge_totals = run_judge(ev, evaldir.path, {c: t for c, t in cells.items() if t})
            for (label, bench), result in judged.items():
                atomic_write_jsonl(evaldir.file(f"judgments/{slug(label)}/{slug(bench)}.jsonl"), result["details"])
        results = {
            "settings": {
                "preset": ev.preset, "prompt_format": ev.prompt_format, "decoding": "greedy", "max_new_tokens": ev.max_new_tokens,
                "sampling": Sampling(max_new_tokens=ev.max_new_tokens).describe(),
                "backend": ev.backend, "limit": ev.limit, "exact_match_max_words": ev.exact_match_max_words,
            },
            "benchmarks": [{"name": b.name, "path": shown_data_path(b.path), "prompts": len(b.items), "note": b.note} for b in benchmarks],
            "reference": reference_info,
            "judge": judge_totals,
            "rows": [
                {
                    "model": row.group, "method": row.method, "source": row.responses or row.model,
                    "cells": {
                        b.name: {
                            "prompts": len(b.items),
                            **offline_metrics([it.reference for it in b.items], responses[row.label, b.name], ev.exact_match_max_words),
                            **_nll(responses[row.label, b.name]),
                            "judge": judged[row.label, b.name]["summary"] if (row.label, b.name) in judged else None,
                            "paired": paired(row, rows, b, responses, judged, ev.paired_with),
                        }
                        for b in benchmarks if (row.label, b.name) in responses
                    },
                }
                for row in rows
            ],
            "across_runs": across_runs(rows, benchmarks, responses, judged, ev.paired_with),
        }
        atomic_write_text(evaldir.file("results.json"), json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        for row, figures in zip(rows, results["rows"]):  # a trained model's card shows its figures on the Hub
            if row.model and not row.responses:
                add_evaluation(Path(row.model), f"{row.group} {row.method}", figures["cells"])
        atomic_write_text(evaldir.file("results.md"), render_markdown(results))
        plot_results(results, evaldir.file("results.png"))
        log_scalars(cfg, evaldir.path / "evaluate", evaluation_scalars(results))
        info.update(rows=len(rows), benchmarks=len(benchmarks), generated=generated,
                    judge_requests=judge_totals["requests_this_run"] if judge_totals else 0)
    return results
