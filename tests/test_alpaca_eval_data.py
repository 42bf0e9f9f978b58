"""bench/alpaca_eval_data.py: the AlpacaEval replica's split and files, on a small folder shaped like the shared data."""

import json
from collections import Counter
from pathlib import Path

import pytest

from soda_distill.config import load_config
from soda_distill.evaluation.benchmarks import load_benchmarks
from soda_distill.records import read_examples

SOURCES = {"helpful_base": 30, "koala": 20, "oasst": 25, "selfinstruct": 15, "vicuna": 10}
MODELS = ("gpt-4o-2024-05-13", "gpt4_1106_preview", "gemma-2b-it", "Qwen1.5-1.8B-Chat", "gpt-4o-mini-2024-07-18")


@pytest.fixture
def alpaca_folder(tmp_path) -> Path:
    folder = tmp_path / "alpaca_eval"
    (folder / "outputs").mkdir(parents=True)
    prompts = [{"id": f"ae{k:03d}", "dataset": source, "instruction": f"Question {k} from {source}?"}
               for k, source in enumerate(s for s, n in SOURCES.items() for _ in range(n))]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    for model in MODELS:  # gemma left one prompt unanswered, as two shared models do
        rows = [{"id": p["id"], "output": f"{model} says: first point. Second point! Third?", "generator": model}
                for p in prompts if not (model == "gemma-2b-it" and p["id"] == "ae001")]
        (folder / "outputs" / f"{model}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_split_is_stratified_disjoint_and_seeded(alpaca_folder, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import alpaca_eval_data

    record = alpaca_eval_data.prepare(alpaca_folder, tmp_path / "a", heldout=20)
    heldout, train = record["heldout"], record["train"]
    assert len(heldout) == 20 and len(train) == 80 and not set(heldout) & set(train)
    assert record["heldout_per_source"] == {s: 20 * n // 100 for s, n in SOURCES.items()}  # in proportion
    assert alpaca_eval_data.prepare(alpaca_folder, tmp_path / "b", heldout=20)["train"] == train  # seeded
    assert alpaca_eval_data.prepare(alpaca_folder, tmp_path / "c", heldout=20, seed=1)["heldout"] != heldout
    # the training file's first prompts are a draw from every source, not AlpacaEval's first source
    first = Counter(alpaca_eval_data.read_jsonl(tmp_path / "a" / "train-gpt-4o-2024-05-13.jsonl")[i]["category"] for i in range(20))
    assert len(first) >= 3

    # what the package reads: the teacher's file, the two benchmarks over the same held-out prompts, the sources
    teacher = read_examples(tmp_path / "a" / "train-gpt-4o-2024-05-13.jsonl", want_response=True)
    assert [ex.id for ex in teacher] == train and teacher[0].response.startswith("gpt-4o-2024-05-13 says")
    cfg = load_config(None, [f"evaluate.benchmarks=[{tmp_path / 'a' / 'AE-gpt-4o.jsonl'}, {tmp_path / 'a' / 'AE-gpt4-1106.jsonl'}]"])
    gpt4o, gpt4 = load_benchmarks(cfg.evaluate)
    assert [it.id for it in gpt4o.items] == [it.id for it in gpt4.items] == heldout
    assert gpt4.items[0].reference.startswith("gpt4_1106_preview says")
    assert len(read_examples(tmp_path / "a" / "train-gemma-2b-it.jsonl", want_response=True)) == 80 - ("ae001" in train)
    degraded = read_examples(tmp_path / "a" / "train-gpt-4o-mini-2024-07-18-degraded.jsonl", want_response=True)
    assert all(len(ex.response.split()) < len("gpt-4o-mini-2024-07-18 says: first point. Second point! Third?".split())
               for ex in degraded)
