"""Evaluation — responses of every compared model on every benchmark, offline metrics, the judge (judge.py) when
an endpoint is configured, and one results table (JSON, Markdown in the layout of the paper's Table 1, a bar chart).

The rows are models: base (the run's student), warmup (SeqKD) and distill (SODA) of each run directory, plus any
model or file of responses named in `evaluate.models`. Responses are greedy and appended to `generations.jsonl` as
each batch finishes, keyed by (model weights, dtype, backend, max_new_tokens, the exact prompt), so an interrupted
evaluation resumes, a model shared by two runs (their base) is asked once, and only new rows or prompts cost time.
Offline metrics need no endpoint: ROUGE-L against the references (`rouge-score`, as MiniLLM scores), exact match
on short references, and response lengths.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import re
import statistics
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from .benchmarks import Benchmark, load_benchmarks, student_prompt
from .config import Config, EvaluateConfig, fingerprint, load_config, save_config
from .errors import InputError, SodaError
from .generation import Sampling, generate_transformers, generate_vllm, prompt_tokens, vllm_engine
from .judge import reference_answers, run_judge
from .manifest import RunDir
from .models import context_length, load_model, load_tokenizer, model_digest, resolve_model, use_bf16
from .pairs import length_summary
from .pipeline import resolve_data_path
from .records import AppendLog, atomic_write_bytes, atomic_write_jsonl, atomic_write_text, read_examples

METHODS = {"base": "Base", "warmup": "SeqKD (warmup)", "distill": "SODA"}


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


def table_rows(cfg: Config) -> list[Row]:
    """Base, warmup and distill of each run in `evaluate.runs` (those that exist), then `evaluate.models`."""
    rows = []
    for path in map(Path, cfg.evaluate.runs):
        if not (path / "config.yaml").is_file():
            raise SodaError(f"{path}: not a run directory (no config.yaml)")
        student = load_config(path / "config.yaml").student
        rows.append(Row(path.name, METHODS["base"], student.model, student.gguf_file, student.trust_remote_code))
        stages = RunDir(path).manifest()["stages"]
        for stage in ("warmup", "distill"):
            if stages.get(stage, {}).get("status") == "done" and (path / stage / "config.json").is_file():
                rows.append(Row(path.name, METHODS[stage], str(path / stage), None, student.trust_remote_code))
    for name, source in cfg.evaluate.models.items():
        group, _, method = name.rpartition("/") if "/" in name else (name, "", "")
        if source.endswith(".jsonl"):
            rows.append(Row(group, method, responses=resolve_data_path(source)))
        else:
            rows.append(Row(group, method, source, trust_remote_code=cfg.student.trust_remote_code))
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


def _generate(cfg: Config, evaldir: Path, row: Row, benchmarks: list[Benchmark]) -> tuple[dict[str, list[dict]], int]:
    """The row's model's response to every benchmark prompt, generating only those not in the log."""
    ev = cfg.evaluate
    model_path = resolve_model(row.model, row.gguf_file)
    bf16 = use_bf16(cfg.student.bf16)
    identity = {
        "model": model_digest(Path(model_path)) if Path(model_path).is_dir() else model_path,
        "dtype": "bfloat16" if bf16 else "float32",
        "backend": ev.backend,
        "max_new_tokens": ev.max_new_tokens,
    }
    log = AppendLog(evaldir / "generations.jsonl", "key")
    prompts, keys = {}, {}
    for b in benchmarks:
        keys[b.name] = []
        for item in b.items:
            prompt = student_prompt(item, ev.prompt_format)
            key = hashlib.sha256(json.dumps({**identity, "prompt": prompt}, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            keys[b.name].append(key)
            prompts[key] = prompt
    todo = [k for k in prompts if k not in log]
    if todo:
        tokenizer = load_tokenizer(model_path, row.trust_remote_code)
        _refuse_overlong(row, model_path, tokenizer, benchmarks, ev)
        sampling = Sampling(max_new_tokens=ev.max_new_tokens, temperature=0.0)

        def keep(results):
            log.append([{"key": todo[i], "model": row.label, "text": g.text, "finish_reason": g.finish_reason,
                         "num_tokens": g.num_tokens} for i, g in results])

        if ev.backend == "vllm":
            keep(list(enumerate(generate_vllm(vllm_engine(model_path, bf16, seed=0), [prompts[k] for k in todo], sampling))))
        elif ev.backend == "transformers":
            model = load_model(model_path, torch.bfloat16 if bf16 else torch.float32, row.trust_remote_code)
            generate_transformers(model, tokenizer, [prompts[k] for k in todo], sampling, ev.batch_size, on_batch=keep, desc=row.label)
            del model
        else:
            raise SodaError(f"evaluate.backend: unknown backend {ev.backend!r} (expected 'transformers' or 'vllm')")
    return {name: [log.records[k] for k in ks] for name, ks in keys.items()}, len(todo)


def _from_file(cfg: Config, row: Row, benchmarks: list[Benchmark]) -> dict[str, list[dict]]:
    """A response file's answers, matched to the benchmark prompts by id; a benchmark it has no ids of is left out."""
    path = Path(row.responses)
    answers = {ex.id: ex for ex in read_examples(path, want_response=True)}
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
        out[b.name] = [{"text": answers[it.id].response, "finish_reason": None, "num_tokens": None} for it in b.items]
    if not out:
        raise InputError(path, None, "id", f"answers none of the prompts of {', '.join(b.name for b in benchmarks)} "
                                           "(responses are matched to benchmark prompts by id)")
    return out


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 × 100 with Porter stemming — the `rouge-score` setting MiniLLM (and S-NI) report."""
    return 100 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def offline_metrics(references: list[str | None], responses: list[dict], exact_match_max_words: int) -> dict:
    """ROUGE-L and exact match where there is a reference (exact match only where it is short), lengths for all."""
    pairs = [(ref, r["text"]) for ref, r in zip(references, responses) if ref is not None]
    short = [(ref, pred) for ref, pred in pairs if len(ref.split()) <= exact_match_max_words]
    tokens = [r["num_tokens"] for r in responses if r["num_tokens"] is not None]
    return {
        "rouge_l": round(statistics.fmean(rouge_l(ref, pred) for ref, pred in pairs), 2) if pairs else None,
        "exact_match": {
            "score": round(100 * statistics.fmean(normalize_answer(ref) == normalize_answer(pred) for ref, pred in short), 2),
            "prompts": len(short),
        } if short else None,
        "length": {
            "words": length_summary([len(r["text"].split()) for r in responses]),
            "tokens": length_summary(tokens),
            "truncated": sum(r["finish_reason"] == "length" for r in responses),
        },
    }


def _slug(text: str) -> str:
    """A file name from a row or benchmark name: no separators, and no leading dot (so never `..`)."""
    return re.sub(r"[^\w.-]+|^\.", "_", text) or "_"


def _cell(row: dict, bench: str, *path):
    value = row["cells"].get(bench)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def markdown_table(results: dict, title: str, *path, bold_best: bool = True) -> str:
    """One metric across rows × benchmarks in Table 1's layout (the best per model in bold, as there)."""
    names = [b["name"] for b in results["benchmarks"]]
    lines = [f"### {title}", "", "| Model | Method | " + " | ".join(names) + " |", "| --- | --- |" + " ---: |" * len(names)]
    rows, previous = results["rows"], None
    for row in rows:
        cells = []
        for name in names:
            value = _cell(row, name, *path)
            peers = [_cell(r, name, *path) for r in rows if r["model"] == row["model"]]
            peers = [p for p in peers if p is not None]
            text = "—" if value is None else f"{value:.1f}"
            if bold_best and value is not None and len(peers) > 1 and value == max(peers):
                text = f"**{text}**"
            cells.append(text)
        model = row["model"] if row["model"] != previous else ""
        previous = row["model"]
        lines.append(f"| {model} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(results: dict) -> str:
    s, judge = results["settings"], results["judge"]
    parts = [
        "# Evaluation results\n",
        f"Greedy decoding, at most {s['max_new_tokens']} new tokens, prompt format `{s['prompt_format']}`"
        + (f", first {s['limit']} prompts per benchmark" if s["limit"] else "") + ".\n",
    ]
    if judge:
        parts.append(markdown_table(results, f"Judge score ({judge['model']}): S/(S+R)×100 against {results['reference']['source']}, "
                                              "50 = parity, mean over both presentation orders", "judge", "score"))
        parts.append(f"Per order in results.json. Unparseable judge replies (counted, not scored): {judge['unparseable']} "
                     f"of {judge['judgments']}. Judge tokens: {judge['usage']['prompt_tokens']} in, "
                     f"{judge['usage']['completion_tokens']} out; estimated cost: "
                     + (f"${judge['cost_usd']:.4f}" if judge["cost_usd"] is not None else "no price set") + ".\n")
    parts.append(markdown_table(results, "ROUGE-L (F1 × 100, against the benchmarks' references)", "rouge_l"))
    parts.append(markdown_table(results, f"Exact match (%, on references of at most {s['exact_match_max_words']} words)",
                                "exact_match", "score"))
    parts.append(markdown_table(results, "Mean response length (words)", "length", "words", "mean", bold_best=False))
    parts.append("### Benchmarks\n\n" + "\n".join(
        f"- **{b['name']}** ({b['prompts']} prompts, `{b['path']}`){': ' + b['note'] if b['note'] else ''}"
        for b in results["benchmarks"]) + "\n")
    return "\n".join(parts)


def render_chart(results: dict) -> bytes:
    """A grouped bar chart per metric (judge score when there is one, ROUGE-L): benchmarks × rows."""
    from matplotlib.figure import Figure  # no pyplot: no global state; PNGs are drawn by Agg

    names = [b["name"] for b in results["benchmarks"]]
    metrics = [("Judge score (50 = parity)", ("judge", "score"))] if results["judge"] else []
    metrics.append(("ROUGE-L", ("rouge_l",)))
    rows = results["rows"]
    fig = Figure(figsize=(max(6.0, 1.6 * len(names) * len(metrics) + 2), 4.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    width = 0.8 / len(rows)
    for ax, (title, path) in zip(axes[0], metrics):
        for k, row in enumerate(rows):
            values = [_cell(row, name, *path) for name in names]
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(names))]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=f"{row['model']} {row['method']}".strip())
        if path[0] == "judge":
            ax.axhline(50, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def prepare_evaluation(cfg: Config, out: str | Path) -> RunDir:
    """Open the evaluation directory and record the resolved config in it (run directories made absolute)."""
    cfg.evaluate = dataclasses.replace(cfg.evaluate, runs=list(dict.fromkeys(str(Path(r).resolve()) for r in cfg.evaluate.runs)))
    evaldir = RunDir(out)
    save_config(cfg, evaldir.file("config.yaml"))
    return evaldir


def run_evaluate(cfg: Config, evaldir: RunDir) -> dict:
    """Evaluate every row on every benchmark; write results.json, results.md, results.png (and per-row responses
    and judgments) into `evaldir`, and return the results."""
    ev = cfg.evaluate
    rows = table_rows(cfg)
    benchmarks = load_benchmarks(ev)
    with evaldir.stage("evaluate", fingerprint(ev)) as info:
        responses, generated = {}, 0
        for row in rows:
            if row.responses:
                per_bench = _from_file(cfg, row, benchmarks)
            else:
                per_bench, n = _generate(cfg, evaldir.path, row, benchmarks)
                generated += n
            for b in benchmarks:
                if b.name in per_bench:
                    responses[row.label, b.name] = per_bench[b.name]
                    atomic_write_jsonl(evaldir.file(f"responses/{_slug(row.label)}/{_slug(b.name)}.jsonl"), [
                        {"id": it.id, "messages": it.prompt + [{"role": "assistant", "content": r["text"]}],
                         "finish_reason": r["finish_reason"], "num_tokens": r["num_tokens"]}
                        for it, r in zip(b.items, per_bench[b.name])
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
                atomic_write_jsonl(evaldir.file(f"judgments/{_slug(label)}/{_slug(bench)}.jsonl"), result["details"])
        results = {
            "settings": {
                "prompt_format": ev.prompt_format, "decoding": "greedy", "max_new_tokens": ev.max_new_tokens,
                "backend": ev.backend, "limit": ev.limit, "exact_match_max_words": ev.exact_match_max_words,
            },
            "benchmarks": [{"name": b.name, "path": b.path, "prompts": len(b.items), "note": b.note} for b in benchmarks],
            "reference": reference_info,
            "judge": judge_totals,
            "rows": [
                {
                    "model": row.group, "method": row.method, "source": row.responses or row.model,
                    "cells": {
                        b.name: {
                            "prompts": len(b.items),
                            **offline_metrics([it.reference for it in b.items], responses[row.label, b.name], ev.exact_match_max_words),
                            "judge": judged[row.label, b.name]["summary"] if (row.label, b.name) in judged else None,
                        }
                        for b in benchmarks if (row.label, b.name) in responses
                    },
                }
                for row in rows
            ],
        }
        atomic_write_text(evaldir.file("results.json"), json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(evaldir.file("results.md"), render_markdown(results))
        atomic_write_bytes(evaldir.file("results.png"), render_chart(results))
        info.update(rows=len(rows), benchmarks=len(benchmarks), generated=generated,
                    judge_requests=judge_totals["requests_this_run"] if judge_totals else 0)
    return results
