import json

import pytest

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.manifest import RunDir
from soda_distill.stages.pairs import run_pairs


def conv(i, prompt, answer):
    return {"id": i, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_pairs_format_and_drops(tmp_path, tiny_model_dir):
    run = RunDir(tmp_path / "run")
    teacher = [conv("a", "Name a color.", "Red."), conv("b", "Name a fruit.", "Apple."), conv("c", "Say hi.", "Hi!"),
               conv("d", "Tell a story.", "Once upon a time."), conv("e", "Name a planet.", "Mars.")]
    student = [conv("a", "Name a color.", "I think blue."), conv("b", "Name a fruit.", " Apple. "),
               conv("c", "Say hi.", "   "), conv("d", "Tell a story.", "word " * 300)]
    for name, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", student)):
        run.file(name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(None, [f"student.model={tiny_model_dir}", "pairs.max_length=128"])
    pairs = [json.loads(line) for line in run_pairs(cfg, run).read_text().splitlines()]
    assert pairs == [{
        "id": "a",
        "prompt": [{"role": "user", "content": "Name a color."}],
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "I think blue."}],
        "chosen_truncated": False,
        "rejected_truncated": False,
    }]
    info = run.manifest()["stages"]["pairs"]
    assert info["kept"] == 1
    assert info["dropped"] == {"identical": 1, "empty_rejected": 1, "too_long": 1, "no_student_response": 1}
    assert info["lengths"]["chosen"]["max"] >= 2 and info["lengths"]["prompt"]["mean"] > 0


def test_the_length_limit_counts_tokens_as_dpo_trains_them(tmp_path, tiny_model_dir):
    """pairs.max_length is checked on the tokens TRL's DPO trains — the chat template's whole end of turn
    (`<|im_end|>` and a newline here) included: a limit of exactly the longest pair keeps it, one less drops it."""
    from datasets import Dataset

    from soda_distill.models import load_model, load_tokenizer
    from soda_distill.stages.distill import build_dpo_trainer

    answers = ["Red.", "A long answer about apples, pears and plums.", "Mars, the red planet."]
    teacher = [conv(str(i), f"Question {i}?", a) for i, a in enumerate(answers)]
    student = [conv(str(i), f"Question {i}?", f"I do not know {i}.") for i in range(len(answers))]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [{"prompt": t["messages"][:1], "chosen": t["messages"][1:], "rejected": s["messages"][1:]} for t, s in zip(teacher, student)]
    trainer = build_dpo_trainer(load_model(str(tiny_model_dir)), tokenizer, Dataset.from_list(rows),
                                load_config(None, [f"student.model={tiny_model_dir}"]), tmp_path / "dpo", tmp_path / "metrics.jsonl")
    ds = trainer.train_dataset
    trained = [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    for limit, kept in ((max(trained), len(answers)), (max(trained) - 1, len(answers) - 1)):
        run = RunDir(tmp_path / f"run-{limit}")
        for name, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", student)):
            run.file(name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        run_pairs(load_config(None, [f"student.model={tiny_model_dir}", f"pairs.max_length={limit}"]), run)
        info = run.manifest()["stages"]["pairs"]
        assert info["kept"] == kept, (limit, trained, info)
        if kept == len(answers):  # the recorded lengths are TRL's too
            assert info["lengths"]["chosen"]["max"] == max(map(len, ds["chosen_ids"]))
            assert info["lengths"]["prompt"]["max"] == max(map(len, ds["prompt_ids"]))


def test_a_cut_answer_is_kept_open_or_dropped(tmp_path, tiny_model_dir):
    """q0's answer cut at snapshot.max_new_tokens is kept and trained with no end of turn (DPO learns its text, not
    to stop there), or dropped and counted."""
    from soda_distill.chat_tokens import end_of_turn
    from soda_distill.models import load_tokenizer
    from soda_distill.stages.distill import dpo_dataset

    teacher = [conv("a", "Name a color.", "Red."), conv("b", "Name a fruit.", "Apple.")]
    student = [{**conv("a", "Name a color.", "Well, there are many colors, and the one I"), "finish_reason": "length"},
               {**conv("b", "Name a fruit.", "Banana."), "finish_reason": "stop"}]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    suffix = list(end_of_turn(tokenizer))
    assert tokenizer.decode(suffix) == "<|im_end|>\n"
    for policy, kept in (("open", 2), ("drop", 1)):
        run = RunDir(tmp_path / policy)
        for name, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", student)):
            run.file(name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        out = run_pairs(load_config(None, [f"student.model={tiny_model_dir}", f"pairs.truncated_rejected={policy}"]), run)
        info = run.manifest()["stages"]["pairs"]
        assert info["kept"] == kept and info["truncated_policy"]["rejected"] == policy
        if policy == "drop":
            assert info["dropped"] == {"truncated_rejected": 1}
            continue
        assert info["truncated_kept_open"] == {"rejected": 1}
        rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert rows["a"]["rejected_truncated"] and not rows["b"]["rejected_truncated"]
        data, _ = dpo_dataset(out, tokenizer, 1024)
        by_text = {tokenizer.decode(r["rejected_ids"]): r for r in data}
        cut = by_text["Well, there are many colors, and the one I"]  # its text, and no end of turn after it
        assert cut["rejected_ids"][-len(suffix):] != suffix and cut["chosen_ids"][-len(suffix):] == suffix
        assert by_text["Banana.<|im_end|>\n"]["rejected_ids"][-len(suffix):] == suffix

    run = RunDir(tmp_path / "all-cut")  # every negative cut, dropped by default: one line saying what to change
    for name, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", [{**r, "finish_reason": "length"} for r in student])):
        run.file(name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SodaError, match=r"none of 2 kept .*truncated_rejected': 2.*pairs.truncated_rejected=open"):
        run_pairs(load_config(None, [f"student.model={tiny_model_dir}"]), run)
    assert not run.output("pairs").exists()


def test_rejected_sources_of_the_ablation(tmp_path, tiny_model_dir):
    """Table 2's rejection sources: q0's own answer, q0's answer to another prompt, a degraded teacher answer."""
    import pytest

    from soda_distill.errors import SodaError

    prompts = [f"Question {i}?" for i in range(6)]
    teacher = [conv(f"q{i}", p, f"First point {i}. Second point {i}. Third point {i}, with more words.") for i, p in enumerate(prompts)]
    student = [conv(f"q{i}", p, f"My own answer {i}.") for i, p in enumerate(prompts)]
    pairs = {}
    for source in ("q0", "other_q0", "degraded_teacher"):
        run = RunDir(tmp_path / source)
        for name, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", student)):
            run.file(name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        cfg = load_config(None, [f"student.model={tiny_model_dir}", f"pairs.rejected_source={source}"])
        pairs[source] = [json.loads(line) for line in run_pairs(cfg, run).read_text().splitlines()]
        assert run.manifest()["stages"]["pairs"]["rejected_source"] == source
        assert [p["chosen"][0]["content"] for p in pairs[source]] == [t["messages"][1]["content"] for t in teacher]
    rejected = {s: [p["rejected"][0]["content"] for p in ps] for s, ps in pairs.items()}
    assert rejected["q0"] == [f"My own answer {i}." for i in range(6)]
    others = rejected["other_q0"]
    assert sorted(others) == sorted(rejected["q0"]) and all(a != f"My own answer {i}." for i, a in enumerate(others))
    for i, answer in enumerate(rejected["degraded_teacher"]):
        full = teacher[i]["messages"][1]["content"].split()
        assert len(answer.split()) == len(full) // 2 and set(answer.split()) <= set(full)
    assert rejected["degraded_teacher"] != [" ".join(t["messages"][1]["content"].split()[:6]) for t in teacher]  # shuffled
    # another model's answers, from a file (the paper's cross-student): matched by id, a missing one counted
    run = RunDir(tmp_path / "file")
    for name, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", student)):
        run.file(name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    other = tmp_path / "other_model.jsonl"
    other.write_text("".join(json.dumps(conv(f"q{i}", p, f"Another model says {i}.")) + "\n" for i, p in enumerate(prompts[:5])))
    cfg = load_config(None, [f"student.model={tiny_model_dir}", f"pairs.rejected_source={other}"])
    from_file = [json.loads(line) for line in run_pairs(cfg, run).read_text().splitlines()]
    assert [p["rejected"][0]["content"] for p in from_file] == [f"Another model says {i}." for i in range(5)]
    assert run.manifest()["stages"]["pairs"]["dropped"] == {"no_student_response": 1}
    with pytest.raises(SodaError, match="pairs.rejected_source: expected one of"):
        load_config(None, ["pairs.rejected_source=gpt4"])


def test_same_prompts_as_pairs_only_another_runs_prompts(tmp_path, tiny_model_dir):
    """Two rejection sources on the same prompts and budget: q0's cut answers drop pairs that another model's keep."""
    prompts = [f"Question {i}?" for i in range(6)]
    teacher = [conv(f"q{i}", p, f"The answer to {i}.") for i, p in enumerate(prompts)]
    student = [{**conv(f"q{i}", p, f"I ramble about {i}"), **({"finish_reason": "length"} if i in (1, 4) else {})}
               for i, p in enumerate(prompts)]
    other = tmp_path / "other_model.jsonl"
    other.write_text("".join(json.dumps(conv(f"q{i}", p, f"Another model says {i}.")) + "\n" for i, p in enumerate(prompts)))
    runs = {}
    for name, overrides in (("soda", []), ("other", [f"pairs.rejected_source={other}"]),
                            ("other_same", [f"pairs.rejected_source={other}",
                                            f"pairs.same_prompts_as={tmp_path / 'soda' / 'pairs.jsonl'}"])):
        run = runs[name] = RunDir(tmp_path / name)
        for file, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", student)):
            run.file(file).write_text("".join(json.dumps(r) + "\n" for r in recs))
        run_pairs(load_config(None, [f"student.model={tiny_model_dir}", *overrides]), run)
    ids = {name: [json.loads(line)["id"] for line in run.output("pairs").read_text().splitlines()]
           for name, run in runs.items()}
    assert ids == {"soda": ["q0", "q2", "q3", "q5"], "other": [f"q{i}" for i in range(6)],
                   "other_same": ["q0", "q2", "q3", "q5"]}
    assert runs["other_same"].manifest()["stages"]["pairs"]["dropped"] == {"other_prompts": 2}
    bad = tmp_path / "no_ids.jsonl"
    bad.write_text(json.dumps({"id": "q0"}) + "\n" + json.dumps({"prompt": "no id"}) + "\n")
    run = RunDir(tmp_path / "bad")
    for file, recs in (("teacher.jsonl", teacher), ("snapshot.jsonl", student)):
        run.file(file).write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SodaError, match=r"no_ids.jsonl, line 2, field 'id': expected a string or integer"):
        run_pairs(load_config(None, [f"student.model={tiny_model_dir}", f"pairs.same_prompts_as={bad}"]), run)
    with pytest.raises(SodaError, match="pairs.same_prompts_as: expected a .jsonl file"):
        load_config(None, ["pairs.same_prompts_as=runs/x/pairs.json"])
