"""Where a training step's time goes besides the model's own compute: soda's SFT and DPO trainers on the code path a
GPU takes (this package's CPU-only parts off: no CPU LM head, no fp32-master optimizer) and stock TRL's.

    python bench/step_overhead.py [--steps N]

Each optimizer step after the first is split into the trainer's `training_step` calls (forward and backward: the
compute), the optimizer's step, and the rest (data loading and collation, gradient clipping, the scheduler,
callbacks, logging): the per-step overhead. That overhead runs on the CPU whatever trains the model, so its seconds
here are about what it costs beside a GPU's much shorter compute. Writes bench/results/step-overhead.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from throughput import RESULTS, STUDENT, soda_trainer, stock_trainer, synthetic_pairs


class StepPhases:
    """Times a trainer's optimizer steps after the first: `training_step` calls, the optimizer step, and the whole
    step from the end of the one before."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.compute = self.optimizer = 0.0
        self.ends: list[float] = []
        phases, inner = self, trainer.training_step

        def timed_training_step(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if phases.ends:  # the first step pays one-off costs
                    phases.compute += time.perf_counter() - start

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                phases.optimizer_start = time.perf_counter()

            def on_optimizer_step(self, args, state, control, **kwargs):
                if phases.ends:
                    phases.optimizer += time.perf_counter() - phases.optimizer_start

            def on_step_end(self, args, state, control, **kwargs):
                phases.ends.append(time.perf_counter())

        trainer.training_step = timed_training_step
        trainer.add_callback(Callback())

    def result(self) -> dict:
        steps, total = len(self.ends) - 1, self.ends[-1] - self.ends[0]
        overhead = total - self.compute - self.optimizer
        per_step = lambda seconds: round(seconds / steps, 3)
        return {"steps_timed": steps, "step_s": per_step(total), "compute_s": per_step(self.compute),
                "optimizer_s": per_step(self.optimizer), "overhead_s": per_step(overhead),
                "overhead_share": round(overhead / total, 3)}


def without_cpu_parts() -> None:
    """soda's trainers as they are built on a GPU: apply_cpu_settings and the reference model's CPU head switched off."""
    from soda_distill.stages import distill, warmup

    warmup.apply_cpu_settings = distill.apply_cpu_settings = lambda trainer: trainer
    distill.add_cpu_lm_head = lambda model: None


def measure(stage: str, variant: str, steps: int) -> dict:
    from soda_distill.models import load_model, load_tokenizer, resolve_model

    batch = 8 if stage == "sft" else 4
    path = resolve_model(STUDENT)
    tokenizer, model = load_tokenizer(path), load_model(path)
    with tempfile.TemporaryDirectory() as out:
        make = stock_trainer if variant == "stock" else soda_trainer
        trainer = make(stage, model, tokenizer, synthetic_pairs(batch * steps), batch, Path(out))
        phases = StepPhases(trainer)
        trainer.train()
    return {"batch": batch, **phases.result()}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = list(results)
    left = [0.0] * len(names)
    for part, color in (("compute_s", "#1f77b4"), ("optimizer_s", "#2ca02c"), ("overhead_s", "#d62728")):
        values = [results[n][part] for n in names]
        ax.barh(names, values, left=left, color=color, label=part.removesuffix("_s"))
        left = [a + b for a, b in zip(left, values)]
    for i, name in enumerate(names):
        ax.text(left[i], i, f"  overhead {results[name]['overhead_s']:.2f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per optimizer step")
    ax.set_xlim(0, max(left) * 1.35)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=8)
    ax.set_title("a training step's time: compute, optimizer, and the rest (CPU-side overhead)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per trainer, the first not timed")
    args = parser.parse_args()
    import torch
    import transformers
    import trl

    without_cpu_parts()
    results = {}
    for stage in ("sft", "dpo"):
        for variant in ("soda", "stock"):
            results[f"{stage}_{variant}"] = measure(stage, variant, args.steps)
            print(f"{stage}_{variant}", results[f"{stage}_{variant}"], flush=True)
    record = {
        "command": "python bench/step_overhead.py" + (f" --steps {args.steps}" if args.steps != 6 else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
                   + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "precision": "soda: bf16 autocast over fp32 weights (its GPU path); stock: TRL's defaults" + (
            "" if torch.cuda.is_available() else " on CPU (fp32)"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step-overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(results, RESULTS / "step-overhead.png")


if __name__ == "__main__":
    main()
