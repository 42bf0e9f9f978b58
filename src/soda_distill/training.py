"""What the training stages share: trainer settings, per-step metrics, resume and save."""

from __future__ import annotations

import ctypes
import functools
import json
import shutil
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import Config, LoraSettings, TrainingConfig
from .distributed import is_main, world_size, zero_stage
from .errors import SodaError
from .lm_head import add_cpu_lm_head
from .models import load_model, use_bf16
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


def transformers_model(model):
    """The transformers model inside a peft adapter model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_cpu_settings(trainer):
    """This package's settings for an SFT or DPO trainer that trains on CPU: the LM head of `lm_head.py`, glibc
    giving freed memory back (`return_freed_memory`) and `bf16_weights`. Idempotent: TRL's DPO trainer needs it
    applied from inside its constructor."""
    if trainer.model.device.type != "cpu":
        return trainer
    if not getattr(trainer, "use_weighting", False):  # WPO weights need log Σp², which only TRL's head returns
        add_cpu_lm_head(transformers_model(trainer.model))
    return_freed_memory()
    return bf16_weights(trainer)


def bf16_weights(trainer):
    """Train with `adamw_for`'s choice: bf16 weights and fp32 masters where the trainer trains in bf16 on CPU, the
    trainer then clipping and reporting the masters' gradients (the bf16 weights hold none)."""
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    if optimizer_cls is not torch.optim.AdamW:
        return trainer
    adamw = adamw_for(trainer.model, trainer.args.bf16)
    trainer.optimizer_cls_and_kwargs = (adamw, kwargs)
    if adamw is MasterWeightsAdamW:
        if getattr(trainer, "ref_model", None) is not None:  # GRPO's frozen reference computes as the policy does
            weights_to(trainer.ref_model, torch.bfloat16)
        masters = lambda: getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
        trainer._clip_grad_norm = lambda model: masters().clip_grad_norm_(trainer.args.max_grad_norm)
        trainer._get_grad_norm = lambda model, grad_norm=None: float(
            masters().clip_grad_norm_(float("inf")) if grad_norm is None else grad_norm)
    return trainer


def adamw_for(model, bf16: bool) -> type[torch.optim.AdamW]:
    """The AdamW to train `model` with: on CPU in bf16, `MasterWeightsAdamW` (bf16 weights, fp32 masters); otherwise
    AdamW over fp32 weights (under autocast where bf16 is on). Not across processes (the masters take each gradient as
    soon as it is computed, before DDP has averaged it), nor with LoRA (the frozen weights, rounded to bf16, would be
    merged so)."""
    if (not (bf16 and next(model.parameters()).device.type == "cpu") or world_size() > 1
            or hasattr(model, "peft_config")):
        return torch.optim.AdamW
    for p in model.parameters():
        if p.dtype != torch.bfloat16:  # the fp32 value stays with it, for MasterWeightsAdamW's master
            p._soda_fp32 = p.data
    weights_to(model, torch.bfloat16)
    return MasterWeightsAdamW


def weights_to(model, dtype: torch.dtype) -> None:
    """The model's parameters in `dtype`, its buffers left as they are: `model.to` would round the rotary
    embedding's fp32 frequencies too (by up to 0.0014 per position for SmolLM2)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


class MasterWeightsAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies of a model's weights, which it turns to bf16.

    Under autocast around fp32 weights, every step casts each weight to bf16, runs the residual stream, norms and
    activations in fp32 and casts their gradients back; with bf16 weights the model computes in bf16 throughout, which
    is faster on a CPU (docs/results/precision.md). Each backward's bf16 gradient is added
    into the master's fp32 one as soon as it is complete, so micro-batches of gradient accumulation add up in fp32, and
    the update is made on the masters: at a learning rate of 5e-6 most steps are far below bf16's resolution for a
    weight and would round away. The masters are saved with the optimizer's state, so a resumed run continues from
    them and not from bf16 weights. The gradients live on the masters: clip them with `clip_grad_norm_`.

    The masters are the weights before they were rounded (`adamw_for` keeps them): masters taken from bf16 weights
    all lie on bf16's grid, and every update smaller than half a step of it then never reaches the forward pass (the
    demo's SFT loss plateaued 0.24 nats above fp32's). From fp32 masters, the bf16 weights are what autocast would
    cast them to.
    """

    def __init__(self, params, **kwargs):
        groups = list(params)
        groups = groups if isinstance(groups[0], dict) else [{"params": groups}]
        self.model_params = [p for group in groups for p in group["params"]]
        super().__init__([{**group, "params": [_master(p) for p in group["params"]]} for group in groups], **kwargs)
        self.masters = [m for group in self.param_groups for m in group["params"]]
        for p in self.model_params:
            p.data = p.data.to(torch.bfloat16)
        for p, master in zip(self.model_params, self.masters):
            if hasattr(p, "_soda_master_hook"):  # an earlier optimizer of the same model
                p._soda_master_hook.remove()
            p._soda_master_hook = p.register_post_accumulate_grad_hook(functools.partial(_accumulate, master))

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for p, master in zip(self.model_params, self.masters):
            p.copy_(master)
            master.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for master in self.masters:
            master.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.masters, max_norm)

    @torch.no_grad()
    def copy_into(self, model) -> None:
        """The model back in fp32, holding the masters exactly: what a stage saves, so that the progress below bf16's
        resolution is not rounded away at the hand-off to the next stage."""
        weights_to(model, torch.float32)
        for p, master in zip(self.model_params, self.masters, strict=True):
            p.copy_(master)

    def state_dict(self):
        return {**super().state_dict(), "master_weights": self.masters}

    @torch.no_grad()
    def load_masters(self, checkpoint: Path) -> None:
        """The masters a checkpoint saved (its bf16 weights lack their low bits): for the trainer's best model."""
        for master, saved in zip(self.masters, torch.load(checkpoint / OPTIMIZER_NAME, weights_only=True)["master_weights"],
                                 strict=True):
            master.copy_(saved)

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        if "master_weights" not in state_dict:
            raise SodaError("this checkpoint's optimizer state has no fp32 master weights: it was written with bf16 "
                            "off (student.bf16); resume with the setting it was written with, or delete the stage's "
                            "checkpoints to start it again")
        masters = state_dict.pop("master_weights")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for master, saved in zip(self.masters, masters, strict=True):
                master.copy_(saved)


def _master(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master of a weight: the value `adamw_for` kept before rounding it (a tensor no one else holds), else
    a copy of the weight in fp32."""
    kept = param.__dict__.pop("_soda_fp32", None)
    return kept if kept is not None else param.detach().to(torch.float32, copy=True)


@torch.no_grad()
def _accumulate(master: torch.Tensor, param: torch.nn.Parameter) -> None:
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad.add_(param.grad)
    param.grad = None


def return_freed_memory() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own, and unmap it when it is freed.

    By default the threshold rises with the largest block freed so far (up to 32 MiB); from then on activation-sized
    tensors come from the heap, which fragments and keeps its high-water mark. Fixing it took 0.9 GB off DPO's peak
    RSS here, at no measurable cost in speed. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


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


def train_and_save(trainer, final_dir: Path) -> dict:
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
    return {
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "resumed_from_step": int(Path(last).name.split("-")[-1]) if last else None,
        **({"best_step": trainer.state.best_global_step, "best_eval_loss": round(trainer.state.best_metric, 4)} if best else {}),
    }
