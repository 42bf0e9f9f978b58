"""The on-policy dial — `distill.refresh_every: k`: every k optimizer steps the rejected answers of the pairs the next
k steps train on are generated again, by the student as it is at that step.

Unset, the rejected answers stay q0's (SODA: one snapshot); k = 1 gives each step negatives from the policy of that
step (on-policy DPO). The chosen answers and the reference stay as they are: q_w scores every new answer, as the
adapter-off model under LoRA (no second model) and otherwise as a frozen copy of q_w kept beside the policy.

Batches reach `training_step` uncollated, so that a batch already drawn by the data loader (accelerate draws one
ahead) still trains on the answers of the latest refresh. Each refresh is written to `distill/refreshed/step-N.jsonl`
before its step trains (the pair's line in pairs.jsonl, the new answer, its tokens and q_w's log-probability); a
resumed run reads those up to its checkpoint's step and makes the later ones again.

Under several processes (DDP, ZeRO-1/2: each rank holds the whole model) each rank generates the answers of its own
micro-batches, at the same steps, into `refreshed/rank-R/`; the manifest's counts are summed over the ranks (the
refreshes: the steps refreshed; the seconds: the slowest rank's).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import send_to_device

from ..chat_tokens import chat_ids
from ..generation import Sampling, generate_transformers
from ..records import atomic_write_jsonl

DEFERRED = "examples"  # the key of a micro-batch not yet collated


@dataclass
class Refresh:
    prompts: list[list[dict]]  # by pair number (the `pair` column of the training rows)
    every: int
    sampling: Sampling  # the snapshot's; its seed and the step seed each refresh
    batch_size: int
    drop_truncated: bool  # pairs.truncated_rejected = drop: a new answer cut at its limit leaves the pair's old one
    folder: Path
    answers: dict[int, dict] = field(default_factory=dict)  # pair -> the fields of its latest rejected answer
    points: set[int] = field(default_factory=set)  # the steps refreshed so far
    stats: dict = field(default_factory=lambda: {"refreshes": 0, "answers": 0, "truncated": 0, "kept_previous": 0,
                                                  "generated_tokens": 0, "generation_s": 0.0, "reference_s": 0.0,
                                                  "late": 0})
    loaded: bool = False

    def resume(self, step: int) -> None:
        """Read the refreshes made up to `step` (the checkpoint's); those of later steps are made again."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob("step-*.jsonl")):
            point = int(path.stem.removeprefix("step-"))
            if point > step:
                path.unlink()
                continue
            records = [json.loads(line) for line in path.read_text().splitlines()]
            self.answers.update({record["pair"]: record for record in records})
            self.points.add(point)
            # the summary counts the refreshes before the stop too (their seconds were spent in another process)
            self.stats["refreshes"] += 1
            self.stats["answers"] += len(records)
            self.stats["truncated"] += sum(record["finish_reason"] == "length" for record in records)
        self.loaded = True

    def examples(self, trainer, examples: list[dict]) -> list[dict]:
        """A micro-batch's examples with the rejected answers of the latest refresh, refreshing first where this
        step starts a new round."""
        step = trainer.state.global_step
        if not self.loaded:
            self.resume(step)
        point = step // self.every * self.every
        if point > 0 and point not in self.points:
            self.run(trainer, point, [trainer.train_dataset[row] for row in block_rows(trainer, point, self.every)])
        if point > 0:  # the block's rows as the sampler was expected to draw them: any other is generated now
            late = [e for e in examples if self.answers.get(e["pair"], {}).get("step") != point]
            if late:
                self.stats["late"] += len(late)
                self.run(trainer, point, late)
        return [{**e, **{k: self.answers[e["pair"]][k] for k in ("rejected_ids", "ref_rejected_logps")}}
                if e["pair"] in self.answers else e for e in examples]

    def run(self, trainer, point: int, examples: list[dict]) -> None:
        """New rejected answers for `examples` from the policy as it is, their log-probabilities under q_w."""
        if not examples:  # a rank whose block holds only rows accelerate repeats to even out the ranks: they come late
            self.stats["refreshes"] += point not in self.points
            self.points.add(point)
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        tokenizer = trainer.processing_class
        prompts = [self.prompts[e["pair"]] for e in examples]
        generated = {}
        start = time.perf_counter()
        sampling = Sampling(self.sampling.max_new_tokens, self.sampling.temperature, self.sampling.top_p,
                            seed=self.sampling.seed * 1_000_003 + point)
        generate_transformers(model, tokenizer, prompts, sampling, self.batch_size,
                              on_batch=lambda results: generated.update(results), desc=f"refresh at step {point}")
        model.train()
        self.stats["generation_s"] += time.perf_counter() - start
        records, fresh = [], []
        for i, example in enumerate(examples):
            g = generated[i]
            self.stats["generated_tokens"] += g.num_tokens
            self.stats["truncated"] += g.finish_reason == "length"
            record = {"pair": example["pair"], "step": point, "text": g.text, "finish_reason": g.finish_reason}
            if g.finish_reason == "length" and self.drop_truncated:
                self.stats["kept_previous"] += 1
                previous = self.answers.get(example["pair"], example)
                record.update(rejected_ids=previous["rejected_ids"], ref_rejected_logps=previous["ref_rejected_logps"])
            else:
                record["rejected_ids"] = chat_ids(tokenizer, prompts[i], g.text, g.finish_reason == "length")[1]
                fresh.append((record, {**example, "rejected_ids": record["rejected_ids"]}))
            records.append(record)
        start = time.perf_counter()
        size = trainer.args.precompute_ref_batch_size or trainer.args.per_device_train_batch_size
        for s in range(0, len(fresh), size):
            chunk = fresh[s : s + size]
            for (record, _), logp in zip(chunk, trainer.reference_logps([e for _, e in chunk])[1].tolist()):
                record["ref_rejected_logps"] = logp
        self.stats["reference_s"] += time.perf_counter() - start
        path = self.folder / f"step-{point:06d}.jsonl"
        earlier = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        atomic_write_jsonl(path, earlier + records)  # before the step trains on them: a resumed run finds them
        self.answers.update({r["pair"]: r for r in records})
        if point not in self.points:
            self.points.add(point)
            self.stats["refreshes"] += 1
        self.stats["answers"] += len(records)

    def summary(self) -> dict:
        """The figures of every rank (a collective: every rank calls it): counts summed, seconds the slowest's."""
        ranks = [self.stats]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, self.stats)
        stats = {k: sum(r[k] for r in ranks) for k in self.stats}
        stats["refreshes"] = max(r["refreshes"] for r in ranks)  # the same steps on every rank
        for k in ("generation_s", "reference_s"):
            stats[k] = round(max(r[k] for r in ranks), 1)
        return {"every": self.every, **stats}


def block_rows(trainer, point: int, every: int) -> list[int]:
    """This rank's training rows of steps point … point + every − 1, as the trainer will draw them: each epoch's order
    from its sampler (EpochSeededSampler: the seed and the epoch alone, the same on every rank), its micro-batches
    dealt to the ranks in turn (accelerate's BatchSamplerShard), `gradient_accumulation_steps` of them a step, the
    epoch's last step taking what is left (transformers' loop). The rows accelerate repeats to even out the ranks'
    last micro-batches are not foreseen: generated when they arrive (`late`)."""
    sampler, b, ga = trainer.train_order, trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps
    ranks, rank = trainer.args.world_size, trainer.args.process_index
    micro_batches = math.ceil(len(sampler) / b)
    own = math.ceil(micro_batches / ranks)  # this rank's micro-batches an epoch
    steps_per_epoch = math.ceil(own / ga)
    orders, rows = {}, []
    for step in range(point, min(point + every, trainer.state.max_steps)):
        epoch, j = divmod(step, steps_per_epoch)
        if epoch not in orders:
            saved = sampler.epoch
            sampler.set_epoch(epoch)
            orders[epoch] = list(iter(sampler))
            sampler.set_epoch(saved)
        for mb in range(j * ga, min((j + 1) * ga, own)):
            rows += orders[epoch][(mb * ranks + rank) * b : (mb * ranks + rank + 1) * b]
    return rows


class RefreshRejected:
    """Mixin for the DPO trainer: its rejected answers refreshed by `Refresh` (set up with `refresh_with` once TRL's
    constructor has computed the reference log-probabilities of q0's answers with its own collator)."""

    def refresh_with(self, refresh: Refresh):
        self.refresh = refresh
        self.preference_collator = self.data_collator
        self.data_collator = lambda examples: {DEFERRED: examples}
        return self

    def reference_logps(self, examples: list[dict]):
        """q_w's log-probabilities of the chosen and rejected answers of `examples`, computed as before training."""
        batch = send_to_device(self.preference_collator(examples), self.accelerator.device)
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            return self.compute_ref_log_probs(self.ref_model or self.model, batch)

    def training_step(self, model, inputs, *args, **kwargs):
        if DEFERRED in inputs:
            inputs = self.preference_collator(self.refresh.examples(self, inputs[DEFERRED]))
        return super().training_step(model, inputs, *args, **kwargs)
