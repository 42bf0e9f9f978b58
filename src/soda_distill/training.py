"""What the training stages share: trainer settings, per-step metrics, resume and save."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import Config, LoraSettings, TrainingConfig
from .distributed import is_main, world_size, zero_stage
from .errors import SodaError
from .cpu.master_weights import MasterWeightsAdamW
from .manifest import StageResult
from .models import load_model, transformers_model, use_bf16
from .records import atomic_write_text, read_metrics
from .tracking import tracker_arguments


def trainer_arguments(section: TrainingConfig, output_dir: Path, cfg: Config) -> dict:
    """Keyword arguments common to TRL's trainer configs, from a training section of our config (`output_dir`: the
    stage's checkpoints folder)."""
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=section.epochs,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=section.batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        max_length=section.max_length,
        lr_scheduler_type=section.lr_scheduler,
        warmup_steps=section.warmup_ratio,  # below 1, transformers reads it as a fraction of the steps
        weight_decay=section.weight_decay,
        max_grad_norm=section.max_grad_norm,
        seed=section.seed,
        activation_checkpointing=section.gradient_checkpointing,
        bf16=use_bf16(cfg.student.bf16),  # autocast to bf16 around fp32 master weights
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=1,
        logging_steps=section.logging_steps,
        **tracker_arguments(cfg, Path(output_dir).parent),
        dataloader_num_workers=0,
        # Batches of similar lengths: with random batches over half of every batch was padding.
        train_sampling_strategy="group_by_length",
        use_cpu=not torch.cuda.is_available(),
    )


def peft_config(lora: LoraSettings | None, task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig from `student.lora` (None: full fine-tuning), for a trainer's `peft_config`."""
    if lora is None:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise SodaError("student.lora needs peft: pip install peft") from None
    return LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules or "all-linear")


class MetricsLog(TrainerCallback):
    """Append every logged step to `metrics.jsonl`; on resume, drop the steps after the checkpoint first."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        kept = [m for m in read_metrics(self.path) if m.get("step", 0) <= state.global_step]
        atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **(logs or {})}) + "\n")


class EpochSeededSampler(Sampler):
    """A trainer's sampler whose order in each epoch depends on the seed and the epoch alone.

    transformers resumes mid-epoch by skipping the batches that epoch already trained, so a resumed run must draw the
    epoch's order again as it was. Its length-grouped sampler shuffles with the global RNG, TRL's GRPO sampler with a
    generator seeded once; a resumed run starts both afresh, so past the first epoch it drew another order and skipped
    the wrong batches, training some examples twice that epoch and others not at all.
    """

    def __init__(self, sampler, seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's data loader calls this as each epoch starts
        self.epoch = epoch

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch)
            if getattr(self.sampler, "generator", None) is not None:
                self.sampler.generator.manual_seed(self.seed + self.epoch)
            return iter(list(self.sampler))


class LengthBuckets(Sampler):
    """Batches of similar lengths drawn from up to 50 batches' worth of examples, in random order (the longest first,
    so running out of memory shows at once).

    transformers' LengthGroupedSampler sorts within min(n // (4 × batch), 50) batches' worth: one or two batches on a
    data set of a few dozen examples, which groups nothing (SFT batches of the throughput bench were 44% padding)."""

    def __init__(self, lengths: list[int], batch_size: int):
        self.lengths, self.batch_size = lengths, batch_size

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        indices = get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=50)
        first, *rest = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        # a short last batch stays last: moved earlier, it would shift every later batch's boundaries
        last = [rest.pop()] if rest and len(rest[-1]) < self.batch_size else []
        rest = [rest[i] for i in torch.randperm(len(rest)).tolist()]
        return iter([i for batch in [first, *rest, *last] for i in batch])


class StepLog:
    """Trainer mixin, through the public `log`: the figures a loss records per training micro-batch (`record`),
    averaged into the next log line; and the fp32 masters' gradient norm where `MasterWeightsAdamW` trains (the
    trainer measures the bf16 weights', which hold none)."""

    def __init__(self, *args, **kwargs):
        self.recorded: dict[str, list[float]] = defaultdict(list)
        super().__init__(*args, **kwargs)

    def record(self, key: str, value: float) -> None:
        self.recorded[key].append(value)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.model.training:  # not an evaluation's line
            logs.update({k: sum(v) / len(v) for k, v in self.recorded.items()})
            self.recorded.clear()
        masters = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
        if "grad_norm" in logs and isinstance(masters, MasterWeightsAdamW) and masters.grad_norm is not None:
            logs["grad_norm"] = masters.grad_norm
        super().log(logs, *args, **kwargs)


class ResumableOrder:
    """Mixin for a Trainer: its training order from EpochSeededSampler, so that a resumed run repeats it, and
    length-grouped batches from LengthBuckets, a group per optimizer step across all processes (accelerate then
    deals its micro-batches out to the ranks), so that N processes train on the batches one process accumulates."""

    def _get_train_sampler(self, *args, **kwargs):
        sampler = super()._get_train_sampler(*args, **kwargs)
        if isinstance(sampler, LengthGroupedSampler):  # its batch: one optimizer step's of one process; ours: of all
            sampler = LengthBuckets(sampler.lengths, sampler.batch_size * self.args.world_size)
        self.train_order = EpochSeededSampler(sampler, self.args.seed)  # refresh.py reads the coming steps' rows here
        return self.train_order

    def _run_epoch(self, *args, **kwargs):
        # A resumed epoch's loader under several processes wraps the sampler in SkipBatchSampler(BatchSamplerShard(…)),
        # where neither accelerate's set_epoch nor transformers' reaches it: that epoch would be drawn in epoch 0's order.
        self.train_order.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)


def last_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint in `folder` that is whole: transformers writes one in place, its trainer_state.json last,
    so a kill mid-save leaves a newer one without it (or with half of it)."""
    steps = {}
    for state in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*/{TRAINER_STATE_NAME}"):
        try:
            steps[json.loads(state.read_text())["global_step"]] = str(state.parent)
        except (OSError, ValueError, KeyError):
            continue
    return steps[max(steps)] if steps else None


LAUNCH = "launch.json"  # in a stage's checkpoints folder: how many processes wrote its checkpoints


def same_launch(checkpoints: Path, resuming: bool) -> None:
    """Refuse to resume checkpoints written by another number of processes (the steps of an epoch, the batches
    each rank has seen and the optimizer's sharding all depend on it); record the number for a later resume."""
    path = checkpoints / LAUNCH
    written = json.loads(path.read_text())["processes"] if resuming and path.exists() else world_size()
    if written != world_size():
        raise SodaError(f"{checkpoints}: these checkpoints were written by {written} process(es), and this run has "
                        f"{world_size()}; resume with {written} (torchrun --nproc_per_node {written}), or delete "
                        f"{checkpoints} to start the stage again")
    if is_main():
        atomic_write_text(path, json.dumps({"processes": world_size()}) + "\n")


def save_final(trainer, final_dir: Path) -> None:
    """The trained model in `final_dir`: the trainer saves it (gathering sharded weights), or with LoRA,
    `save_model_folder` does."""
    if not hasattr(trainer.model, "merge_and_unload"):
        trainer.save_model(str(final_dir))
    elif zero_stage() == 3:  # every rank gathers ZeRO-3's shards for the merge (which is then let go, unsaved)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
            if trainer.args.should_save:
                save_model_folder(trainer.model, trainer.processing_class, final_dir)
    elif trainer.args.should_save:
        save_model_folder(trainer.model, trainer.processing_class, final_dir)


def save_model_folder(model, tokenizer, folder: Path) -> None:
    """A model and its tokenizer in `folder`; trained with LoRA, its adapter in `folder/adapter` and the model with the
    adapter merged in `folder`, a plain transformers model that the next stage and the evaluation load as any."""
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder / "adapter")
        if getattr(transformers_model(model), "is_quantized", False):
            # QLoRA: merged into NF4 weights the update would be rounded away; merged into the base at full
            # precision, reloaded from where it was loaded, instead
            from peft import PeftModel

            base = load_model(model.peft_config["default"].base_model_name_or_path)
            model = PeftModel.from_pretrained(base, folder / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@dataclass
class TrainResult(StageResult):
    """What every training stage records of its training (train_and_save)."""

    steps: int
    train_loss: float
    resumed_from_step: int | None  # the checkpoint this piece resumed from; None: from the start
    best_step: int | None = None  # where the trainer keeps the best model (load_best_model_at_end): its step
    best_eval_loss: float | None = None


def ends(steps: list[dict], key: str) -> dict | None:
    """{first, last} of a per-step metric over logged steps (metrics.jsonl), None for no steps."""
    return {"first": steps[0][key], "last": steps[-1][key]} if steps else None


def train_and_save(trainer, final_dir: Path) -> TrainResult:
    """Train (resuming from the newest whole checkpoint if there is one), save the final model — or the best one,
    where the trainer keeps the best (`load_best_model_at_end`); trained with fp32 masters: the masters, in fp32 —
    and drop the checkpoints."""
    checkpoints = Path(trainer.args.output_dir)
    last = last_checkpoint(checkpoints)
    same_launch(checkpoints, resuming=last is not None)
    result = trainer.train(resume_from_checkpoint=last)
    masters = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
    best = trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    if isinstance(masters, MasterWeightsAdamW):
        if best:
            masters.load_masters(Path(best))
        masters.copy_into(trainer.model)
    save_final(trainer, Path(final_dir))
    if is_main():
        # Trainer states first, so that a kill part-way leaves no checkpoint that looks whole with files missing (the
        # stage then trains again from the start, to the same result, instead of failing to resume).
        for state in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*/{TRAINER_STATE_NAME}"):
            state.unlink()
        shutil.rmtree(checkpoints, ignore_errors=True)
    return TrainResult(
        steps=trainer.state.global_step, train_loss=round(result.training_loss, 4),
        resumed_from_step=int(Path(last).name.split("-")[-1]) if last else None,
        **({"best_step": trainer.state.best_global_step, "best_eval_loss": round(trainer.state.best_metric, 4)} if best else {}),
    )
