"""The AlpacaEval replica's data: real LLM teachers' answers from the shared AlpacaEval files, split once.

    python bench/alpaca_eval_data.py [--source ../shared/data/alpaca_eval] [--out runs/alpaca_eval/data]

A seeded split of AlpacaEval's 805 instructions, stratified by its source (helpful_base, koala, oasst, selfinstruct,
vicuna): HELDOUT prompts never trained on, the rest to train on (in a seeded random order, so that `data.limit`
takes a random draw of them). It writes, as `messages` JSONL with AlpacaEval's ids:
- `train-<MODEL>.jsonl`: the training prompts with MODEL's answers — the teacher (`teacher.file`) and the other
  rejected sources of Table 2 (`pairs.rejected_source`: a cross-family student's answers, a weaker teacher's, and
  `train-gpt-4o-mini-2024-07-18-degraded.jsonl`, the weaker teacher's made poor: sentences shuffled, cut to half);
- `AE-gpt-4o.jsonl`, `AE-gpt4-1106.jsonl`: the held-out prompts with gpt-4o's and gpt4_1106_preview's answers as the
  references (`evaluate.benchmarks`: two columns over the same prompts, so each answer is generated once);
- `split.json`: the held-out and training ids, and the counts per source.
AlpacaEval's data is CC BY-NC 4.0 (tatsu-lab/alpaca_eval); these files stay in the run directory and are not shipped.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from soda_distill.stages.pairs import degraded

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "alpaca_eval"
OUT = ROOT / "runs" / "alpaca_eval" / "data"
TEACHER = "gpt-4o-2024-05-13"
REFERENCES = {"AE-gpt-4o": TEACHER, "AE-gpt4-1106": "gpt4_1106_preview"}  # benchmark column -> reference model
WEAK_TEACHER = "gpt-4o-mini-2024-07-18"
TRAIN_ANSWERS = (TEACHER, "gemma-2b-it", "Qwen1.5-1.8B-Chat", WEAK_TEACHER)  # the teacher, and Table 2's sources
HELDOUT, SPLIT_SEED = 240, 0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split(prompts: list[dict], heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Held-out and training ids: from each source a share of `heldout` in proportion to its size (largest
    remainders), drawn with `seed`; the held-out ones in AlpacaEval's order, the training ones shuffled."""
    by_source = defaultdict(list)
    for p in prompts:
        by_source[p["dataset"]].append(p["id"])
    quotas = {s: heldout * len(ids) / len(prompts) for s, ids in by_source.items()}
    counts = {s: int(q) for s, q in quotas.items()}
    for s in sorted(quotas, key=lambda s: counts[s] - quotas[s])[: heldout - sum(counts.values())]:
        counts[s] += 1
    rng = random.Random(seed)
    chosen = {i for s in sorted(by_source) for i in rng.sample(by_source[s], counts[s])}
    train = [p["id"] for p in prompts if p["id"] not in chosen]
    rng.shuffle(train)  # so that the first N (data.limit) are a random draw from every source
    return [p["id"] for p in prompts if p["id"] in chosen], train


def answers_of(source: Path, model: str) -> dict[str, str]:
    return {r["id"]: r["output"] for r in read_jsonl(source / "outputs" / f"{model}.jsonl")}


def conversation(prompt: dict, answer: str) -> dict:
    return {"id": prompt["id"], "category": prompt["dataset"], "instruction": prompt["instruction"],
            "messages": [{"role": "user", "content": prompt["instruction"]}, {"role": "assistant", "content": answer}]}


def write(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def prepare(source: Path, out: Path, heldout: int = HELDOUT, seed: int = SPLIT_SEED) -> dict:
    """Write the split's files into `out` (see the module's docstring); returns split.json's content."""
    prompts = read_jsonl(source / "prompts.jsonl")
    by_id = {p["id"]: p for p in prompts}
    heldout_ids, train_ids = split(prompts, heldout, seed)
    out.mkdir(parents=True, exist_ok=True)
    for model in TRAIN_ANSWERS:
        answers = answers_of(source, model)
        # a prompt the model left unanswered (two models lack a few) is left out of its file
        write(out / f"train-{model}.jsonl", [conversation(by_id[i], answers[i]) for i in train_ids if answers.get(i, "").strip()])
    # Table 2's "bad GPT-4o-mini" as far as a fixed answer set allows (the paper: high temperature, truncated):
    # its answers with their sentences shuffled and cut to half their words, as pairs.rejected_source=degraded_teacher
    rng, weak = random.Random(seed), answers_of(source, WEAK_TEACHER)
    write(out / f"train-{WEAK_TEACHER}-degraded.jsonl",
          [conversation(by_id[i], degraded(weak[i], rng)) for i in train_ids if weak.get(i, "").strip()])
    for column, model in REFERENCES.items():
        answers = answers_of(source, model)
        write(out / f"{column}.jsonl", [conversation(by_id[i], answers[i]) for i in heldout_ids])
    sources = sorted({p["dataset"] for p in prompts})
    record = {"source": "tatsu-lab/alpaca_eval (CC BY-NC 4.0), via ../shared/data/alpaca_eval", "seed": seed,
              "teacher": TEACHER, "references": REFERENCES,
              "heldout_per_source": {s: sum(by_id[i]["dataset"] == s for i in heldout_ids) for s in sources},
              "train_per_source": {s: sum(by_id[i]["dataset"] == s for i in train_ids) for s in sources},
              "heldout": heldout_ids, "train": train_ids}
    (out / "split.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help="the shared AlpacaEval folder")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    record = prepare(args.source, args.out)
    print(f"{args.out}: {len(record['train'])} training prompts, {len(record['heldout'])} held out "
          f"({', '.join(f'{s} {n}' for s, n in record['heldout_per_source'].items())})")


if __name__ == "__main__":
    main()
