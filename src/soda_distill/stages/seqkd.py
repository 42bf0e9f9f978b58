"""The SeqKD baseline: SFT of q0 on the teacher's answers run to its best point — the step at which the loss on
teacher answers it never trained on is least — instead of SODA's fixed-length warmup.

A seeded share of the teacher's answers (`seqkd.heldout`) is held out; the rest trains for at most `seqkd.epochs`,
the held-out loss measured `evals_per_epoch` times an epoch, stopping once `patience` measurements in a row have not
lowered it (transformers' EarlyStoppingCallback). The model of the best measurement is the one saved.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from transformers import EarlyStoppingCallback

from ..config import Config
from ..errors import SodaError
from ..manifest import RunDir, StageResult
from ..pipeline import execute
from ..records import read_metrics
from ..training import TrainResult, train_and_save
from .warmup import build_sft_trainer, student_and_answers


@dataclass
class SeqkdResult(StageResult):
    examples: int  # trained on
    heldout: int
    eval_every_steps: int
    truncated_kept_open: int  # as warmup's (sft_dataset's counts)
    dropped_truncated: int
    training: TrainResult  # with the best step and its held-out loss
    heldout_loss: list  # {step, loss} of every measurement
    teacher_kl_unaligned: int | None = None


def heldout_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded draw of `fraction` of n examples, at least one: those held out."""
    return sorted(random.Random(seed).sample(range(n), max(1, round(fraction * n))))


def heldout_split(dataset, fraction: float, seed: int):
    """(train, held-out) of a data set, as `heldout_indices` draws them."""
    held = heldout_indices(len(dataset), fraction, seed)
    return dataset.select([i for i in range(len(dataset)) if i not in set(held)]), dataset.select(held)


def seqkd_body(cfg: Config, run: RunDir, inputs: dict[str, Path]) -> SeqkdResult:
    """Train to the least held-out loss and save that model in `seqkd/`."""
    s = cfg.seqkd
    teacher_path, out = inputs["teacher"], run.output("seqkd")
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
    training = train_and_save(trainer, out)
    return SeqkdResult(examples=len(train), heldout=len(heldout), eval_every_steps=every, **counts, training=training,
                       heldout_loss=[{"step": m["step"], "loss": round(m["eval_loss"], 4)}
                                     for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m])


def run_seqkd(cfg: Config, run: RunDir) -> Path:
    """The SeqKD stage (pipeline.execute): its model, unless finished."""
    return execute("seqkd", cfg, run)
