"""Faults on the way to a real endpoint: every prompt ends answered or listed as failed, none lost or duplicated,
and nothing answered is asked again."""

import json

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.manifest import RunDir
from soda_distill.records import read_examples
from soda_distill.teacher import run_teacher

from conftest import write_jsonl
from faults import FAULTS, FaultProxy

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
