"""Offline metrics of responses, no endpoint needed: ROUGE-L against the references (`rouge-score`, as MiniLLM
scores), exact match on short references, and response lengths."""

from __future__ import annotations

import functools
import re
import statistics
import string

from ..stats import length_summary


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
