"""Faults on the way to a real endpoint: every prompt ends answered or listed as failed, none lost or duplicated,
and nothing answered is asked again."""

import errno
import json
import os

import pytest

from conftest import write_jsonl
from faults import FAULTS, FaultProxy

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.evaluation.benchmarks import Item
from soda_distill.evaluation.judge import judge_body, run_judge
from soda_distill.manifest import RunDir
from soda_distill.records import read_examples
from soda_distill.stages.teacher import run_teacher

N_PROMPTS = 150


def test_teacher_through_a_faulty_endpoint(tmp_path, chat_server):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Say the number {i}."} for i in range(N_PROMPTS)])
    proxy = FaultProxy(chat_server["url"], fault_rate=0.35, seed=1, hang_s=10.5)
    max_retries = 3
    cfg = load_config(None, [
        f"teacher.base_url={proxy.url}/v1", f"teacher.model={chat_server['model']}", f"data.prompts={prompts}",
        "teacher.api_key_env=null", "teacher.max_tokens=3", "teacher.temperature=0", "teacher.concurrency=4",
        f"teacher.max_retries={max_retries}", "teacher.backoff_initial_s=0.01", "teacher.backoff_max_s=0.05",
        "teacher.timeout_s=10.0",
    ])
    run = RunDir(tmp_path / "run")
    try:
        run_teacher(cfg, run)
        failed = []
    except SodaError as e:
        assert "run the stage again" in str(e)
        failed = [json.loads(line) for line in run.file("teacher_failed.jsonl").read_text().splitlines()]
    try:
        total = sum(proxy.asked.values())
        injected = total - proxy.faults["none"]
        assert total >= 200 and injected / total >= 0.30, proxy.faults
        assert all(proxy.faults[f] for f in FAULTS), proxy.faults  # every kind of fault was exercised
        assert max(proxy.asked.values()) <= max_retries + 1  # the retry budget bounds every prompt

        cache = [json.loads(line) for line in run.file("teacher_cache.jsonl").read_text().splitlines()]
        answered = {r["id"] for r in cache}
        assert len(cache) == len(answered)  # nothing duplicated
        assert all(r["content"].strip() for r in cache)  # empty completions were retried, never kept
        failed_ids = {f["id"] for f in failed}
        assert answered | failed_ids == {f"p{i}" for i in range(N_PROMPTS)} and not answered & failed_ids  # nothing lost
        assert all(f["reason"] for f in failed)

        # resume: only the failed prompts are asked again, and with the faults gone all are answered
        proxy.fault_rate, before = 0.0, sum(proxy.asked.values())
        run_teacher(cfg, run)
        assert sum(proxy.asked.values()) - before == len(failed_ids)
        records = read_examples(run.file("teacher.jsonl"), want_response=True)
        assert [r.id for r in records] == [f"p{i}" for i in range(N_PROMPTS)]
        assert run.manifest()["stages"]["teacher"]["truncated"] >= 1  # finish_reason=length is kept and counted
    finally:
        proxy.close()


N_JUDGED = 12  # prompts, each judged in both orders


def test_judge_through_a_faulty_endpoint(tmp_path, chat_server):
    """The 135M model is a useless judge (mostly unparseable replies); what is tested is the protocol around it."""
    template = tmp_path / "template.txt"  # short, so the CPU-bound server answers quickly
    template.write_text("Question: {question}\nAssistant 1: {answer_1}\nAssistant 2: {answer_2}\n"
                        "Rate each assistant from 1 to 10. First line: the two scores, e.g. 7 4.")
    proxy = FaultProxy(chat_server["url"], fault_rate=0.35, seed=8, hang_s=10.5)  # a hang outlasts the 10 s timeout
    max_retries, parse_retries = 1, 1  # a small budget, so that some judgments do fail
    ev = load_config(None, [
        f"evaluate.judge.base_url={proxy.url}/v1", f"evaluate.judge.model={chat_server['model']}",
        "evaluate.judge.api_key_env=null", f"evaluate.judge.template={template}", "evaluate.judge.max_tokens=4",
        f"evaluate.judge.parse_retries={parse_retries}", f"evaluate.judge.max_retries={max_retries}",
        "evaluate.judge.concurrency=4", "evaluate.judge.backoff_initial_s=0.01", "evaluate.judge.backoff_max_s=0.05",
        "evaluate.judge.timeout_s=10.0",  # room for a CPU-bound server on a loaded machine
    ]).evaluate
    triples = [(Item(id=f"q{i}", prompt=[{"role": "user", "content": f"Say the number {i}."}], reference=None, category=None,
                     instruction="", input=""), f"{i}.", f"The number is {i}.") for i in range(N_JUDGED)]
    cells = {("Student", "numbers"): triples}
    # what the proxy sees of each judgment: its rendered prompt, by the id the judge lists failures under
    prompt_of = {}
    for item, student, reference in triples:
        for order, answers in (("student_first", (student, reference)), ("reference_first", (reference, student))):
            body = judge_body(ev.judge, template.read_text(), item, *answers)
            prompt_of[f"Student/numbers/{item.id}/{order}"] = body["messages"][-1]["content"]
    evaldir = tmp_path / "eval"
    try:
        try:
            run_judge(ev, evaldir, cells)
            failed = []
        except SodaError as e:
            assert "run the same command again" in str(e)
            failed = [json.loads(line) for line in (evaldir / "judge_failed.jsonl").read_text().splitlines()]
        total = sum(proxy.asked.values())
        assert total >= 40 and (total - proxy.faults["none"]) / total >= 0.30, proxy.faults
        assert max(proxy.asked.values()) <= (parse_retries + 1) * (max_retries + 1)  # both budgets bound every judgment

        cache = [json.loads(line) for line in (evaldir / "judge_cache.jsonl").read_text().splitlines()]
        answered, failed_ids = [r["id"] for r in cache], {f["id"] for f in failed}
        assert len(answered) == len(set(answered)) and len(failed) == len(failed_ids)  # nothing duplicated
        assert set(answered) | failed_ids == set(prompt_of) and not set(answered) & failed_ids  # nothing lost
        assert all(f["reason"] for f in failed)
        for r in cache:  # each reply scored, or counted unparseable with the reason
            assert (r["scores"] is None) == bool(r.get("error")) and r["attempts"] <= parse_retries + 1

        # resume: only the failed judgments are asked again, and with the faults gone every one is answered
        proxy.fault_rate, before = 0.0, dict(proxy.asked)
        results, totals = run_judge(ev, evaldir, cells)
        asked_again = {p for p, n in proxy.asked.items() if n > before.get(p, 0)}
        assert asked_again == {prompt_of[i] for i in failed_ids}
        assert totals["requests_this_run"] == len(failed_ids) and totals["judgments"] == 2 * N_JUDGED
        summary = results["Student", "numbers"]["summary"]
        details = results["Student", "numbers"]["details"]
        for order in ("student_first", "reference_first"):
            scored = sum(d[order]["student"] is not None for d in details)
            assert scored + summary["unparseable"][order] == N_JUDGED
        assert totals["unparseable"] == sum(summary["unparseable"].values())
    finally:
        proxy.close()


def test_a_second_process_on_one_run_directory_is_refused_until_the_first_is_gone(tmp_path, qa_file):
    """Two real processes: one holds the directory (as a run in progress does), the command in another is refused in
    one line naming it and the holder's PID and writes nothing; once the holder is killed the command runs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from soda_distill.manifest import RunDir; "
                               f"RunDir({str(run)!r}).lock(); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    command = [sys.executable, "-m", "soda_distill", "teacher", "--out", str(run), f"teacher.file={qa_file}"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr == (f"soda-distill: error: {run}: in use by another process (PID {holder.pid}); wait for it "
                              "to finish, or stop it and run again (it resumes)\n")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no config, no manifest, no records
    os.kill(holder.pid, signal.SIGKILL)  # a kill leaves the lock file, and no lock
    holder.wait()
    time.sleep(0.1)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "teacher.jsonl").exists() and (run / ".lock").read_text().strip() != str(holder.pid)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_or_read_only_directory_is_one_line_and_leaves_earlier_artifacts(tmp_path, qa_file, tiny_model_dir,
                                                                                    monkeypatch, capsys, error):
    """The teacher stage finished; the snapshot's first write fails as on a full disk (or a read-only directory):
    one line naming the file, the finished stage's files untouched, and the run goes on once writes succeed."""
    from soda_distill import records
    from soda_distill.cli import main

    run = tmp_path / "run"
    args = ["snapshot", "--out", str(run), f"teacher.file={qa_file}", f"student.model={tiny_model_dir}",
            "snapshot.max_new_tokens=4"]
    assert main(["teacher", *args[1:]]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    real = records.os.fsync

    def failing(fd):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(records.os, "fsync", failing)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"soda-distill: error: cannot write {run}/") and os.strerror(error) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name in before} == before
    monkeypatch.setattr(records.os, "fsync", real)
    assert main(args) == 0 and (run / "snapshot.jsonl").exists()


def test_a_stage_run_in_pieces_records_what_all_its_pieces_took(tmp_path):
    """A stage stopped by an interrupt and resumed (bench/quality.py's time limit) reports its whole cost: the seconds
    of every piece with its settings, not only the last one's; a piece with other settings does not count, and one
    killed outright is counted as uncounted."""
    import time

    from soda_distill.manifest import RunDir

    run = RunDir(tmp_path / "run")
    for fingerprint, seconds in (("a", 0.3), ("a", 0.2)):
        with pytest.raises(KeyboardInterrupt), run.stage("warmup", fingerprint):
            time.sleep(seconds)
            raise KeyboardInterrupt
    assert run.manifest()["pieces"]["warmup"]["count"] == 2
    with run.stage("warmup", "a"):
        time.sleep(0.1)
    record = run.manifest()["stages"]["warmup"]
    assert record["pieces"] == 3 and 0.1 <= record["last_piece_s"] < 0.3 and record["wall_s"] >= 0.6
    assert "warmup" not in run.manifest()["pieces"]
    with pytest.raises(KeyboardInterrupt), run.stage("distill", "a"):
        time.sleep(0.3)
        raise KeyboardInterrupt
    with run.stage("distill", "b"):  # other settings: the stage starts afresh
        pass
    assert "pieces" not in run.manifest()["stages"]["distill"] and run.manifest()["stages"]["distill"]["wall_s"] < 0.3
    killed = run.stage("snapshot", "a")  # a process killed outright: its piece never ends (a name keeps it open)
    killed.__enter__()
    with run.stage("snapshot", "a"):
        pass
    assert run.manifest()["stages"]["snapshot"]["pieces"] == 2
    assert run.manifest()["stages"]["snapshot"]["pieces_uncounted"] == 1


def test_a_failed_checkpoint_write_is_one_line_and_the_stage_resumes(tmp_path, qa_file, tiny_model_dir, monkeypatch,
                                                                     capsys):
    """A trainer writes each checkpoint's optimizer and RNG states with torch.save, which on a full disk raises a
    RuntimeError naming neither file nor errno (here worded as torch 2.13 words it): the stage stops in one line that
    says how to resume, the manifest keeps why, and the same command resumes it once writes succeed."""
    import torch

    from soda_distill.cli import main

    run = tmp_path / "run"
    args = ["warmup", "--out", str(run), f"teacher.file={qa_file}", f"student.model={tiny_model_dir}",
            "student.bf16=false", "warmup.batch_size=4", "warmup.epochs=1", "warmup.save_steps=1",
            "warmup.max_length=128"]

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 12588160 vs 12588048")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"soda-distill: error: cannot write a file in {run}/warmup: torch could not write it")
    assert err.rstrip().endswith("stage warmup stopped; everything written before is intact: free space (or make the "
                                 "directory writable) and run the same command again to resume")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    manifest = json.loads((run / "manifest.json").read_text())
    assert "warmup" not in manifest["stages"] and manifest["pieces"]["warmup"]["count"] == 1
    assert manifest["stopped"]["warmup"]["reason"].startswith("cannot write")
    assert main(args) == 0  # the checkpoint cut short is no checkpoint: trained again from the start
    record = json.loads((run / "manifest.json").read_text())["stages"]["warmup"]
    assert record["steps"] == 3 and record["resumed_from_step"] is None and record["pieces"] == 2


def test_only_failed_writes_become_the_one_line():
    """What each writer raises when a disk is full (or a folder read-only), as seen on a full tmpfs; any other error
    is left as it is."""
    import errno

    from soda_distill.errors import write_error

    SafetensorError = type("SafetensorError", (Exception,), {})
    assert "cannot write /r/x.json: No space left on device; stage pairs stopped;" in str(
        write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/r/x.json"), "pairs"))
    assert str(write_error(OSError(errno.EROFS, os.strerror(errno.EROFS)), "warmup", "/r/warmup")).startswith(
        f"cannot write a file in /r/warmup: {os.strerror(errno.EROFS)}; stage warmup stopped;")
    assert "Permission denied" in str(write_error(OSError(errno.EACCES, "Permission denied")))
    assert os.strerror(errno.ENOSPC) in str(write_error(SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"), "distill"))
    assert "torch could not write it" in str(write_error(RuntimeError(
        "PytorchStreamWriter failed writing file data/0: file write failed"), "gad"))
    for other in (OSError(errno.ENOENT, "No such file or directory"), RuntimeError("CUDA out of memory"),
                  SafetensorError("Error while deserializing header: (os error 2)"), ValueError("unexpected pos")):
        assert write_error(other, "warmup") is None, other
