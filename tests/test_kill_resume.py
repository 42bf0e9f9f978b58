"""Process faults: each stage run through the CLI as a process of its own, SIGKILLed at seeded points and started
again until it finishes. After every kill nothing is half-written; at the end the artifacts are those of an
uninterrupted run: the same records, and training resumed from its last checkpoint to the same weights, bit for bit.

The processes are forked from a server that imported soda_distill once (multiprocessing's forkserver): each runs
`soda-distill`'s main and dies by SIGKILL as an exec'd command would, without the 7 s of imports an exec'd command
pays, which for 30 commands would be most of this file's time.
"""

import json
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QA, write_jsonl
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from soda_distill.cli import main
from soda_distill.training import last_checkpoint

POLL_S = 0.01
PROMPTS, SNAPSHOT_BATCH, EVAL_BATCH = len(QA), 2, 2
APPEND_LOGS = {"snapshot.partial.jsonl", "teacher_cache.jsonl", "generations.jsonl", "metrics.jsonl"}
# Training stages: the folder of their metrics.jsonl and checkpoints/, and the folders of the models they train.
TRAINING = {
    "warmup": ("warmup", ["warmup"]),
    "distill": ("distill", ["distill"]),
    "gad_warmup": ("gad/discriminator_warmup", ["gad/discriminator_warmup"]),
    "gad": ("gad", ["gad/generator", "gad/discriminator"]),
}

# tqdm makes a multiprocessing lock in the first process that shows a bar. Made here, in the fork server that
# imports this module, the processes inherit it, instead of each making one that its kill leaks.
tqdm.get_lock()


def cli(argv: list[str], log: Path) -> None:
    """`soda-distill ARGV` in this (forked) process, its output appended to `log`. One thread: the model is tiny, and
    two OpenMP threads spinning on two shared cores made a training step 3x slower."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def fork():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["soda_distill.cli", "soda_distill.pipeline", "soda_distill.stages.gad", "soda_distill.stages.distill",
                                "soda_distill.stages.warmup", "soda_distill.stages.snapshot", "soda_distill.evaluation.evaluate", __name__])
    return ctx


def start(fork, argv: list[str], run: Path):
    """The command, working in the directory `run`; its output goes to `run`.log."""
    proc = fork.Process(target=cli, args=(argv, run.with_suffix(".log")))
    proc.start()
    return proc


def finish(proc, run: Path) -> None:
    proc.join()
    assert proc.exitcode == 0, run.with_suffix(".log").read_text()[-3000:]


# --- What a run has done so far, as its files show ----------------------------------------------------------------


def manifest(run: Path) -> dict:
    path = run / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def done(run: Path, stage: str) -> bool:
    return manifest(run)["stages"].get(stage, {}).get("status") == "done"


def stage_s(run: Path, stage: str) -> float:
    return manifest(run)["stages"][stage]["wall_s"]


def lines(path: Path) -> int:
    """Complete records of a JSONL file (a torn last line does not count); 0 before it is written or once its stage,
    finishing, has moved it (polled from outside: it can go between any two looks)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def checkpoint_step(folder: Path) -> int:
    """The step a training restarted now would resume from; 0 for none."""
    last = last_checkpoint(folder)
    return int(Path(last).name.split("-")[-1]) if last else 0


# Units of work a stage has done: batches of generation logged, or its newest whole checkpoint's step.
PROGRESS = {
    "snapshot": lambda run: lines(run / "snapshot.partial.jsonl") // SNAPSHOT_BATCH,
    "evaluate": lambda run: lines(run / "generations.jsonl") // EVAL_BATCH,
    **{stage: lambda run, folder=folder: checkpoint_step(run / folder / "checkpoints")
       for stage, (folder, _) in TRAINING.items()},
}


# --- Killing -------------------------------------------------------------------------------------------------------


@dataclass
class KillPoint:
    stage: str
    arm: Callable[[], Callable[[], bool]]  # called as an attempt starts: the condition after which the delay runs
    delay_s: float


@dataclass
class Kill:
    stage: str
    landed: bool  # the process was still running and the stage unfinished
    progress: int  # the stage's units done after the kill


@dataclass
class Run:
    path: Path
    unit_s: dict[str, float] = field(default_factory=dict)  # uninterrupted: the median time a unit of each stage took
    kills: list[Kill] = field(default_factory=list)  # killed: each kill, in order


def unit_points(rng: random.Random, run: Path, stage: str, targets: list[int], unit_s: float) -> list[KillPoint]:
    """For each target, a kill once that many units of the stage (batches, steps) are done, a seeded part of a unit
    later; and not before the attempt has done a unit of its own (a kill before it gets back to where the last one
    stopped would test nothing new)."""
    def arm(target):
        goal = max(target, PROGRESS[stage](run) + 1)
        return lambda: PROGRESS[stage](run) >= goal
    return [KillPoint(stage, lambda target=target: arm(target), rng.uniform(0, unit_s)) for target in targets]


def timed_points(rng: random.Random, stage: str, arm: Callable[[], Callable[[], bool]], kills: int,
                 stage_s: float) -> list[KillPoint]:
    """Kills in a stage with no units to count: a seeded time into it, once `arm`'s condition says it has begun."""
    return [KillPoint(stage, arm, rng.uniform(0, 0.8 * stage_s)) for _ in range(kills)]


def when(condition: Callable[[], bool]) -> Callable[[], Callable[[], bool]]:
    """An `arm` for a condition that needs nothing from the attempt's start."""
    return lambda: condition


def config_rewritten(run: Path) -> Callable[[], bool]:
    """True once the attempt has (atomically, so as a new file) written its config.yaml: it is at work in the run."""
    inode = lambda: (run / "config.yaml").stat().st_ino if (run / "config.yaml").exists() else None
    before = inode()
    return lambda: inode() not in (None, before)


def assert_nothing_half_written(run: Path) -> None:
    """What a kill may leave: a torn last line in an append-only log (its reader drops it), and the temp files of
    atomic writes, hidden (ours `.NAME.XXXX.tmp`, safetensors' `.tmpXXXXXX`) so that nothing takes them for an
    artifact. Everything else parses, whole, and each finished stage's artifacts are complete. (In an unfinished
    training stage transformers writes checkpoints and the final model in place, file by file: they are no artifacts
    until the manifest records the stage, and a resumed run skips a checkpoint cut short.)"""
    if (run / "config.yaml").exists():  # absent only if the kill came before the command wrote it
        yaml.safe_load((run / "config.yaml").read_text())
    stages = manifest(run)["stages"]
    for path in run.rglob("*"):
        if path.name.startswith("."):
            assert path.is_file(), path
        elif path.suffix == ".jsonl":
            whole, _, torn = path.read_bytes().rpartition(b"\n")
            assert not torn or path.name in APPEND_LOGS, f"{path}: half a line at its end"
            for line in whole.splitlines():
                json.loads(line)
    for stage, name, count in [("teacher", "teacher.jsonl", "records"), ("snapshot", "snapshot.jsonl", "records"),
                               ("pairs", "pairs.jsonl", "kept")]:
        if stage in stages:
            assert lines(run / name) == stages[stage][count], name
    for stage, (_, models) in TRAINING.items():
        for model in models if stage in stages else []:
            with safe_open(run / model / "model.safetensors", "pt") as weights:
                assert weights.keys(), model


def run_uninterrupted(fork, argv: list[str], path: Path) -> Run:
    """The command run to its end, timing the units of its stages (for kill delays of about one unit)."""
    proc, times, done_units = start(fork, argv, path), defaultdict(list), dict.fromkeys(PROGRESS, 0)
    while proc.is_alive():
        for stage, progress in PROGRESS.items():
            if (units := progress(path)) > done_units[stage]:
                done_units[stage] = units
                times[stage].append(time.perf_counter())
        time.sleep(POLL_S)
    finish(proc, path)
    return Run(path, {stage: statistics.median(b - a for a, b in pairwise(t)) for stage, t in times.items() if len(t) > 2})


def kill_and_resume(fork, argv: list[str], path: Path, points: list[KillPoint]) -> Run:
    """One attempt per kill point, SIGKILLed at it and checked; then the same command once more, which must finish."""
    run = Run(path)
    for point in points:
        proc = start(fork, argv, path)
        ready = point.arm()
        while proc.is_alive() and not ready():
            time.sleep(POLL_S)
        time.sleep(point.delay_s)
        running = proc.is_alive()
        proc.kill()
        proc.join()
        assert running or proc.exitcode == 0, path.with_suffix(".log").read_text()[-3000:]
        progress = PROGRESS[point.stage](path) if point.stage in PROGRESS else 0
        run.kills.append(Kill(point.stage, running and not done(path, point.stage), progress))
        assert_nothing_half_written(path)
    finish(start(fork, argv, path), path)
    return run


# --- The runs: each once uninterrupted, once killed ----------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_model_dir) -> list[str]:
    """Tiny and fast: 12 prompts; warmup and distill 2 epochs of 6 steps, GAD's discriminator warmup and adversarial
    phase 9 steps each (1.5 epochs of 6); a checkpoint every step to resume from; learning rates high enough that a
    step replayed or skipped on resume would show in the weights."""
    qa = write_jsonl(tmp_path_factory.mktemp("kill-data") / "qa.jsonl", QA)
    gad_epochs = 9 / 6 - 0.01  # 2 prompts (4 rollouts), or 2 pairs, a step; the trainer rounds epochs x steps up
    return [
        f"teacher.file={qa}", f"student.model={tiny_model_dir}", "student.bf16=false",
        "snapshot.max_new_tokens=16",
        "pairs.truncated_rejected=open", f"snapshot.batch_size={SNAPSHOT_BATCH}", "pairs.max_length=128",
        *[f"{stage}.{key}" for stage in ("warmup", "distill") for key in (
            "batch_size=2", "epochs=2", "learning_rate=1e-3", "max_length=128", "save_steps=1")],
        "gad.num_generations=2", "gad.batch_size=4", "gad.gradient_accumulation_steps=1", "gad.max_new_tokens=8",
        "gad.max_length=128", "gad.gradient_checkpointing=false", "gad.discriminator.batch_size=2",
        "gad.learning_rate=1e-4", "gad.discriminator.learning_rate=1e-4", "gad.discriminator.only_steps=1",
        f"gad.discriminator.warmup_epochs={gad_epochs}", f"gad.epochs={gad_epochs}", "gad.save_steps=1",
    ]


@pytest.fixture(scope="module")
def reference(fork, settings, tmp_path_factory) -> Run:
    """The pipeline, uninterrupted; left as it is (GAD runs on copies, evaluation only reads it)."""
    path = tmp_path_factory.mktemp("reference") / "run"
    return run_uninterrupted(fork, ["run", "--out", str(path), *settings], path)


@pytest.fixture(scope="module")
def killed(fork, settings, reference, tmp_path_factory) -> Run:
    path = tmp_path_factory.mktemp("killed") / "run"
    rng = random.Random(1)
    # Every kill two units or more before its stage's end, so that it lands in it (6 snapshot batches, 12 training
    # steps); the last in each training stage a step or more into the second epoch, whose order a resumed run must
    # draw again as the first did.
    in_training = lambda: [*sorted(rng.sample(range(1, 6), 3)), rng.randint(7, 9)]
    points = [
        *unit_points(rng, path, "snapshot", sorted(rng.sample(range(1, 4), 2)), reference.unit_s["snapshot"]),
        *timed_points(rng, "pairs", when(partial(done, path, "snapshot")), 2, stage_s(reference.path, "pairs")),
        *unit_points(rng, path, "warmup", in_training(), reference.unit_s["warmup"]),
        *unit_points(rng, path, "distill", in_training(), reference.unit_s["distill"]),
    ]
    return kill_and_resume(fork, ["run", "--out", str(path), *settings], path, points)


@pytest.fixture(scope="module")
def reference_gad(fork, reference, tmp_path_factory) -> Run:
    path = shutil.copytree(reference.path, tmp_path_factory.mktemp("reference-gad") / "run")  # copy2: model digests hold
    return run_uninterrupted(fork, ["gad", "--out", str(path)], path)


@pytest.fixture(scope="module")
def killed_gad(fork, reference, reference_gad, tmp_path_factory) -> Run:
    path = shutil.copytree(reference.path, tmp_path_factory.mktemp("killed-gad") / "run")
    rng = random.Random(2)
    points = [  # 9 steps each, 6 an epoch
        *unit_points(rng, path, "gad_warmup", [rng.randint(1, 5), 7], reference_gad.unit_s["gad_warmup"]),
        *unit_points(rng, path, "gad", [*sorted(rng.sample(range(1, 6), 2)), 7], reference_gad.unit_s["gad"]),
    ]
    return kill_and_resume(fork, ["gad", "--out", str(path)], path, points)


def evaluate_args(reference: Run, out: Path) -> list[str]:
    """Base, warmup and distill of the reference run on its own prompts; no judge (evaluate.judge.base_url unset)."""
    qa = yaml.safe_load((reference.path / "config.yaml").read_text())["teacher"]["file"]
    return ["evaluate", str(reference.path), "--out", str(out), f"evaluate.benchmarks=[{qa}]", "evaluate.max_new_tokens=8",
            f"evaluate.batch_size={EVAL_BATCH}", "student.bf16=false"]


@pytest.fixture(scope="module")
def reference_eval(fork, reference, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("reference-eval") / "eval"
    return run_uninterrupted(fork, evaluate_args(reference, out), out)


@pytest.fixture(scope="module")
def killed_eval(fork, reference, reference_eval, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("killed-eval") / "eval"
    rng = random.Random(3)
    targets = sorted(rng.sample(range(1, 3 * PROMPTS // EVAL_BATCH - 2), 3))  # of 18 batches: 3 models, 6 each
    return kill_and_resume(fork, evaluate_args(reference, out), out,
                           unit_points(rng, out, "evaluate", targets, reference_eval.unit_s["evaluate"]))


@pytest.fixture(scope="module")
def teacher_runs(fork, tmp_path_factory) -> tuple[Run, Run]:
    """The teacher stage from a file of answers, big enough that reading and writing it takes a killable moment."""
    base = tmp_path_factory.mktemp("teacher")
    answers = write_jsonl(base / "answers.jsonl", [
        {"id": f"s{a}", "messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                                     {"role": "assistant", "content": f"{2 * a}."}]}
        for a in range(10_000)
    ])
    argv = lambda path: ["teacher", "--out", str(path), f"teacher.file={answers}"]
    reference = run_uninterrupted(fork, argv(base / "reference"), base / "reference")
    killed = base / "killed"
    points = timed_points(random.Random(4), "teacher", partial(config_rewritten, killed), 3, stage_s(reference.path, "teacher"))
    return reference, kill_and_resume(fork, argv(killed), killed, points)


# --- The checks ----------------------------------------------------------------------------------------------------


def test_teacher_from_file(teacher_runs):
    reference, killed = teacher_runs
    assert (killed.path / "teacher.jsonl").read_bytes() == (reference.path / "teacher.jsonl").read_bytes()


def test_snapshot_and_pairs_are_identical(reference, killed):
    for name in ("teacher.jsonl", "snapshot.jsonl", "pairs.jsonl"):  # snapshot batches are seeded by index: byte-identical
        assert (killed.path / name).read_bytes() == (reference.path / name).read_bytes(), name


def weights_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def losses(folder: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def assert_resumed_like_the_reference(killed: Run, reference: Run, stage: str) -> None:
    """Resumed from the newest whole checkpoint at the stage's last kill, to the same per-step losses and weights.

    Bit for bit: the steps are deterministic on the CPU (as seen with one thread and with two), and the trainer
    restores RNG states, optimizer and schedule, so anything but equality means a step was replayed, skipped or fed
    other data."""
    folder, models = TRAINING[stage]
    last_kill = [k for k in killed.kills if k.stage == stage and k.landed][-1]
    assert manifest(killed.path)["stages"][stage]["resumed_from_step"] == (last_kill.progress or None)
    assert losses(killed.path / folder) == losses(reference.path / folder)  # every step once, with the same loss
    for model in models:
        assert weights_equal(killed.path / model, reference.path / model), model
    assert not (killed.path / folder / "checkpoints").exists()


@pytest.mark.parametrize("stage", ["warmup", "distill"])
def test_training_resumes_to_the_same_weights(reference, killed, stage):
    assert_resumed_like_the_reference(killed, reference, stage)


def test_gad_resumes_both_networks_to_the_same_weights(reference_gad, killed_gad):
    for stage in ("gad_warmup", "gad"):
        assert_resumed_like_the_reference(killed_gad, reference_gad, stage)
    updates = lambda run: manifest(run.path)["stages"]["gad"]["discriminator_updates"]
    assert updates(killed_gad) == updates(reference_gad) == 9


def test_the_pipeline_keys_a_finished_run_as_its_manifest_records_it(reference_gad):
    """Each finished stage's key as the pipeline computes it now, from the run's own config.yaml, is the one its
    manifest recorded: the same command again finds every stage finished (tests/test_stage_keys.py pins the form)."""
    from soda_distill.config import load_config
    from soda_distill.keys import key_of
    from soda_distill.manifest import RunDir
    from soda_distill.pipeline import resolve_paths

    cfg = resolve_paths(load_config(reference_gad.path / "config.yaml", []))
    stages = manifest(reference_gad.path)["stages"]
    assert list(stages) == ["teacher", "snapshot", "pairs", "warmup", "distill", "gad_warmup", "gad"]
    for stage, record in stages.items():
        assert key_of(stage, cfg, RunDir(reference_gad.path))[0] == record["fingerprint"], stage


def test_evaluation_generates_the_same_responses(reference_eval, killed_eval):
    log = lambda run: run.path / "generations.jsonl"
    responses = lambda run: {r["key"]: r for r in map(json.loads, log(run).read_text().splitlines())}
    assert responses(killed_eval) == responses(reference_eval)
    assert lines(log(killed_eval)) == 3 * PROMPTS  # none generated twice
    results = lambda run: json.loads((run.path / "results.json").read_text())
    assert results(killed_eval) == results(reference_eval)


def test_kills_landed_mid_stage(teacher_runs, killed, killed_gad, killed_eval):
    kills = [*teacher_runs[1].kills, *killed.kills, *killed_gad.kills, *killed_eval.kills]
    planned, landed = Counter(k.stage for k in kills), Counter(k.stage for k in kills if k.landed)
    summary = ", ".join(f"{stage} {landed[stage]}/{n}" for stage, n in planned.items())
    print(f"kills that landed mid-stage: {summary}")
    # every stage killed mid-way at least once (else its comparison is of two uninterrupted runs), and most kills
    assert all(landed[stage] for stage in planned) and sum(landed.values()) >= 20, summary
