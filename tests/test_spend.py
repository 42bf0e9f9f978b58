"""Spend before and while sending to a paid endpoint: the estimate printed first (`--dry-run` stops there), spend
limits that stop a collection cleanly and resumably, and the provider's rate limits kept to. Against a loopback
responder (responder.py) that answers at once with a fixed usage of 15 tokens."""

import json
import time

import pytest
from responder import USAGE, Responder

from soda_distill import endpoint
from soda_distill.cli import main
from soda_distill.config import load_config
from soda_distill.records import read_jsonl


@pytest.fixture
def responder():
    r = Responder()
    yield r
    r.close()


def teacher_args(run, prompts_file, responder, *extra):
    return ["teacher", "--out", str(run), f"data.prompts={prompts_file}", f"teacher.base_url={responder.url}",
            "teacher.model=m", "teacher.api_key_env=null", "teacher.max_tokens=5", "teacher.price_input_per_1m=2.0",
            "teacher.price_output_per_1m=8.0", *extra]


def test_a_dry_run_prints_the_requests_and_their_cost_and_sends_nothing(tmp_path, prompts_file, responder, capsys):
    assert main([*teacher_args(tmp_path / "run", prompts_file, responder), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "teacher: 12 requests to send to m at" in out and "(0 answered before)" in out
    bodies = [{"messages": [{"role": "user", "content": q}], "max_tokens": 5}
              for q in (json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines())]
    worst = {k: sum(endpoint.estimated_usage(b)[k] for b in bodies) for k in ("prompt_tokens", "completion_tokens")}
    assert f"≤ {(worst['prompt_tokens'] * 2 + worst['completion_tokens'] * 8) / 1e6:.4f} USD" in out
    assert out.startswith("teacher: to run: ") and responder.times == []
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_dry_run_of_compare_counts_every_seed_and_every_judgment(tmp_path, prompts_file, responder, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                   {"role": "assistant", "content": f"a{i}"}]}) + "\n" for i in range(3)))
    args = ["compare", "--out", str(tmp_path / "cmp"), "--dry-run", *teacher_args(tmp_path, prompts_file, responder)[3:],
            "compare.seeds=[1,2]", "compare.methods=[base,seqkd,soda]", f"evaluate.benchmarks=[{qa}]",
            f"evaluate.judge.base_url={responder.url}", "evaluate.judge.model=j", "evaluate.judge.api_key_env=null"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = ("teacher", "snapshot", "pairs", "warmup", "seqkd", "distill")
    assert [line.split(": ")[:2] for line in lines[:12]] == [[f"seed-{s}/{stage}", "to run"] for s in (1, 2) for stage in stages]
    assert any(line.startswith("evaluate: 6 rows on qa (3 prompts)") for line in lines)
    assert any(line.startswith("evaluate.judge: 36 requests") for line in lines)  # 6 rows × 3 prompts × 2 orders
    assert responder.times == [] and not (tmp_path / "cmp").exists()


def test_a_spend_limit_stops_cleanly_and_a_higher_one_goes_on(tmp_path, prompts_file, responder, capsys):
    run = tmp_path / "run"
    limit = 5 * sum(USAGE[k] for k in ("prompt_tokens", "completion_tokens"))  # room for a few requests
    assert main(teacher_args(run, prompts_file, responder, f"teacher.max_total_tokens={limit}")) == 2
    err = capsys.readouterr().err
    cached = [obj for _, obj in read_jsonl(run / "teacher_cache.jsonl")]
    assert 0 < len(cached) < 12 and len(responder.asked) == len(cached)  # nothing sent that was not kept
    assert sum(a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"] for a in cached) <= limit
    assert f"stopped at its spend limit (teacher.max_total_tokens = {limit}" in err
    assert f"{len(cached)} of 12 answered and cached" in err and "Traceback" not in err
    stopped = json.loads((run / "manifest.json").read_text())["stopped"]["teacher"]
    assert "max_total_tokens" in stopped["reason"]
    # its config.yaml keeps the limit: raise it (or lift it) to go on
    assert main(teacher_args(run, prompts_file, responder, "teacher.max_total_tokens=null", "teacher.max_cost_usd=1.0")) == 0
    assert len(responder.asked) == 12 and len(set(responder.asked)) == 12  # the rest, each once
    manifest = json.loads((run / "manifest.json").read_text())
    assert "teacher" not in manifest.get("stopped", {}) and manifest["stages"]["teacher"]["status"] == "done"


def test_a_cost_limit_needs_prices(tmp_path, prompts_file, responder, capsys):
    args = teacher_args(tmp_path / "run", prompts_file, responder, "teacher.max_cost_usd=0.01",
                        "teacher.price_input_per_1m=null")
    assert main(args) == 2
    assert "max_cost_usd needs this endpoint's prices" in capsys.readouterr().err and responder.times == []


def test_requests_per_minute_are_kept_to_before_any_429(tmp_path, prompts_file, responder, monkeypatch):
    monkeypatch.setattr(endpoint.RateLimit, "WINDOW_S", 1.0)  # a "minute" of a second
    start = time.monotonic()
    assert main(teacher_args(tmp_path / "run", prompts_file, responder, "teacher.requests_per_minute=4",
                             "teacher.concurrency=8")) == 0
    times = responder.times
    assert len(times) == 12 and time.monotonic() - start >= 2.0  # 12 requests at 4 a window: three windows
    # arrival times, a fifth of a window short of it: a loaded machine delays some requests' arrival
    assert all(sum(t <= u < t + 0.8 for u in times) <= 4 for t in times)


def test_a_spend_limit_counts_requests_waiting_for_the_rate_limit(tmp_path, prompts_file, responder, monkeypatch, capsys):
    """Requests held back by the rate limit are spend in flight: the limit is not passed by those let through later."""
    monkeypatch.setattr(endpoint.RateLimit, "WINDOW_S", 0.3)
    limit = 2 * sum(USAGE[k] for k in ("prompt_tokens", "completion_tokens"))
    run = tmp_path / "run"
    assert main(teacher_args(run, prompts_file, responder, "teacher.requests_per_minute=1", "teacher.concurrency=4",
                             "teacher.max_tokens=1", f"teacher.max_total_tokens={limit}")) == 2
    assert "stopped at its spend limit" in capsys.readouterr().err
    cached = [obj for _, obj in read_jsonl(run / "teacher_cache.jsonl")]
    assert len(responder.asked) == len(cached) and sum(sum(a["usage"].values()) for a in cached) <= limit


def test_a_failed_write_stops_the_collection_at_once(tmp_path, responder, monkeypatch):
    """A full disk while answers arrive: the error comes out and no more requests are paid for."""
    import errno

    from soda_distill.config import EndpointConfig
    from soda_distill.append_log import AppendLog

    def full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(AppendLog, "append", full)
    section = EndpointConfig(base_url=responder.url, model="m", api_key_env=None, concurrency=2)
    bodies = [{"model": "m", "messages": [{"role": "user", "content": f"Q{i}"}], "max_tokens": 5} for i in range(40)]
    jobs = {endpoint.request_key(responder.url, b): (f"q{i}", b) for i, b in enumerate(bodies)}
    with pytest.raises(OSError, match="No space left"):
        endpoint.collect(section, "t", jobs, AppendLog(tmp_path / "cache.jsonl", "key"), tmp_path / "f.jsonl", "failed", "again")
    assert len(responder.asked) <= 4  # the requests in flight when the first write failed, not all 40


def test_spend_limits_are_operational_keys():
    """They change what is sent, not what an answer is: a stage finished without them stays finished."""
    from soda_distill.config import fingerprint

    assert fingerprint(load_config(None, ["teacher.max_cost_usd=3", "teacher.requests_per_minute=60"]).teacher) == \
        fingerprint(load_config(None, []).teacher)


def test_a_collection_runs_inside_a_running_event_loop(tmp_path, responder):
    """As from a notebook, whose cell already runs in an event loop: the requests get a loop of their own."""
    import asyncio

    from soda_distill.config import EndpointConfig
    from soda_distill.append_log import AppendLog

    section = EndpointConfig(base_url=responder.url, model="m", api_key_env=None, concurrency=4)
    bodies = [{"model": "m", "messages": [{"role": "user", "content": f"Q{i}"}], "max_tokens": 5} for i in range(6)]
    jobs = {endpoint.request_key(responder.url, b): (f"q{i}", b) for i, b in enumerate(bodies)}
    cache = AppendLog(tmp_path / "cache.jsonl", "key")

    async def cell():
        return endpoint.collect(section, "t", jobs, cache, tmp_path / "failed.jsonl", "failed", "run again")

    assert asyncio.run(cell()) == 6
    assert sorted(responder.asked) == [f"Q{i}" for i in range(6)]
    assert {r["content"] for r in cache.records.values()} == {f"ok: Q{i}" for i in range(6)}


def test_a_dry_run_reads_the_teacher_file_as_the_stage_would(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "run"), "--dry-run", "teacher.file=builtin:dolly_train", "data.limit=5"]) == 0
    assert capsys.readouterr().out.startswith("teacher: to run: reads 5 teacher answers from ")
    assert main(["run", "--out", str(tmp_path / "run"), "--dry-run", f"teacher.file={tmp_path / 'none.jsonl'}"]) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err and not (tmp_path / "run").exists()
