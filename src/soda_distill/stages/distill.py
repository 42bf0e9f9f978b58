"""Stage 5 — distill: DPO on D_pref from q_w, with q_w as the frozen reference (strength β).

The reference log-probabilities of every chosen and rejected response are computed once, before training,
from q_w itself (TRL's `precompute_ref_log_probs`), so no second model is resident while training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer

from ..config import Config, fingerprint
from ..manifest import RunDir, combine
from ..models import load_model, load_tokenizer, model_digest, use_bf16
from ..records import read_metrics, read_pairs, sha256_file
from ..training import MetricsLog, ResumableOrder, apply_cpu_settings, train_and_save, trainer_arguments


def dpo_dataset(pairs_path: Path):
    """The pairs, longest first (by characters, a close enough proxy for tokens): the one sequential pass of
    reference log-probabilities then pads little."""
    from datasets import Dataset

    rows = read_pairs(pairs_path)
    size = lambda r: sum(len(m["content"]) for m in r["prompt"]) + max(len(r["chosen"][0]["content"]), len(r["rejected"][0]["content"]))
    rows.sort(key=size, reverse=True)
    return Dataset.from_list(rows)


class DistillDPOTrainer(ResumableOrder, DPOTrainer):
    """TRL's DPOTrainer, computing the reference log-probabilities with the training forward: this package's CPU
    head, under bf16 autocast when training uses it (so at step 0 the policy's log-probabilities equal the
    reference's)."""

    def _precompute_ref_logps(self, *args, **kwargs):
        apply_cpu_settings(self)  # TRL calls this from its __init__ after patching in its head: ours goes on top
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            return super()._precompute_ref_logps(*args, **kwargs)


def build_dpo_trainer(model, tokenizer, dataset, cfg: Config, output_dir: Path, metrics_path: Path):
    d = cfg.distill
    args = DPOConfig(
        **trainer_arguments(d, output_dir / "checkpoints", use_bf16(cfg.student.bf16)),
        beta=d.beta,
        loss_type=[d.loss_type],
        use_weighting=d.use_weighting,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=d.precompute_batch_size,
        remove_unused_columns=False,  # keeps `length` for the length-grouped sampler; TRL's collator reads its own keys
    )
    trainer = DistillDPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[MetricsLog(metrics_path)],
    )
    # The length-grouped sampler needs each pair's padded length; TRL's tokenized columns give it exactly.
    ds = trainer.train_dataset
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    trainer.train_dataset = ds.add_column(args.length_column_name, lengths)
    return trainer


def run_distill(cfg: Config, run: RunDir, start: Path | None = None) -> Path:
    """DPO from `start` (default: this run's warmup model q_w)."""
    start = start or run.output("warmup")
    pairs_path, out = run.output("pairs"), run.output("distill")
    fp = combine(fingerprint(cfg.distill), sha256_file(pairs_path), model_digest(start))
    if run.done("distill", fp):
        return out
    with run.stage("distill", fp) as info:
        tokenizer = load_tokenizer(str(start), cfg.student.trust_remote_code)
        model = load_model(str(start), trust_remote_code=cfg.student.trust_remote_code)
        dataset = dpo_dataset(pairs_path)
        trainer = build_dpo_trainer(model, tokenizer, dataset, cfg, out, out / "metrics.jsonl")
        info.update(pairs=len(dataset), **train_and_save(trainer, out))
        steps = [m for m in read_metrics(out / "metrics.jsonl") if "rewards/margins" in m]
        if steps:
            info["reward_margin"] = {"first": steps[0]["rewards/margins"], "last": steps[-1]["rewards/margins"]}
            info["reward_accuracy"] = {"first": steps[0]["rewards/accuracies"], "last": steps[-1]["rewards/accuracies"]}
    return out
