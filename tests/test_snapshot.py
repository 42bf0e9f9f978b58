import json

from conftest import write_jsonl

from soda_distill.config import load_config
from soda_distill.manifest import RunDir
from soda_distill.records import read_examples
from soda_distill.stages.pairs import run_pairs
from soda_distill.stages.snapshot import run_snapshot
from soda_distill.stages.teacher import run_teacher


def snapshot_config(qa_file, tiny_model_dir, *extra):
    return load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
                              "snapshot.batch_size=4", *extra])


def run_fresh(tmp_path, name, cfg, partial=None):
    run = RunDir(tmp_path / name)
    run_teacher(cfg, run)
    if partial:
        run.file("snapshot.partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in partial))
    return run, run_snapshot(cfg, run)


def test_snapshot_answers_every_prompt_and_resumes_identically(tmp_path, qa_file, tiny_model_dir):
    cfg = snapshot_config(qa_file, tiny_model_dir)
    run, out = run_fresh(tmp_path, "a", cfg)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(12)]
    for r in records:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][:-1] == read_examples(qa_file)[int(r["id"][1:])].prompt
        assert 0 <= r["num_tokens"] <= 12 and r["finish_reason"] in ("stop", "length")
    info = run.manifest()["stages"]["snapshot"]
    assert info["records"] == 12 and info["backend"] == "transformers"
    assert not run.file("snapshot.partial.jsonl").exists()

    # a run killed after some records were logged resumes to exactly the same result, keeping what it logged
    logged = [json.loads(json.dumps(records[i])) for i in (0, 3, 4, 9, 11)]
    logged[1]["messages"][-1]["content"] = "FROM THE LOG"
    _, resumed = run_fresh(tmp_path, "b", cfg, partial=logged)
    resumed_records = [json.loads(line) for line in resumed.read_text().splitlines()]
    assert resumed_records[3]["messages"][-1]["content"] == "FROM THE LOG"
    assert [r for i, r in enumerate(resumed_records) if i != 3] == [r for i, r in enumerate(records) if i != 3]


def test_snapshot_sampling_settings_matter(tmp_path, qa_file, tiny_model_dir):
    _, a = run_fresh(tmp_path, "a", snapshot_config(qa_file, tiny_model_dir, "snapshot.seed=1"))
    _, b = run_fresh(tmp_path, "b", snapshot_config(qa_file, tiny_model_dir, "snapshot.seed=2"))
    assert a.read_text() != b.read_text()


def test_prompts_too_long_for_the_context_are_skipped_and_counted(tmp_path, qa_file, tiny_model_dir):
    records = [json.loads(line) for line in qa_file.read_text().splitlines()[:3]]
    long = {"id": "long", "prompt": "word " * 1100, "response": "Too long."}  # the tiny model's context: 1024 tokens
    teacher = write_jsonl(tmp_path / "teacher.jsonl", records[:1] + [long] + records[1:])
    cfg = snapshot_config(teacher, tiny_model_dir, "pairs.truncated_rejected=open")  # its answers are all cut
    run, out = run_fresh(tmp_path, "run", cfg)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["q0", "q1", "q2"]
    assert run.manifest()["stages"]["snapshot"]["skipped_too_long"] == 1
    run_pairs(cfg, run)
    assert run.manifest()["stages"]["pairs"]["dropped"]["no_student_response"] == 1
