"""Experiment trackers (`trackers.report_to`): TRL's trainers report their per-step metrics through transformers'
integrations, under the run name RUNDIR/STAGE; the figures soda computes itself (each stage's manifest entry:
snapshot throughput, pair counts, timings, peak memory; the evaluation's table) go to the same trackers.

    tensorboard --logdir RUNDIR/tensorboard
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config
from .errors import SodaError


def tensorboard_dir(stage_dir: Path) -> Path:
    return stage_dir.parent / "tensorboard" / stage_dir.name


def tracker_arguments(cfg: Config, stage_dir: Path) -> dict:
    """TrainingArguments' tracker settings for the trainer of the stage that writes `stage_dir`."""
    report_to = cfg.trackers.report_to
    if not report_to:
        return {"report_to": "none"}
    from transformers.integrations import get_available_reporting_integrations

    missing = [name for name in report_to if name not in get_available_reporting_integrations()]
    if missing:
        raise SodaError(f"trackers.report_to: {missing[0]} is not installed (pip install {missing[0]})")
    if "tensorboard" in report_to:  # transformers' documented way to place its TensorBoard logs
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(stage_dir))
    return {"report_to": list(report_to), "run_name": f"{stage_dir.parent.name}/{stage_dir.name}",
            "project": cfg.trackers.project}


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record, keyed by their path: `a/b` for record["a"]["b"]."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def log_scalars(cfg: Config, stage_dir: Path, values: dict[str, float]) -> None:
    """soda's own figures of a stage (step 0: they are totals) to every tracker of `trackers.report_to`, under the
    run name RUNDIR/STAGE: TensorBoard's tags as they are, any other through transformers' own callback for it (the
    trainers' route, which may prefix them `train/`)."""
    report_to = cfg.trackers.report_to
    if not report_to or not values:
        return
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tensorboard_dir(stage_dir))) as writer:
            for tag, value in values.items():
                writer.add_scalar(tag, value, 0)
    others = [name for name in report_to if name != "tensorboard"]
    if others:
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks

        args = TrainingArguments(output_dir=str(stage_dir), **{**tracker_arguments(cfg, stage_dir), "report_to": others})
        state, control = TrainerState(), TrainerControl()
        for callback in (cls() for cls in get_reporting_integration_callbacks(others)):
            callback.on_train_begin(args, state, control)
            callback.on_log(args, state, control, logs=values)
            callback.on_train_end(args, state, control)


def evaluation_scalars(results: dict) -> dict[str, float]:
    """The evaluation table as `MODEL/METHOD/BENCHMARK/...` scalars: every figure of its cells, paired differences
    included (their intervals, being lists, stay in results.json)."""
    out = {}
    for row in results["rows"]:
        for bench, cell in row["cells"].items():
            out.update(scalars(cell, f"{row['model']}/{row['method']}/{bench}/"))
    return out
