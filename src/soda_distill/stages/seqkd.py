"""The SeqKD baseline: SFT of q0 on the teacher's answers run to its best point — the step at which the loss on
teacher answers it never trained on is least — instead of SODA's fixed-length warmup.

A seeded share of the teacher's answers (`seqkd.heldout`) is held out; the rest trains for at most `seqkd.epochs`,
the held-out loss measured `evals_per_epoch` times an epoch, stopping once `patience` measurements in a row have not
lowered it (transformers' EarlyStoppingCallback). The model of the best measurement is the one saved.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from transformers import EarlyStoppingCallback

from ..config import Config, fingerprint
from ..errors import SodaError
from ..manifest import RunDir, combine
from ..records import read_metrics, sha256_file
from ..training import train_and_save
from .warmup import build_sft_trainer, student_and_answers


def heldout_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded draw of `fraction` of n examples, at least one: those held out."""
    return sorted(random.Random(seed).sample(range(n), max(1, round(fraction * n))))


def heldout_split(dataset, fraction: float, seed: int):
    """(train, held-out) of a data set, as `heldout_indices` draws them."""
    held = heldout_indices(len(dataset), fraction, seed)
    return dataset.select([i for i in range(len(dataset)) if i not in set(held)]), dataset.select(held)


def run_seqkd(cfg: Config, run: RunDir) -> Path:
    s = cfg.seqkd
    teacher_path, out = run.output("teacher"), run.output("seqkd")
    fp = combine(fingerprint(s), fingerprint(cfg.student), sha256_file(teacher_path))
    if run.done("seqkd", fp):
        return out
    with run.stage("seqkd", fp) as info:
        model, tokenizer, dataset, counts = student_and_answers(cfg, teacher_path, s)
        if len(dataset) < 2:
            raise SodaError(f"{teacher_path}: SeqKD needs at least 2 teacher answers (one held out), found {len(dataset)}")
        train, heldout = heldout_split(dataset, s.heldout, s.seed)
        steps_per_epoch = math.ceil(len(train) / (s.batch_size * s.gradient_accumulation_steps))
        every = max(1, steps_per_epoch // s.evals_per_epoch)
        trainer = build_sft_trainer(
            model, tokenizer, train, cfg, out, out / "metrics.jsonl", section=s, eval_dataset=heldout,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=s.patience)],
            eval_strategy="steps", eval_steps=every, save_steps=every,  # the best model needs a checkpoint at each evaluation
            per_device_eval_batch_size=s.batch_size, load_best_model_at_end=True,
            metric_for_best_model="eval_loss", greater_is_better=False,
        )
        info.update(examples=len(train), heldout=len(heldout), eval_every_steps=every, **counts, **train_and_save(trainer, out))
        info["heldout_loss"] = [{"step": m["step"], "loss": round(m["eval_loss"], 4)}
                                for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m]
    return out
