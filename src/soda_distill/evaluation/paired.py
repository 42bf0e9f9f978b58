"""Paired comparisons of an evaluation's rows: each row against its baselines on the same prompts (a paired bootstrap
over prompts) and, where several runs (seeds) have a method, across them (runs and prompts resampled); every
difference also at equal answer length. And the per-prompt figures they pair: ROUGE-L, reference NLL, the held-out
preference margin and accuracy, repetition and cut answers, the judge's score."""

from __future__ import annotations

import re
import statistics

from ..registry import METHODS
from ..stats import paired_difference, seeded_paired_difference
from .benchmarks import Benchmark
from .judge import ORDERS
from .metrics import degeneration_per_prompt, rouge_l_per_prompt

# What each row is compared with, on the same prompts: SODA too, for GAD (and any further method) against it
BASELINES = ("base", "seqkd", "warmup", "soda")


def preference_margins(responses: list[dict]) -> list[float | None]:
    """Per prompt, how much more likely per token the model finds the reference answer than q0's own greedy answer:
    NLL(q0's answer) − NLL(reference), in nats. Its change from Base is DPO's implicit reward margin per token, with
    Base as the reference model, on prompts no model trained on."""
    return [None if r["reference_nll"] is None or r["q0_answer_nll"] is None else r["q0_answer_nll"] - r["reference_nll"]
            for r in responses]


def ranked(responses: list[dict]) -> list[float | None]:
    """Per prompt, 100 where the model finds the reference answer more likely per token than q0's own greedy
    answer, else 0: the held-out preference accuracy's terms."""
    return [None if m is None else 100.0 * (m > 0) for m in preference_margins(responses)]


def per_prompt(label: str, bench: Benchmark, responses: dict, judged: dict) -> dict[str, list]:
    """A row's per-prompt ROUGE-L, reference NLL, preference margin and accuracy, repetition, cut answers and judge
    score (mean of both orders) on one benchmark."""
    answers = responses[label, bench.name]
    judge = [None] * len(bench.items)
    if (label, bench.name) in judged:
        by_id = {d["id"]: d for d in judged[label, bench.name]["details"]}
        for i, it in enumerate(bench.items):
            shares = [100 * o["student"] / (o["student"] + o["reference"]) for o in
                      (by_id[it.id][order] for order in ORDERS if it.id in by_id) if o["student"] is not None]
            judge[i] = statistics.fmean(shares) if shares else None
    return {"rouge_l": rouge_l_per_prompt([it.reference for it in bench.items], answers),
            "reference_nll": [r["reference_nll"] for r in answers],
            "preference_margin": preference_margins(answers), "preference_accuracy": ranked(answers),
            **degeneration_per_prompt(answers), "judge": judge}


def baselines_of(method: str, others: list[str] = (), paired_with: dict[str, list[str]] | None = None) -> list[str]:
    """The baselines a row of `method` is compared with: those before it in the registry (Base, q_w, SeqKD, SODA
    for GAD; none for Base), every one for a method outside it (a model or file of `evaluate.models`), and of
    `others`, the rows of the same variant before it (`Warmup (q_w, NAME)` for `SODA (NAME)`: a variant's own start)
    and those `evaluate.paired_with` names for it."""
    columns = [m.column for m in METHODS.values()]
    baselines = [METHODS[name].column for name in BASELINES]
    mine = [b for b in baselines if method not in columns or columns.index(b) < columns.index(method)]
    mine += [other for other in others if _variant_order(other, method)]
    return mine + [other for other in (paired_with or {}).get(method, []) if other in others and other not in mine]


def _variant_order(earlier: str, later: str) -> bool:
    """Whether both are rows of one variant (`Label (NAME)` or `Label (detail, NAME)`, outside the registry) and
    `earlier`'s method comes first in the registry."""
    labels = [m.label for m in METHODS.values()]
    columns = [m.column for m in METHODS.values()]
    parts = [re.fullmatch(r"(.+?) \((?:.*, )?([^,()]+)\)", m) for m in (earlier, later)]
    if any(p is None or p[1] not in labels for p in parts) or {earlier, later} & set(columns):
        return False
    (label_a, name_a), (label_b, name_b) = (p.groups() for p in parts)
    return name_a == name_b and labels.index(label_a) < labels.index(label_b)


def _words(label: str, bench: Benchmark, responses: dict) -> list[int]:
    """Each answer's length in words: what the length-controlled differences are fitted against."""
    return [len(r["text"].split()) for r in responses[label, bench.name]]


def paired(row, rows: list, bench: Benchmark, responses: dict, judged: dict, paired_with: dict) -> dict:
    """This row against the baselines of its own group (`baselines_of`) on the same prompts: mean differences
    (this − that) with paired bootstrap 95% intervals, and each at equal answer length (`length_controlled`). For NLL
    lower is better, so a negative difference is an improvement."""
    baselines = baselines_of(row.method, [r.method for r in rows if r.group == row.group], paired_with)
    out = {}
    for other in rows:
        if other.group != row.group or other.method not in baselines or other is row or \
                (other.label, bench.name) not in responses:
            continue
        mine, theirs = (per_prompt(r.label, bench, responses, judged) for r in (row, other))
        lengths = tuple(_words(r.label, bench, responses) for r in (row, other))
        out[f"vs {other.method}"] = {metric: paired_difference(mine[metric], theirs[metric], lengths=lengths)
                                     for metric in mine}
    return out


def across_runs(rows: list, benchmarks: list[Benchmark], responses: dict, judged: dict,
                paired_with: dict) -> list[dict]:
    """Each method that several runs have (one per seed, say) against the baselines those runs have, on the same
    prompts: the mean difference over runs and prompts with a two-level bootstrap interval (runs and prompts
    resampled), and each run's own difference."""
    groups = list(dict.fromkeys(r.group for r in rows))
    by = {(r.group, r.method): r for r in rows}
    out = []
    for method in dict.fromkeys(r.method for r in rows):
        runs = [g for g in groups if (g, method) in by]
        if len(runs) < 2:
            continue
        entry = {"method": method, "runs": runs, "cells": {}}
        for b in benchmarks:
            for baseline in baselines_of(method, list(dict.fromkeys(r.method for r in rows)), paired_with):
                if not all((g, baseline) in by and (by[g, baseline].label, b.name) in responses
                                                 and (by[g, method].label, b.name) in responses for g in runs):
                    continue
                mine = [per_prompt(by[g, method].label, b, responses, judged) for g in runs]
                theirs = [per_prompt(by[g, baseline].label, b, responses, judged) for g in runs]
                lengths = tuple([_words(by[g, m].label, b, responses) for g in runs] for m in (method, baseline))
                entry["cells"].setdefault(b.name, {})[f"vs {baseline}"] = {
                    metric: seeded_paired_difference([m[metric] for m in mine], [t[metric] for t in theirs], lengths=lengths)
                    for metric in mine[0]}
        if entry["cells"]:
            out.append(entry)
    return out
