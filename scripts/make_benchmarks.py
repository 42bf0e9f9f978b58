"""Rebuild the shipped SelfInst and Vicuna benchmark files from their public sources (see src/soda_distill/data/README.md).

    python scripts/make_benchmarks.py SOURCE_DIR

SOURCE_DIR holds minillm_self_inst_valid/valid.jsonl (MiniLLM/self-inst) and vicuna_bench/{question.jsonl,
answer_gpt-3.5-turbo_legacy.jsonl} (lm-sys/FastChat). Checks on the way that the Alpaca layout in
soda_distill.benchmarks reproduces MiniLLM's own `prompt` field for every SelfInst record.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from soda_distill.benchmarks import alpaca_prompt
from soda_distill.records import atomic_write_jsonl

DATA = Path(__file__).resolve().parent.parent / "src" / "soda_distill" / "data"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def self_instruct(source: Path) -> list[dict]:
    records = []
    for i, row in enumerate(_rows(source / "minillm_self_inst_valid" / "valid.jsonl")):
        assert alpaca_prompt(row["instruction"], row["input"]) == row["prompt"], f"record {i}: Alpaca layout differs"
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        records.append({
            "id": f"selfinst-{i:03d}", "category": row["topic"], "instruction": row["instruction"], "input": row["input"],
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}],
        })
    return records


def vicuna(source: Path) -> list[dict]:
    answers = {row["question_id"]: row["text"] for row in _rows(source / "vicuna_bench" / "answer_gpt-3.5-turbo_legacy.jsonl")}
    return [
        {"id": f"vicuna-{row['question_id']:02d}", "category": row["category"],
         "messages": [{"role": "user", "content": row["turns"][0]}, {"role": "assistant", "content": answers[row["question_id"]]}]}
        for row in _rows(source / "vicuna_bench" / "question.jsonl")
    ]


def main(source: str) -> None:
    for name, records in (("self_instruct", self_instruct(Path(source))), ("vicuna", vicuna(Path(source)))):
        atomic_write_jsonl(DATA / f"{name}.jsonl", records)
        print(f"{DATA / name}.jsonl: {len(records)} records")


if __name__ == "__main__":
    main(sys.argv[1])
