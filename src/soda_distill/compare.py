"""`soda-distill compare`: the user's own Table 1 — every method the config lists (compare.methods: Base, SeqKD,
SODA, GAD by default) trained on their student and data, once per seed (compare.seeds), evaluated on the configured
benchmarks with paired intervals over prompts and, with several seeds, over seeds too, and written up as one report.

    DIR/seed-S/       a run directory per seed: the stages of every listed method, each once (pipeline.py)
    DIR/evaluation/   results.json, results.md, results.png (evaluate.py)
    DIR/report/       report.md, report.html (report.py)

Each part resumes: running the command again skips finished stages and generations already made.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from .config import Config
from .distributed import is_main
from .registry import methods_named

SEEDED = ("snapshot", "warmup", "seqkd", "distill", "gad", "opd")  # the config sections whose `seed` a compare seed sets


def seeded(cfg: Config, seed: int) -> Config:
    """The config of one seed's run: q0's sampling and every training stage draw from `seed`."""
    cfg = copy.deepcopy(cfg)
    for section in SEEDED:
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), seed=seed))
    return cfg


def run_compare(cfg: Config, out: str | Path) -> dict | None:
    """Train, evaluate and report; returns the evaluation's results. Launched as several processes, every rank
    trains and the main process alone evaluates (the others return None)."""
    from .evaluation.evaluate import prepare_evaluation, run_evaluate
    from .pipeline import prepare, run_methods
    from .report import write_report

    out = Path(out)
    methods = methods_named(cfg.compare.methods)
    runs = []
    for seed in cfg.compare.seeds:
        seed_cfg = seeded(cfg, seed)
        run = prepare(seed_cfg, out / f"seed-{seed}", [m.stage for m in methods if m.stage])
        run_methods(seed_cfg, run, [m.name for m in methods if m.stage])
        runs.append(str(run.path))
    if not is_main():
        return None
    cfg = copy.deepcopy(cfg)
    cfg.evaluate = dataclasses.replace(cfg.evaluate, runs=runs, methods=[m.name for m in methods])
    evaldir = prepare_evaluation(cfg, out / "evaluation")
    results = run_evaluate(cfg, evaldir)
    write_report([*runs, str(evaldir.path)], out / "report")
    return results


def plan_compare(cfg: Config, out: str | Path) -> list[str]:
    """--dry-run: what each seed's run and the evaluation would do; nothing is run, written or sent."""
    from .evaluation.evaluate import plan_evaluation
    from .pipeline import plan

    out, methods = Path(out), methods_named(cfg.compare.methods)
    lines = [f"seed-{seed}/{line}" for seed in cfg.compare.seeds
             for line in plan(seeded(cfg, seed), out / f"seed-{seed}", [m.stage for m in methods if m.stage])]
    return lines + plan_evaluation(cfg, out / "evaluation", rows=len(methods) * len(cfg.compare.seeds))
