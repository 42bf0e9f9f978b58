"""What the warmup (SFT) and distill (DPO) stages share: trainer settings, per-step metrics, resume and save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .config import TrainingConfig
from .records import atomic_write_text


def trainer_arguments(section: TrainingConfig, output_dir: Path, bf16: bool) -> dict:
    """Keyword arguments common to TRL's SFTConfig and DPOConfig, from a training section of our config."""
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=section.epochs,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=section.batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        max_length=section.max_length,
        lr_scheduler_type=section.lr_scheduler,
        warmup_steps=section.warmup_ratio,
        weight_decay=section.weight_decay,
        max_grad_norm=section.max_grad_norm,
        seed=section.seed,
        activation_checkpointing=section.gradient_checkpointing,
        bf16=bf16,  # autocast to bf16 around fp32 master weights
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=1,
        logging_steps=section.logging_steps,
        report_to="none",
        dataloader_num_workers=0,
        # Batches of similar lengths: with random batches over half of every batch was padding.
        train_sampling_strategy="group_by_length",
        use_cpu=not torch.cuda.is_available(),
    )


class MetricsLog(TrainerCallback):
    """Append every logged step to `metrics.jsonl`; on resume, drop the steps after the checkpoint first."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        kept = [m for m in read_metrics(self.path) if m.get("step", 0) <= state.global_step]
        atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **(logs or {})}) + "\n")


def train_and_save(trainer, final_dir: Path) -> dict:
    """Train (resuming from the newest checkpoint if one exists), save the final model, drop the checkpoints."""
    checkpoints = Path(trainer.args.output_dir)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(final_dir))
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "resumed_from_step": int(Path(last).name.split("-")[-1]) if last else None,
    }


def read_metrics(path: Path) -> list[dict]:
    """Every logged step; a torn last line (a kill mid-write) is left out, as on resume."""
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return steps
