"""What the benchmark scripts share: the demo's data as their committed results measured it, how a result names the
machine it ran on, and how two rows of an evaluation are paired prompt by prompt."""

from __future__ import annotations

import os
import platform

# The demo as it was when the committed sweep and cost results were measured: 64 prompts of ≤ 640 tokens (the demo
# is now 48 of ≤ 512, to fit its time); the benchmarks keep it so that their points stay comparable.
DEMO_DATA = ["data.limit=64", "pairs.max_length=640", "warmup.max_length=640", "seqkd.max_length=640",
             "distill.max_length=640"]


def versions() -> dict[str, str]:
    """The versions a result depends on, as each run's manifest records them."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "trl", "soda-distill")}


def machine() -> str:
    from soda_distill.models import cpu_bf16_units

    units = cpu_bf16_units()
    return f"{platform.machine()}, {os.cpu_count()} cores, " + (f"bf16 on {units}" if units else "no bf16 (fp32 training)")


def prompt_figures(records: list[dict]) -> dict[str, dict[str, float | None]]:
    """metric -> prompt id -> value, from an evaluation's per-prompt records (`responses/ROW/BENCH.jsonl`, or a row of
    bench/results/quality/rows/): ROUGE-L, reference NLL, the held-out preference margin, the answer's length in words."""
    from soda_distill.evaluation.paired import preference_margins

    ids = [r["id"] for r in records]
    return {"rouge_l": {i: r["rouge_l"] for i, r in zip(ids, records)},
            "reference_nll": {i: r["reference_nll"] for i, r in zip(ids, records)},
            "preference_margin": dict(zip(ids, preference_margins(records))),
            "words": {i: len(r["messages"][-1]["content"].split()) for i, r in zip(ids, records)}}


def paired(mine: dict, theirs: dict) -> dict:
    """Per metric, mine − theirs (`prompt_figures`) on the prompts both have: paired bootstrap (None without any)."""
    from soda_distill.stats import paired_difference

    return {metric: paired_difference([mine[metric][i] for i in ids], [theirs[metric][i] for i in ids])
            for metric in mine if metric in theirs for ids in [sorted(mine[metric].keys() & theirs[metric].keys())]}
