import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUESTIONS

from soda_distill.config import load_config
from soda_distill.errors import InputError, SodaError
from soda_distill.manifest import RunDir
from soda_distill.records import read_examples
from soda_distill.stages.teacher import run_teacher


def api_overrides(url, model, prompts, key_env="SODA_TEST_KEY"):
    return [f"teacher.base_url={url}/v1", f"teacher.model={model}", f"data.prompts={prompts}",
            "teacher.max_tokens=8", "teacher.temperature=0", f"teacher.api_key_env={key_env}",
            "teacher.max_retries=2", "teacher.backoff_initial_s=0.05", "teacher.backoff_max_s=0.2"]


def test_teacher_from_file(tmp_path, qa_file):
    cfg = load_config(None, [f"teacher.file={qa_file}"])
    run = RunDir(tmp_path / "run")
    out = run_teacher(cfg, run)
    records = read_examples(out, want_response=True)
    assert [r.id for r in records] == [f"q{i}" for i in range(12)] and records[0].response == "Red."
    first = run.manifest()["stages"]["teacher"]["finished"]
    run_teacher(cfg, run)  # finished: skipped, not redone
    assert run.manifest()["stages"]["teacher"]["finished"] == first


def test_teacher_api_collects_every_prompt_once(tmp_path, prompts_file, counting_proxy, chat_server, monkeypatch):
    monkeypatch.setenv("SODA_TEST_KEY", "sk-planted-secret-4242")
    cfg = load_config(None, api_overrides(counting_proxy.url, chat_server["model"], prompts_file))
    run = RunDir(tmp_path / "run")
    out = run_teacher(cfg, run)
    records = read_examples(out, want_response=True)
    assert [r.id for r in records] == [f"q{i}" for i in range(12)]
    assert all(r.response.strip() for r in records)
    assert sorted(counting_proxy.asked.values()) == [1] * 12
    usage = run.manifest()["stages"]["teacher"]["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12 * 8
    # asking again with a changed operational setting reuses everything
    run_teacher(load_config(None, api_overrides(counting_proxy.url, chat_server["model"], prompts_file) + ["teacher.concurrency=2"]), run)
    assert sum(counting_proxy.asked.values()) == 12
    for path in Path(run.path).rglob("*"):
        if path.is_file():
            assert b"sk-planted-secret-4242" not in path.read_bytes(), path


def test_failing_endpoint_keeps_what_was_answered(tmp_path, prompts_file, counting_proxy, chat_server, monkeypatch):
    monkeypatch.setenv("SODA_TEST_KEY", "k")
    counting_proxy.fail_after = 5
    cfg = load_config(None, api_overrides(counting_proxy.url, chat_server["model"], prompts_file) + ["teacher.concurrency=1"])
    run = RunDir(tmp_path / "run")
    with pytest.raises(SodaError, match=r"7 of 12 prompts got no teacher answer.*run the stage again"):
        run_teacher(cfg, run)
    failed = [json.loads(line) for line in run.file("teacher_failed.jsonl").read_text().splitlines()]
    assert len(failed) == 7 and all("HTTP 503" in f["reason"] and "3 attempts" in f["reason"] for f in failed)
    assert len(run.file("teacher_cache.jsonl").read_text().splitlines()) == 5
    counting_proxy.fail_after = None
    counting_proxy.asked.clear()
    run_teacher(cfg, run)
    assert sum(counting_proxy.asked.values()) == 7  # only the failed ones were asked again
    assert len(read_examples(run.file("teacher.jsonl"), want_response=True)) == 12


def test_unreachable_endpoint_is_a_clear_error(tmp_path, prompts_file, monkeypatch):
    monkeypatch.setenv("SODA_TEST_KEY", "k")
    cfg = load_config(None, api_overrides("http://127.0.0.1:9", "m", prompts_file) + ["data.limit=2"])
    with pytest.raises(SodaError, match="connection error"):
        run_teacher(cfg, RunDir(tmp_path / "run"))


def test_missing_key_variable(tmp_path, prompts_file, monkeypatch):
    monkeypatch.delenv("SODA_TEST_KEY", raising=False)
    cfg = load_config(None, api_overrides("http://127.0.0.1:9", "m", prompts_file))
    with pytest.raises(SodaError, match="SODA_TEST_KEY"):
        run_teacher(cfg, RunDir(tmp_path / "run"))


def test_bad_prompt_file_names_line_and_keeps_the_run(tmp_path, qa_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(qa_file.read_text() + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    run = RunDir(tmp_path / "run")
    run_teacher(load_config(None, [f"teacher.file={qa_file}"]), run)
    before = run.file("teacher.jsonl").read_bytes()
    with pytest.raises(InputError, match=r"bad.jsonl, line 13, field 'messages\[0\].role'"):
        run_teacher(load_config(None, [f"teacher.file={bad}"]), RunDir(tmp_path / "run2"))
    assert run.file("teacher.jsonl").read_bytes() == before


def test_killed_collection_resumes_without_asking_twice(tmp_path, prompts_file, counting_proxy, chat_server):
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "soda-distill"), "teacher", "--out", str(out),
           *api_overrides(counting_proxy.url, chat_server["model"], prompts_file, key_env="null"), "teacher.concurrency=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = out / "teacher_cache.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (cache.exists() and len(cache.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    answered_before_kill = {json.loads(line)["id"] for line in cache.read_text().splitlines() if line.endswith("}")}
    assert 4 <= len(answered_before_kill) < 12, "the kill should land mid-collection"
    assert not (out / "teacher.jsonl").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for i, q in enumerate(QUESTIONS):
        asked = counting_proxy.asked[q]
        # answered before the kill: never asked again; in flight at the kill (concurrency 1: at most one): twice
        assert asked == 1 if f"q{i}" in answered_before_kill else 1 <= asked <= 2, (q, asked)
    assert sum(counting_proxy.asked.values()) <= 13
    records = read_examples(out / "teacher.jsonl", want_response=True)
    assert [r.id for r in records] == [f"q{i}" for i in range(12)]
    ids = [json.loads(line)["id"] for line in cache.read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 12


def test_a_run_from_a_shipped_file_resumes_from_another_checkout(tmp_path, monkeypatch):
    """The shipped file's place differs between checkouts and venvs; its `builtin:` name and bytes do not."""
    import dataclasses
    import shutil

    from soda_distill import records
    from soda_distill.config import fingerprint
    from soda_distill.manifest import combine
    from soda_distill.records import resolve_data_path, source_digest

    def teacher_config():
        cfg = load_config(None, ["teacher.file=builtin:dolly_heldout", "data.limit=5"])
        cfg.teacher = dataclasses.replace(cfg.teacher, file=resolve_data_path(cfg.teacher.file))
        return cfg

    other_checkout = tmp_path / "other" / "data"
    shutil.copytree(Path(str(records.SHIPPED_DATA)), other_checkout)
    with monkeypatch.context() as m:
        m.setattr(records, "SHIPPED_DATA", other_checkout)
        first = teacher_config()
        run = RunDir(tmp_path / "run")
        run_teacher(first, run)
    assert first.teacher.file.startswith(str(other_checkout))
    finished = run.manifest()["stages"]["teacher"]["finished"]
    cfg = teacher_config()
    run_teacher(cfg, run)  # done, not an error about other settings, not redone
    assert run.manifest()["stages"]["teacher"]["finished"] == finished

    # A run made before: its fingerprint held the file's path; still done here, and rewritten to the current form.
    current = run.manifest()["stages"]["teacher"]["fingerprint"]
    old = combine(fingerprint(cfg.teacher), source_digest(cfg.teacher.file), str(cfg.data.limit))
    assert old != current
    run._update(lambda m: m["stages"]["teacher"].__setitem__("fingerprint", old))
    run_teacher(cfg, run)
    record = run.manifest()["stages"]["teacher"]
    assert (record["finished"], record["fingerprint"]) == (finished, current)
    with pytest.raises(SodaError, match="different settings"):  # other settings are still refused
        run_teacher(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, limit=4)), run)
