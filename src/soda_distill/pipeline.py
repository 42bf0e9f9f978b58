"""Running methods in one run directory: each method's chain of stages from the registry, every stage once.

SODA is teacher → snapshot → pairs → warmup → distill; GAD shares the teacher, pairs and warmup stages and adds
its own two. A finished stage is skipped, so running a second method reuses what the first one trained, and running
a method again resumes it.

The pipeline owns the stage protocol (`execute`): a stage declares its key and its body in the registry; here its key
is computed and checked, and the body run, timed and recorded. No stage touches its own manifest record.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager
from pathlib import Path

from .config import Config, save_config
from .distributed import is_main, main_first, wait_for_everyone, world_size
from .errors import SodaError, write_error
from .keys import stage_inputs, stage_key
from .manifest import RunDir, read_manifest
from .model_card import write_model_card
from .records import resolve_data_path
from .registry import DEFAULT_METHODS, STAGES, chain, finished, imported, methods_named
from .tracking import log_scalars, scalars


def resolve_paths(cfg: Config) -> Config:
    """The data files as a run's config.yaml records them: `builtin:NAME` and relative paths made absolute."""
    cfg.data = dataclasses.replace(cfg.data, prompts=resolve_data_path(cfg.data.prompts))
    cfg.teacher = dataclasses.replace(cfg.teacher, file=resolve_data_path(cfg.teacher.file))
    if cfg.pairs.rejected_source.endswith(".jsonl"):  # another model's answers
        cfg.pairs = dataclasses.replace(cfg.pairs, rejected_source=resolve_data_path(cfg.pairs.rejected_source))
    if cfg.pairs.same_prompts_as:
        cfg.pairs = dataclasses.replace(cfg.pairs, same_prompts_as=resolve_data_path(cfg.pairs.same_prompts_as))
    return cfg


def prepare(cfg: Config, out: str | Path, stages: list[str] | None = None) -> RunDir:
    """Resolve data paths, open the run directory and record the resolved config in it. A student model given as a
    path that is not there is refused now, before a teacher's answers are paid for, unless none of `stages` (the
    stages to run, with those they need; None: any) reads it."""
    resolve_paths(cfg)
    model = cfg.student.model
    reads_student = stages is None or any("student" in STAGES[s].reads for s in chain(stages))
    if reads_student and model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise SodaError(f"student.model: {model}: no such folder or file")
    run = RunDir(out).lock()
    cfg.out = str(run.path)
    if is_main():
        save_config(cfg, run.file("config.yaml"))
    return run


@contextmanager
def _writes(stage: str, where: Path):
    """A write that fails for lack of space or permission inside `stage` — its body's, a trainer's checkpoint, its
    record's — becomes one line (errors.write_error) that says how to resume; inside RunDir.stage, a SodaError, so
    that the manifest's `stopped` keeps it where the disk still takes that."""
    try:
        yield
    except SodaError:
        raise
    except Exception as e:
        error = write_error(e, stage, where)
        if error is None:
            raise
        raise error from None


def execute(name: str, cfg: Config, run: RunDir, inputs: dict[str, Path] | None = None) -> Path:
    """The stage `name` by its registry declaration, in this process: its key from its config sections and inputs
    (keys.py); finished under that key: nothing to do; finished under another: an error; else its body runs, timed
    and recorded (RunDir.stage) with the figures it returns, and its scratch files go. `inputs`: a needed stage's
    output taken from elsewhere than this run (a DPO from another starting model). Returns what the stage yields."""
    stage = STAGES[name]
    with _writes(name, run.output(name)):
        given = stage_inputs(stage, run, inputs)
        key, legacy = stage_key(stage, cfg, given)
        if not run.done(name, key, legacy):
            with run.stage(name, key) as info, _writes(name, run.output(name)):
                info.update(imported(stage.body)(cfg, run, given).record())
            for scratch in stage.scratch:  # only once the stage is recorded as done
                run.file(scratch).unlink(missing_ok=True)
    return run.output(name)


def run_one(name: str, cfg: Config, run: RunDir) -> Path:
    """A stage; launched as several processes, every rank trains its share of a training stage, and the main process
    runs any other while the rest wait for it. A stage that ran (not one found finished) logs its manifest figures to
    the trackers."""
    finished_before = run.manifest()["stages"].get(name, {}).get("finished")
    if not STAGES[name].trains:
        if world_size() > 1 and is_main() and not run.finished(name):
            print(f"{name}: runs on the main process; the other {world_size() - 1} wait for it", file=sys.stderr)
        with main_first():
            out = execute(name, cfg, run)
    else:
        out = execute(name, cfg, run)
        if is_main():
            write_model_card(cfg, run, name)
        wait_for_everyone()  # no rank reads the stage's model before the main process has saved it
    record = run.manifest()["stages"].get(name, {})
    if is_main() and record.get("finished") != finished_before:
        log_scalars(cfg, run.path / name, scalars(record))
    return out


def run_stage(name: str, cfg: Config, run: RunDir) -> Path:
    """One stage, after any stage it needs that has not finished."""
    for needed in chain([name]):
        out = run_one(needed, cfg, run)
    return out


def run_methods(cfg: Config, run: RunDir, methods: list[str] | tuple[str, ...] = DEFAULT_METHODS) -> dict[str, Path]:
    """Every stage these methods need, in order, each once; returns each trained method's model."""
    chosen = methods_named(list(methods))
    for name in chain([m.stage for m in chosen if m.stage]):
        run_one(name, cfg, run)
    return {m.name: run.output(m.stage) for m in chosen if m.stage}


def run_all(cfg: Config, run: RunDir) -> Path:
    """SODA from the start; finished stages are skipped, so this also resumes an interrupted run."""
    return run_methods(cfg, run, ["soda"])["soda"]


def plan(cfg: Config, out: str | Path, stages: list[str]) -> list[str]:
    """--dry-run: what running these stages (and the unfinished ones they need) in `out` would do; nothing is run,
    written or sent."""
    resolve_paths(cfg)
    path = Path(out).resolve()
    records = read_manifest(path)["stages"]
    return [f"{name}: finished" if finished(path, records, name) else f"{name}: to run: {STAGES[name].planned(cfg, path)}"
            for name in chain(stages)]
