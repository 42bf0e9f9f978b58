"""Stage 5 — distill: DPO on D_pref from q_w, with q_w as the frozen reference (strength β).

The pairs are tokenized here as TRL would (chat_tokens.py), except that an answer cut at its token limit gets no
end of turn.

The reference log-probabilities of every chosen and rejected response are computed once, before training,
from q_w itself (TRL's `precompute_ref_log_probs`), so no second model is resident while training; they are kept
beside the tokenized pairs in the stage's checkpoints folder, so a resumed run does not compute them again.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer

from ..chat_tokens import chat_ids
from ..config import Config
from ..distributed import is_main, main_first, rank, sharded_weights, world_size, zero_stage
from ..errors import SodaError
from ..generation import Sampling
from ..cpu import add_cpu_lm_head, apply_cpu_settings
from ..keys import KeyParts
from ..manifest import RunDir, StageResult
from ..models import load_model, load_tokenizer, use_bf16
from ..pipeline import execute
from ..records import read_metrics, read_pairs
from .refresh import Refresh, RefreshRejected
from .selection import select_pairs
from ..training import (MetricsLog, ResumableOrder, StepLog, TrainResult, ends, peft_config, train_and_save,
                        trainer_arguments)


@dataclass
class DistillResult(StageResult):
    pairs: int  # trained on
    dropped_prompt_too_long: int
    training: TrainResult
    selection: dict | None = None  # distill.select: the band kept (selection.py)
    refresh: dict | None = None  # distill.refresh_every: the refreshes' figures (refresh.py)
    reward_margin: dict | None = None  # {first, last} logged step
    reward_accuracy: dict | None = None


def distill_key(cfg: Config) -> KeyParts:
    """The LoRA settings where set; with refreshes, the snapshot's sampling and the truncated-answer policy, which
    then make the rejected answers too."""
    every = cfg.distill.refresh_every
    return KeyParts([cfg.student.lora, *([cfg.snapshot, cfg.pairs.truncated_rejected] if every else [])])


def dpo_dataset(pairs_path: Path, tokenizer, max_length: int, numbered: bool = False):
    """The pairs tokenized as TRL's DPO tokenizes conversations, a cut answer without its end of turn
    (chat_tokens.py), with each pair's length for the length-grouped sampler; longest first, so the one sequential
    pass of reference log-probabilities pads little. A pair whose prompt alone fills max_length is left out, as TRL
    does (nothing of its answers would be trained). `numbered`: each row keeps its line in the pairs file (`pair`).
    Returns the data set and how many were left out."""
    from datasets import Dataset

    rows = []
    for number, pair in enumerate(read_pairs(pairs_path)):
        prompt_ids, chosen_ids = chat_ids(tokenizer, pair["prompt"], pair["chosen"][0]["content"], pair["chosen_truncated"])
        _, rejected_ids = chat_ids(tokenizer, pair["prompt"], pair["rejected"][0]["content"], pair["rejected_truncated"])
        rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
                     "length": len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)),
                     **({"pair": number} if numbered else {})})
    kept = [r for r in rows if len(r["prompt_ids"]) < max_length]
    if not kept:
        raise SodaError(f"{pairs_path}: no pair whose prompt fits distill.max_length ({max_length} tokens)")
    kept.sort(key=lambda r: r["length"], reverse=True)
    return Dataset.from_list(kept), len(rows) - len(kept)


def on_disk(dataset, folder: Path):
    """The data set saved in `folder` (kept there if it is already) and read back from it: TRL then caches the
    reference log-probabilities beside it, where every rank reads them and a resumed run finds them."""
    from datasets import load_from_disk

    with main_first():
        if is_main() and not (folder / "state.json").exists():
            tmp = folder.with_name(f".{folder.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            dataset.save_to_disk(str(tmp))
            os.replace(tmp, folder)
        return load_from_disk(str(folder))


class DistillDPOTrainer(StepLog, ResumableOrder, DPOTrainer):
    """TRL's DPOTrainer, computing the reference log-probabilities with the training forward: this package's CPU
    head, under bf16 autocast when training uses it (so at step 0 the policy's log-probabilities equal the
    reference's), from data already tokenized by `dpo_dataset`."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        if "prompt_ids" in dataset.column_names:  # dpo_dataset's: a cut answer has no end of turn to add back
            return dataset
        return super()._prepare_dataset(dataset, *args, **kwargs)

    def _precompute_ref_logps(self, *args, **kwargs):
        apply_cpu_settings(self)  # TRL calls this from its __init__ after patching in its head: ours goes on top
        if self.ref_model is not None and self.model.device.type == "cpu" and not self.is_deepspeed_enabled:
            # q_w's copy computes as the policy does (under DeepSpeed it is an engine, and the head is not used)
            add_cpu_lm_head(self.ref_model)
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            return super()._precompute_ref_logps(*args, **kwargs)


class RefreshingDPOTrainer(RefreshRejected, DistillDPOTrainer):
    """DistillDPOTrainer whose rejected answers are generated again every `distill.refresh_every` steps (refresh.py)."""


def build_dpo_trainer(model, tokenizer, dataset, cfg: Config, output_dir: Path, metrics_path: Path, ref_model=None):
    d = cfg.distill
    args = DPOConfig(
        **trainer_arguments(d, output_dir / "checkpoints", cfg),
        beta=d.beta,
        loss_type=[d.loss_type] if isinstance(d.loss_type, str) else d.loss_type,
        loss_weights=d.loss_weights,
        use_weighting=d.use_weighting,
        ld_alpha=d.ld_alpha,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=d.precompute_batch_size,
        remove_unused_columns=False,  # keeps `length` for the length-grouped sampler; TRL's collator reads its own keys
    )
    # With LoRA, a fresh adapter on q_w, and q_w itself (the adapter off) the reference: TRL's peft path.
    return (RefreshingDPOTrainer if d.refresh_every else DistillDPOTrainer)(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[MetricsLog(metrics_path)], peft_config=peft_config(cfg.student.lora),
    )


def distill_body(cfg: Config, run: RunDir, inputs: dict[str, Path]) -> DistillResult:
    """DPO from `inputs["warmup"]` (q_w, or the model run_distill was given), saved in `distill/`."""
    start, pairs_path, out = inputs["warmup"], inputs["pairs"], run.output("distill")
    every = cfg.distill.refresh_every
    if every and sharded_weights():  # each rank generates its own answers alone
        raise SodaError("distill.refresh_every needs the whole model on each rank: launch with DDP or DeepSpeed "
                        "ZeRO-1/2, not FSDP or ZeRO-3")
    tokenizer = load_tokenizer(str(start), cfg.student.trust_remote_code)
    load = lambda: load_model(str(start), trust_remote_code=cfg.student.trust_remote_code,
                              quantize=cfg.student.quantize, bf16=use_bf16(cfg.student.bf16))
    model = load()
    numbered = bool(every or cfg.distill.select)
    dataset, prompt_too_long = dpo_dataset(pairs_path, tokenizer, cfg.distill.max_length, numbered=numbered)
    dataset = on_disk(dataset, out / "checkpoints" / ("pairs-numbered" if numbered else "pairs"))
    # A copy of q_w as the reference where it is needed: for refreshed answers while training (under LoRA the
    # adapter-off model serves), and under ZeRO-3 (LoRA or not), where TRL's reference pass through the policy
    # itself leaves DeepSpeed hooks on it that break training's first step.
    ref_model = load() if (every and not cfg.student.lora) or zero_stage() == 3 else None
    trainer = build_dpo_trainer(model, tokenizer, dataset, cfg, out, out / "metrics.jsonl", ref_model)
    selection = None
    if cfg.distill.select:  # ranked by the reference pass TRL has just made
        trainer.train_dataset, selection = select_pairs(trainer.train_dataset, cfg.distill.select,
                                                        cfg.distill.select_band, cfg.distill.seed,
                                                        cfg.distill.max_length, out)
    if every:
        s = cfg.snapshot
        trainer.refresh_with(Refresh(
            prompts=[pair["prompt"] for pair in read_pairs(pairs_path)], every=every,
            sampling=Sampling(s.max_new_tokens, s.temperature, s.top_p, s.seed), batch_size=s.batch_size,
            drop_truncated=cfg.pairs.truncated_rejected == "drop",
            folder=out / "refreshed" / (f"rank-{rank()}" if world_size() > 1 else "")))
    training = train_and_save(trainer, out)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "rewards/margins" in m]
    return DistillResult(pairs=len(dataset), dropped_prompt_too_long=prompt_too_long, training=training,
                         selection=selection, refresh=trainer.refresh.summary() if every else None,
                         reward_margin=ends(steps, "rewards/margins"), reward_accuracy=ends(steps, "rewards/accuracies"))


def run_distill(cfg: Config, run: RunDir, start: Path | None = None) -> Path:
    """The distill stage (pipeline.execute): DPO from `start` (default: this run's warmup model q_w, its input as the
    registry declares it; another model is keyed in its place), unless finished."""
    return execute("distill", cfg, run, inputs={"warmup": start} if start else None)
