from transformers import AutoModelForCausalLM

from soda_distill.config import load_config
from soda_distill.distill import run_distill
from soda_distill.manifest import RunDir
from soda_distill.pairs import run_pairs
from soda_distill.snapshot import run_snapshot
from soda_distill.teacher import run_teacher
from soda_distill.training import read_metrics


def test_dpo_raises_reward_margin_and_accuracy(tmp_path, qa_file, tiny_model_dir):
    cfg = load_config(None, [
        f"teacher.file={qa_file}", f"student.model={tiny_model_dir}", "snapshot.max_new_tokens=12", "snapshot.temperature=1.0",
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
