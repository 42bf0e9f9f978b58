"""`mode: batch`: the teacher's requests through the OpenAI Batch API (Files + Batches), against a loopback server
speaking that protocol whose answers come from the real `transformers serve`. The answers land in the same cache as
the synchronous path's; a killed process resumes its submitted batch instead of submitting again; requests the
batch failed are one error, and a rerun sends only them."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_server import BatchServer
from test_teacher import api_overrides

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.manifest import RunDir
from soda_distill.records import read_examples
from soda_distill.stages.teacher import run_teacher

BATCH = ["teacher.mode=batch", "teacher.batch_poll_s=0.1", "teacher.api_key_env=null"]


@pytest.fixture
def batch_server(chat_server):
    server = BatchServer(chat_server["url"])
    yield server
    server.close()


def overrides(server, chat_server, prompts_file, *more):
    return [*api_overrides(server.url.removesuffix("/v1"), chat_server["model"], prompts_file), *BATCH, *more]


def test_a_batch_answers_every_prompt_once_into_the_cache(tmp_path, prompts_file, batch_server, chat_server):
    cfg = load_config(None, overrides(batch_server, chat_server, prompts_file))
    run = RunDir(tmp_path / "run")
    records = read_examples(run_teacher(cfg, run), want_response=True)
    assert [r.id for r in records] == [f"q{i}" for i in range(12)] and all(r.response.strip() for r in records)
    assert (batch_server.uploads, batch_server.batches_created) == (1, 1)
    assert run.manifest()["stages"]["teacher"]["usage"]["completion_tokens"] > 0
    assert not (run.path / "teacher_cache.batch.json").exists()  # used up
    cache = run.path / "teacher_cache.jsonl"
    # the same cache as the synchronous path: answered prompts are not asked again, whichever the mode
    run_teacher(load_config(None, overrides(batch_server, chat_server, prompts_file, "teacher.mode=sync")), run)
    assert batch_server.batches_created == 1 and len(cache.read_text().splitlines()) == 12


def test_a_killed_process_picks_up_its_batch_and_never_submits_twice(tmp_path, prompts_file, batch_server, chat_server):
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "soda-distill"), "teacher", "--out", str(out),
           *overrides(batch_server, chat_server, prompts_file)]
    state = out / "teacher_cache.batch.json"
    batch_server.hold.clear()  # the batch stays in progress: the process is killed while it polls
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and "batch_id" in json.loads(state.read_text())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (batch_server.uploads, batch_server.batches_created) == (1, 1) and not (out / "teacher.jsonl").exists()
    # as if killed between creating the batch and recording its id: found again by its input file
    saved = json.loads(state.read_text())
    del saved["batch_id"]
    state.write_text(json.dumps(saved))
    batch_server.hold.set()
    records = read_examples(run_teacher(load_config(None, overrides(batch_server, chat_server, prompts_file)), RunDir(out)),
                            want_response=True)
    assert len(records) == 12 and (batch_server.uploads, batch_server.batches_created) == (1, 1)


def test_requests_the_batch_failed_are_one_error_and_a_rerun_sends_only_them(tmp_path, prompts_file, batch_server, chat_server):
    from conftest import QUESTIONS

    batch_server.fail = {QUESTIONS[3], QUESTIONS[7]}
    cfg = load_config(None, overrides(batch_server, chat_server, prompts_file))
    run = RunDir(tmp_path / "run")
    with pytest.raises(SodaError, match=r"2 of 12 prompts got no teacher answer after retries \(first: batch batch_1: "
                                        r"the provider failed this request; all in .*teacher_failed.jsonl\)"):
        run_teacher(cfg, run)
    batch_server.fail = set()
    assert len(read_examples(run_teacher(cfg, run), want_response=True)) == 12
    assert batch_server.batches_created == 2 and batch_server.batches["batch_2"]["request_counts"]["total"] == 2


def test_a_batch_past_a_spend_limit_is_not_submitted(tmp_path, prompts_file, batch_server, chat_server):
    cfg = load_config(None, overrides(batch_server, chat_server, prompts_file, "teacher.max_total_tokens=50"))
    with pytest.raises(SodaError, match=r"teacher: a batch of 12 requests could pass teacher.max_total_tokens"):
        run_teacher(cfg, RunDir(tmp_path / "run"))
    assert batch_server.uploads == 0
