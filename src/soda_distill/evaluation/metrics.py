"""Offline metrics of responses, no endpoint needed: ROUGE-L against the references (`rouge-score`, as MiniLLM
scores), exact match on short references, response lengths, and two signs of degenerate answers: repetition
(seq-rep-4) and answers cut at the token limit."""

from __future__ import annotations

import functools
import re
import statistics
import string

from ..stats import bootstrap_ci, length_summary


@functools.cache
def _rouge_tokenizer():
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@functools.lru_cache(maxsize=1 << 17)  # a row's answers are scored again in each of its paired comparisons
def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 × 100 with Porter stemming — the `rouge-score` setting MiniLLM (and S-NI) report: rouge-score's
    tokens, their longest common subsequence by rapidfuzz (rouge-score's own table in Python took 0.1 s a pair of
    500-word answers), its F1 as rouge-score computes it."""
    from rapidfuzz.distance import LCSseq

    target, predicted = (_rouge_tokenizer().tokenize(text) for text in (reference, prediction))
    if not target or not predicted:
        return 0.0
    common = LCSseq.similarity(target, predicted)
    precision, recall = common / len(predicted), common / len(target)
    return 100 * 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def rouge_l_per_prompt(references: list[str | None], responses: list[dict]) -> list[float | None]:
    return [None if ref is None else rouge_l(ref, r["text"]) for ref, r in zip(references, responses)]


REPEAT_N = 4  # seq-rep-4, as Welleck et al. (2019, unlikelihood training) measure a greedy decoder's loops


def repetition(text: str) -> float:
    """seq-rep-4 × 100: the share of the answer's word 4-grams that repeat an earlier one (0 for an answer that never
    repeats itself, near 100 for one stuck in a loop; 0 below 4 words)."""
    words = text.split()
    grams = [tuple(words[i : i + REPEAT_N]) for i in range(len(words) - REPEAT_N + 1)]
    return 100 * (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def degeneration_per_prompt(responses: list[dict]) -> dict[str, list[float]]:
    """Per answer, its repetition (seq-rep-4 × 100) and 100 where it was cut at max_new_tokens, else 0 (None where a
    response file does not say): a greedy small model's typical failure, which length and ROUGE-L hide."""
    return {"repetition": [repetition(r["text"]) for r in responses],
            "cut": [None if r["finish_reason"] is None else 100.0 * (r["finish_reason"] == "length") for r in responses]}


def offline_metrics(references: list[str | None], responses: list[dict], exact_match_max_words: int) -> dict:
    """ROUGE-L (with its bootstrap 95% interval over prompts) and exact match where there is a reference (exact match
    only where it is short); lengths, repetition and the share of cut answers (each with its interval) for all."""
    pairs = [(ref, r["text"]) for ref, r in zip(references, responses) if ref is not None]
    short = [(ref, pred) for ref, pred in pairs if len(ref.split()) <= exact_match_max_words]
    tokens = [r["num_tokens"] for r in responses if r["num_tokens"] is not None]
    scores = [s for s in rouge_l_per_prompt(references, responses) if s is not None]
    degeneration = {}
    for name, values in degeneration_per_prompt(responses).items():
        if known := [v for v in values if v is not None]:
            degeneration.update({name: round(statistics.fmean(known), 2), f"{name}_ci95": bootstrap_ci(known)})
    return {
        "rouge_l": round(statistics.fmean(scores), 2) if scores else None,
        "rouge_l_ci95": bootstrap_ci(scores),
        "exact_match": {
            "score": round(100 * statistics.fmean(normalize_answer(ref) == normalize_answer(pred) for ref, pred in short), 2),
            "prompts": len(short),
        } if short else None,
        "length": {
            "words": length_summary([len(r["text"].split()) for r in responses]),
            "tokens": length_summary(tokens),
            "truncated": sum(r["finish_reason"] == "length" for r in responses),
        },
        **degeneration,
    }
