"""The on-policy dial (distill.refresh_every): rejected answers generated again by the policy while DPO trains,
scored by q_w."""

import json

import pytest
import torch

from soda_distill.chat_tokens import chat_ids
from soda_distill.config import load_config
from soda_distill.manifest import RunDir
from soda_distill.models import load_model, load_tokenizer
from soda_distill.records import read_metrics, read_pairs
from soda_distill.stages.distill import run_distill
from soda_distill.stages.pairs import run_pairs
from soda_distill.stages.refresh import Refresh
from soda_distill.stages.snapshot import run_snapshot
from soda_distill.stages.teacher import run_teacher


def answer_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].sum().item()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_refresh_every_regenerates_the_coming_steps_rejected_answers_scored_by_q_w(tmp_path, qa_file, tiny_model_dir, lora,
                                                                                   monkeypatch):
    """q_w scores the new answers: a frozen copy of it beside the policy, or under LoRA the adapter-off model."""
    cfg = load_config(None, [
        f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
        "pairs.truncated_rejected=open",
        "snapshot.temperature=1.0", "distill.batch_size=2", "distill.gradient_accumulation_steps=2", "distill.epochs=2",
        "distill.max_length=128", "distill.learning_rate=1e-3", "distill.refresh_every=2", "student.bf16=false",
        *(["student.lora.r=4", "student.lora.alpha=8", "student.lora.dropout=0"] if lora else []),
    ])
    run = RunDir(tmp_path / "run")
    for stage in (run_teacher, run_snapshot, run_pairs):
        stage(cfg, run)
    trained, examples = [], Refresh.examples  # what each micro-batch hands the preference collator, at which step
    monkeypatch.setattr(Refresh, "examples", lambda self, trainer, batch: trained.append(
        (trainer.state.global_step, examples(self, trainer, batch))) or trained[-1][1])
    out = run_distill(cfg, run, start=tiny_model_dir)
    info = run.manifest()["stages"]["distill"]
    steps, refresh = info["steps"], info["refresh"]
    points = list(range(2, steps, 2))
    # every pair of every step from the first refresh on trains on an answer of its own round, none generated late
    assert refresh["refreshes"] == len(points) and refresh["late"] == 0, refresh
    files = sorted((out / "refreshed").glob("step-*.jsonl"))
    assert [int(f.stem.split("-")[1]) for f in files] == points
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    pairs_per_step = 2 * 2
    assert refresh["answers"] == len(records) == pairs_per_step * (steps - 2), (refresh, steps)
    # the new answers are the policy's, not q0's snapshot answers
    pairs = read_pairs(run.output("pairs"))
    assert sum(r["text"] != pairs[r["pair"]]["rejected"][0]["content"] for r in records) >= len(records) // 2
    # and they are what trains: from step 2 on, each micro-batch's rejected answers are those of its round's refresh
    latest = {(r["step"], r["pair"]): r for r in records}
    late = [(step, e["pair"]) for step, batch in trained if step >= 2 for e in batch
            if any(e[k] != latest[step // 2 * 2, e["pair"]][k] for k in ("rejected_ids", "ref_rejected_logps"))]
    assert len(trained) == 2 * steps and not late, late
    # and q_w (here the start model) is their reference: its log-probability of each, computed afresh
    # (the last refresh's, when the policy is furthest from q_w: the trained model scores them measurably otherwise)
    q_w, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    trained_model = load_model(str(out)) if not lora else None
    policy_off = []
    for r in records[-6:]:
        prompt_ids, rejected_ids = chat_ids(tokenizer, pairs[r["pair"]]["prompt"], r["text"], r["finish_reason"] == "length")
        assert rejected_ids == r["rejected_ids"]
        assert abs(answer_logp(q_w, prompt_ids, rejected_ids) - r["ref_rejected_logps"]) < 1e-3 * max(1, abs(r["ref_rejected_logps"]))
        if trained_model is not None:
            policy_off.append(abs(answer_logp(trained_model, prompt_ids, rejected_ids) - r["ref_rejected_logps"]))
    assert lora or max(policy_off) > 0.1, policy_off
    assert len([m for m in read_metrics(out / "metrics.jsonl") if "rewards/margins" in m]) == steps



def test_a_run_stopped_after_a_refresh_resumes_to_the_same_weights(tmp_path, qa_file, tiny_model_dir, monkeypatch):
    """Stopped after the refresh of step 4 and before the checkpoint of step 6, a run resumes from step 3's: it makes
    step 4's answers again with the policy of step 4, and ends with the weights of a run never stopped."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import soda_distill.stages.distill as distill

    cfg = load_config(None, [
        f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
        "pairs.truncated_rejected=open",
        "snapshot.temperature=1.0", "distill.batch_size=2", "distill.gradient_accumulation_steps=2", "distill.epochs=2",
        "distill.max_length=128", "distill.learning_rate=1e-3", "distill.refresh_every=2", "distill.save_steps=3",
        "student.bf16=false"])

    class StopAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise RuntimeError("stopped at step 5")

    def with_stop(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(StopAtStep5())
        return trainer

    build, runs = distill.build_dpo_trainer, {}
    for name in ("uninterrupted", "stopped"):
        runs[name] = RunDir(tmp_path / name)
        for stage in (run_teacher, run_snapshot, run_pairs):
            stage(cfg, runs[name])
    uninterrupted = run_distill(cfg, runs["uninterrupted"], start=tiny_model_dir)
    monkeypatch.setattr(distill, "build_dpo_trainer", with_stop)
    with pytest.raises(RuntimeError, match="stopped at step 5"):
        run_distill(cfg, runs["stopped"], start=tiny_model_dir)
    refreshed = runs["stopped"].path / "distill" / "refreshed"
    assert (refreshed / "step-000004.jsonl").exists()  # made after the last checkpoint (step 3): made again on resume
    monkeypatch.setattr(distill, "build_dpo_trainer", build)
    resumed = run_distill(cfg, runs["stopped"], start=tiny_model_dir)
    record = runs["stopped"].manifest()["stages"]["distill"]
    assert record["resumed_from_step"] == 3
    assert record["pieces"] == 2 and record["wall_s"] > record["last_piece_s"] > 0  # the stopped piece's seconds count
    counts = [r.manifest()["stages"]["distill"]["refresh"] for r in (runs["uninterrupted"], runs["stopped"])]
    for key in ("refreshes", "answers", "truncated"):  # the refreshes before the stop counted too
        assert counts[0][key] == counts[1][key], (key, counts)
    for f in ("step-000002.jsonl", "step-000004.jsonl"):
        assert (resumed / "refreshed" / f).read_text() == (uninterrupted / "refreshed" / f).read_text(), f
    x, y = load_file(uninterrupted / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


@pytest.mark.parametrize("launch", [{"ACCELERATE_USE_FSDP": "true"},
                                    {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}],
                         ids=["fsdp", "zero3"])
def test_refresh_is_refused_where_a_rank_holds_a_shard_of_the_weights(tmp_path, qa_file, tiny_model_dir, launch,
                                                                       monkeypatch):
    """Each rank generates its answers alone: under FSDP or ZeRO-3 it could not, so the stage refuses in one line."""
    from soda_distill.errors import SodaError

    cfg = load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=4",
                             "pairs.truncated_rejected=open",
                             "student.bf16=false", "distill.refresh_every=2"])
    run = RunDir(tmp_path / "run")
    for stage in (run_teacher, run_snapshot, run_pairs):
        stage(cfg, run)
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SodaError, match="needs the whole model on each rank: launch with DDP or DeepSpeed ZeRO-1/2"):
        run_distill(cfg, run, start=tiny_model_dir)
    assert "distill" not in run.manifest()["stages"]


def test_block_rows_foresee_what_accelerate_deals_each_rank():
    """block_rows against accelerate's own BatchSamplerShard (as the trainer's loader draws under N processes): each
    rank's rows of every block of k steps, less the rows accelerate repeats to even out the ranks' last micro-batches
    (those are generated when they arrive); a rank left with only repeated rows gets an empty block."""
    import math
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, RandomSampler

    from soda_distill.stages.refresh import block_rows
    from soda_distill.training import EpochSeededSampler

    empty_blocks = 0
    for n, b, ranks, ga, k in [(12, 2, 2, 1, 2), (13, 2, 2, 2, 1), (10, 3, 3, 1, 1), (7, 2, 3, 2, 3), (2, 2, 2, 1, 1),
                               (12, 2, 1, 2, 2)]:
        order = EpochSeededSampler(RandomSampler(range(n)), seed=3)
        micro_batches = math.ceil(n / b)
        for rank in range(ranks):
            args = SimpleNamespace(per_device_train_batch_size=b, gradient_accumulation_steps=ga, world_size=ranks,
                                   process_index=rank)
            dealt = {}
            for epoch in (0, 1):
                order.set_epoch(epoch)
                dealt[epoch] = list(BatchSamplerShard(BatchSampler(order, b, drop_last=False), ranks, rank))
            steps_per_epoch = math.ceil(len(dealt[0]) / ga)  # transformers' optimizer steps an epoch
            foreseen = []  # per step: the rows of its micro-batches that are not accelerate's repeats
            for step in range(2 * steps_per_epoch):
                epoch, j = divmod(step, steps_per_epoch)
                foreseen.append([row for m in range(j * ga, min((j + 1) * ga, len(dealt[epoch])))
                                 if m * ranks + rank < micro_batches
                                 for row in dealt[epoch][m][: min(b, n - (m * ranks + rank) * b)]])
            order.set_epoch(0)
            trainer = SimpleNamespace(train_order=order, args=args, state=SimpleNamespace(max_steps=2 * steps_per_epoch))
            for point in range(0, 2 * steps_per_epoch, k):
                rows = block_rows(trainer, point, k)
                assert rows == [r for step in foreseen[point : point + k] for r in step], (n, b, ranks, ga, k, rank, point)
                empty_blocks += not rows
            assert order.epoch == 0  # left as the trainer set it
    assert empty_blocks  # (2 rows, batch 2, 2 ranks: the second rank's only micro-batch is the first's rows again)
