import json

import pytest
from conftest import write_jsonl

from soda_distill.config import load_config
from soda_distill.errors import InputError, SodaError
from soda_distill.evaluation.benchmarks import alpaca_prompt, load_benchmarks, student_prompt
from soda_distill.records import shown_data_path


def test_shipped_benchmarks_load_with_references():
    benchmarks = load_benchmarks(load_config(None).evaluate)
    assert [(b.name, len(b.items)) for b in benchmarks] == [("Dolly", 100), ("SelfInst", 242), ("Vicuna", 80)]
    for b in benchmarks:
        assert all(it.reference and it.category for it in b.items), b.name
        assert len({it.id for it in b.items}) == len(b.items)
    assert "242 of the 252" in benchmarks[1].note and "GPT-3.5-turbo" in benchmarks[2].note
    # results name a shipped file the same way on every machine; a user's own file keeps its path
    assert [shown_data_path(b.path) for b in benchmarks] == ["builtin:dolly_heldout", "builtin:self_instruct", "builtin:vicuna"]
    assert shown_data_path("/data/vicuna.jsonl") == "/data/vicuna.jsonl"


def test_alpaca_layout_is_minillms():
    dolly = load_benchmarks(load_config(None, ["evaluate.benchmarks=[dolly]", "evaluate.limit=1"]).evaluate)[0].items[0]
    wrapped = student_prompt(dolly, "alpaca")[-1]["content"]
    assert wrapped.startswith("Below is an instruction that describes a task, paired with an input that provides further context.")
    assert "### Instruction:\nWhen did Virgin Australia start operating?\n\n### Input:\nVirgin Australia," in wrapped
    assert wrapped.endswith("\n\n### Response:\n")
    assert student_prompt(dolly, "chat") == dolly.prompt
    assert alpaca_prompt("Name a fruit.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a fruit.\n\n### Response:\n"
    )


def test_lmsys_prompts_file_comes_first_and_needs_no_references(tmp_path):
    prompts = write_jsonl(tmp_path / "lmsys.jsonl", [{"id": "c1", "prompt": "Hi there"}, {"id": "c2", "prompt": "Tell a joke"}])
    benchmarks = load_benchmarks(load_config(None, [f"evaluate.lmsys={prompts}", "evaluate.benchmarks=[vicuna]"]).evaluate)
    assert [b.name for b in benchmarks] == ["LMSYS", "Vicuna"]
    assert [it.reference for it in benchmarks[0].items] == [None, None]


def test_bad_benchmark_file_names_file_line_and_field(tmp_path, qa_file):
    lines = qa_file.read_text().splitlines()
    bad_role = tmp_path / "bad_role.jsonl"
    bad_role.write_text("\n".join(lines[:2] + ['{"messages": [{"role": "robot", "content": "x"}]}']) + "\n")
    with pytest.raises(InputError, match=r"bad_role.jsonl, line 3, field 'messages\[0\].role'"):
        load_benchmarks(load_config(None, [f"evaluate.benchmarks=[{bad_role}]"]).evaluate)
    bad_category = tmp_path / "bad_category.jsonl"
    record = json.loads(lines[1]) | {"category": 7}
    bad_category.write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    with pytest.raises(InputError, match=r"bad_category.jsonl, line 2, field 'category': expected a string"):
        load_benchmarks(load_config(None, [f"evaluate.benchmarks=[{bad_category}]"]).evaluate)
    with pytest.raises(SodaError, match="unknown built-in data set 'nope'"):
        load_benchmarks(load_config(None, ["evaluate.benchmarks=[builtin:nope]"]).evaluate)
    with pytest.raises(SodaError, match="prompt_format"):
        load_benchmarks(load_config(None, ["evaluate.prompt_format=raw"]).evaluate)
