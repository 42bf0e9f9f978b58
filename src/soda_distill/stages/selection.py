"""Teacher-aligned prompt selection (`distill.select`, from "Rethinking On-Policy Distillation"): DPO on a band of the
pairs ranked by how learnable the teacher's answer is for this student, or on a random subset of the same size.

The scores come free from the reference pass DPO makes anyway (q_w's log-probabilities of both answers):
- `teacher_nll`: q_w's per-token NLL of the teacher's answer, lowest (most learnable) first;
- `margin`: q_w's per-token log-probability of q0's answer less the teacher's — how far q_w still prefers its own
  kind of answer — least first;
- `random`: a seeded draw, the control.
`distill.select_band: [lo, hi]` keeps the pairs ranked from lo to hi (fractions: [0, 0.5] is the first half).
`distill/selection.json` names the pairs kept (their lines in pairs.jsonl) and the scores' means.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..records import atomic_write_text

def per_token_nll(dataset, answer: str, max_length: int) -> list[float]:
    """q_w's NLL per scored token of each row's `answer` (chosen or rejected): TRL's reference pass scores prompt +
    answer cut to max_length from the start, so a long answer's sum covers only its first tokens."""
    scored = lambda prompt, ids: max(min(len(ids), max_length - len(prompt)), 1)
    return [-lp / scored(prompt, ids) for lp, prompt, ids in
            zip(dataset[f"ref_{answer}_logps"], dataset["prompt_ids"], dataset[f"{answer}_ids"])]


def pair_scores(dataset, by: str, seed: int, max_length: int) -> list[float]:
    """Each training row's score, as `by` ranks them (ascending)."""
    chosen = per_token_nll(dataset, "chosen", max_length)
    if by == "teacher_nll":
        return chosen
    if by == "margin":
        return [c - r for c, r in zip(chosen, per_token_nll(dataset, "rejected", max_length))]
    rng = random.Random(seed)
    return [rng.random() for _ in chosen]


def select_pairs(dataset, by: str, band: list[float], seed: int, max_length: int, out: Path):
    """The rows of `dataset` (its reference log-probabilities computed) in `band` of the ranking `by`, in their
    order; writes `selection.json` in `out`. Returns the subset and what the manifest records."""
    scores = pair_scores(dataset, by, seed, max_length)
    ranked = sorted(range(len(scores)), key=lambda i: scores[i])
    lo, hi = (round(f * len(ranked)) for f in band)
    kept = sorted(ranked[lo:hi])
    nll = per_token_nll(dataset, "chosen", max_length)
    mean = lambda rows: round(sum(nll[i] for i in rows) / max(len(rows), 1), 4)
    record = {"by": by, "band": band, "kept": len(kept), "of": len(scores),
              "teacher_nll": {"kept": mean(kept), "all": mean(range(len(nll)))}}
    pairs = dataset["pair"]
    atomic_write_text(out / "selection.json", json.dumps({**record, "pairs": sorted(pairs[i] for i in kept)}) + "\n")
    return dataset.select(kept), record
