import math

import pytest
from transformers import AutoModelForCausalLM

from soda_distill.config import load_config
from soda_distill.errors import SodaError
from soda_distill.manifest import RunDir
from soda_distill.records import read_metrics
from soda_distill.models import load_model, load_tokenizer
from soda_distill.stages.distill import build_dpo_trainer, dpo_dataset, run_distill
from soda_distill.stages.pairs import run_pairs
from soda_distill.stages.snapshot import run_snapshot
from soda_distill.stages.teacher import run_teacher
from soda_distill.training import EpochSeededSampler, LengthBuckets


def test_dpo_raises_reward_margin_and_accuracy(tmp_path, qa_file, tiny_model_dir):
    cfg = load_config(None, [
        f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
        "pairs.truncated_rejected=open", "snapshot.temperature=1.0",
        "distill.learning_rate=2e-3", "distill.batch_size=4", "distill.epochs=5", "distill.warmup_ratio=0", "distill.beta=0.1",
        "distill.max_length=128",
    ])
    run = RunDir(tmp_path / "run")
    run_teacher(cfg, run)
    run_snapshot(cfg, run)
    run_pairs(cfg, run)
    # DPO straight from the tiny model (standing in for q_w): the reference is the start point either way
    out = run_distill(cfg, run, start=tiny_model_dir)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "rewards/margins" in m]
    assert len(steps) >= 10
    first, last = steps[:3], steps[-3:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.5
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert mean(last, "rewards/accuracies") >= 0.9
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    info = run.manifest()["stages"]["distill"]
    assert info["reward_margin"]["last"] > info["reward_margin"]["first"]


def test_dpo_batches_group_pairs_by_length(tmp_path, qa_file, tiny_model_dir):
    """The pairs' `length` column reaches the length-grouped sampler (TRL drops unknown columns by default), and
    TRL's collator takes batches that still carry it."""
    cfg = load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
                             "pairs.truncated_rejected=open",
                             "snapshot.temperature=1.0", "distill.batch_size=2", "distill.max_length=128"])
    run = RunDir(tmp_path / "run")
    for stage in (run_teacher, run_snapshot, run_pairs):
        stage(cfg, run)
    trainer = build_dpo_trainer(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)),
                                dpo_dataset(run.file("pairs.jsonl"), load_tokenizer(str(tiny_model_dir)), 128)[0], cfg, tmp_path / "out", tmp_path / "metrics.jsonl")
    lengths = trainer.train_dataset["length"]
    loader = trainer.get_train_dataloader()
    sampler = loader.batch_sampler.sampler
    assert isinstance(sampler, EpochSeededSampler) and isinstance(sampler.sampler, LengthBuckets)
    assert list(sampler.sampler.lengths) == lengths and len(set(lengths)) > 1
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 2 * 2  # chosen and rejected of two pairs
    # a max_length no prompt fits leaves nothing to train on: one line naming the file and the key
    with pytest.raises(SodaError, match=r"pairs.jsonl: no pair whose prompt fits distill.max_length \(4 tokens\)"):
        dpo_dataset(run.file("pairs.jsonl"), load_tokenizer(str(tiny_model_dir)), 4)


def test_dpo_with_wpo_weighting_trains_on_cpu(tmp_path, qa_file, tiny_model_dir):
    """distill.use_weighting (WPO) needs log Σp² per token: on CPU it keeps TRL's own head, which returns it, and the
    pairs' weights reach the loss."""
    cfg = load_config(None, [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
                             "pairs.truncated_rejected=open",
                             "distill.use_weighting=true", "distill.batch_size=4", "distill.epochs=0.5",
                             "distill.max_length=128", "student.bf16=false"])
    run = RunDir(tmp_path / "run")
    for stage in (run_teacher, run_snapshot, run_pairs):
        stage(cfg, run)
    out = run_distill(cfg, run, start=tiny_model_dir)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "rewards/margins" in m]
    assert steps and all(abs(m["rewards/margins"]) < 1e-3 for m in steps)
    # at a margin of 0 DPO's loss is ln 2 a pair; WPO's weights (each answer's probability per token) move it
    assert all(abs(m["loss"] - math.log(2)) > 5e-3 for m in steps), steps


def test_rpo_adds_the_chosen_answers_nll_to_dpo(tmp_path, qa_file, tiny_model_dir):
    """distill.loss_type: [sigmoid, sft] (RPO): with the chosen answers' NLL in the loss their log-probability ends
    higher than under DPO alone, from the same start on the same batches."""
    settings = [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
                "pairs.truncated_rejected=open",
                "distill.learning_rate=1e-3", "distill.batch_size=4", "distill.epochs=2", "distill.max_length=128",
                "student.bf16=false"]
    chosen = {}
    for name, extra in (("dpo", []), ("rpo", ["distill.loss_type=[sigmoid, sft]", "distill.loss_weights=[1.0, 1.0]"])):
        cfg = load_config(None, settings + extra)
        run = RunDir(tmp_path / name)
        for stage in (run_teacher, run_snapshot, run_pairs):
            stage(cfg, run)
        steps = [m for m in read_metrics(run_distill(cfg, run, start=tiny_model_dir) / "metrics.jsonl") if "logps/chosen" in m]
        chosen[name] = steps[-1]["logps/chosen"]
    assert chosen["rpo"] > chosen["dpo"], chosen


def test_ld_dpo_counts_only_the_shared_length_of_each_pair(tmp_path, qa_file, tiny_model_dir):
    """distill.ld_alpha reaches TRL: at α = 0 the first step's log-probabilities of the same batch from the same
    start sum over each pair's shared length only, so they are nearer 0 than DPO's sums over whole answers."""
    settings = [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
                "pairs.truncated_rejected=open",
                "snapshot.temperature=1.0", "distill.batch_size=4", "distill.epochs=0.3", "distill.max_length=128",
                "student.bf16=false"]
    first = {}
    for name, extra in (("dpo", []), ("ld", ["distill.ld_alpha=0.0"])):
        cfg = load_config(None, settings + extra)
        run = RunDir(tmp_path / name)
        for stage in (run_teacher, run_snapshot, run_pairs):
            stage(cfg, run)
        step = next(m for m in read_metrics(run_distill(cfg, run, start=tiny_model_dir) / "metrics.jsonl") if "logps/chosen" in m)
        first[name] = step["logps/chosen"] + step["logps/rejected"]
    assert first["dpo"] < first["ld"] < 0, first
    with pytest.raises(SodaError, match="distill.ld_alpha must be between 0 and 1"):
        load_config(None, ["distill.ld_alpha=1.5"])
    for other in ("distill.refresh_every=2", "distill.select=teacher_nll"):  # both assume each answer's own length
        with pytest.raises(SodaError, match=f"distill.ld_alpha cannot be combined with {other.split('=')[0]}"):
            load_config(None, ["distill.ld_alpha=0.5", other])


def test_selection_keeps_its_band_of_each_ranking(tmp_path):
    """select_pairs on known reference figures: per-token teacher NLL n = 1..6 (rows in a shuffled order), q0's answer
    2n; the band [0.5, 1] keeps the worst half, `margin` ranks by teacher NLL less q0's (−n), `random` as many."""
    from datasets import Dataset

    from soda_distill.stages.selection import select_pairs

    teacher_nll = [3.0, 6.0, 1.0, 5.0, 2.0, 4.0]
    data = Dataset.from_dict({
        "pair": [10, 11, 12, 13, 14, 15], "prompt_ids": [[1, 2]] * 6,
        "chosen_ids": [[3, 4]] * 6, "rejected_ids": [[5, 6, 7, 8]] * 6,
        "ref_chosen_logps": [-2 * n for n in teacher_nll], "ref_rejected_logps": [-4 * 2 * n for n in teacher_nll],
    })
    kept = lambda by, band: select_pairs(data, by, band, 0, 64, tmp_path)[0]["pair"]
    assert kept("teacher_nll", [0.0, 0.5]) == [10, 12, 14]  # NLL 3, 1, 2, in their order
    assert kept("teacher_nll", [0.5, 1.0]) == [11, 13, 15]
    assert kept("margin", [0.0, 0.5]) == [11, 13, 15]  # margin −n: least first
    assert kept("teacher_nll", [1 / 3, 2 / 3]) == [10, 15]  # NLL 3 and 4
    record = select_pairs(data, "teacher_nll", [0.5, 1.0], 0, 64, tmp_path)[1]
    assert record["teacher_nll"] == {"kept": 5.0, "all": 3.5} and record["kept"] == 3 and record["of"] == 6
    random_half = kept("random", [0.0, 0.5])
    assert len(random_half) == 3 and random_half == kept("random", [0.0, 0.5])


def test_selection_trains_dpo_on_the_most_learnable_half(tmp_path, qa_file, tiny_model_dir):
    """distill.select: teacher_nll keeps the pairs whose teacher answer q_w finds likeliest per token (here q_w is
    the start model: its NLL computed afresh names the same half); random keeps as many others. distill.max_length
    cuts some teacher answers, whose NLL is then per token of the part scored."""
    import json
    import math

    from conftest import QA
    from test_refresh import answer_logp

    from soda_distill.chat_tokens import chat_ids
    from soda_distill.records import read_pairs

    tokenizer = load_tokenizer(str(tiny_model_dir))
    max_length = 3 + max(len(chat_ids(tokenizer, qa["messages"][:1], "", False)[0]) for qa in QA)
    settings = [f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12",
                "pairs.truncated_rejected=open",
                "distill.batch_size=2", "distill.epochs=1", f"distill.max_length={max_length}", "student.bf16=false"]
    kept = {}
    for by in ("teacher_nll", "random"):
        cfg = load_config(None, settings + [f"distill.select={by}", "distill.select_band=[0.0, 0.5]"])
        run = RunDir(tmp_path / by)
        for stage in (run_teacher, run_snapshot, run_pairs):
            stage(cfg, run)
        out = run_distill(cfg, run, start=tiny_model_dir)
        selection = json.loads((out / "selection.json").read_text())
        kept[by] = set(selection["pairs"])
        info = run.manifest()["stages"]["distill"]
        assert info["selection"]["kept"] == len(kept[by]) == info["pairs"] // 2
        assert info["steps"] == math.ceil(len(kept[by]) / 2)
    pairs, q_w = read_pairs(run.output("pairs")), load_model(str(tiny_model_dir))
    nll, cut = [], 0
    for pair in pairs:
        prompt_ids, chosen_ids = chat_ids(tokenizer, pair["prompt"], pair["chosen"][0]["content"], pair["chosen_truncated"])
        scored = chosen_ids[: max_length - len(prompt_ids)]
        cut += len(scored) < len(chosen_ids)
        nll.append(-answer_logp(q_w, prompt_ids, scored) / len(scored))
    assert cut >= len(pairs) // 4, cut
    assert selection["teacher_nll"]["all"] == pytest.approx(sum(nll) / len(nll), abs=1e-3)
    assert kept["teacher_nll"] == set(sorted(range(len(pairs)), key=nll.__getitem__)[: len(pairs) // 2])
    assert kept["random"] != kept["teacher_nll"]
    mean = lambda rows: sum(nll[i] for i in rows) / len(rows)
    assert mean(kept["teacher_nll"]) < mean(kept["random"])
