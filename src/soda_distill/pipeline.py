"""The whole SODA pipeline: teacher → snapshot → pairs → warmup → distill, in one run directory."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from .config import Config, save_config
from .distill import run_distill
from .errors import SodaError
from .manifest import RunDir
from .pairs import run_pairs
from .snapshot import run_snapshot
from .teacher import run_teacher
from .warmup import run_warmup

STAGES = {
    "teacher": run_teacher,
    "snapshot": run_snapshot,
    "pairs": run_pairs,
    "warmup": run_warmup,
    "distill": run_distill,
}
BUILTIN = "builtin:"


def resolve_data_path(value: str | None) -> str | None:
    """`builtin:NAME` → a data file shipped with the package; other paths → absolute."""
    if value is None:
        return None
    if value.startswith(BUILTIN):
        name = value[len(BUILTIN):]
        path = resources.files("soda_distill") / "data" / f"{name}.jsonl"
        if not path.is_file():
            shipped = sorted(p.name.removesuffix(".jsonl") for p in (resources.files("soda_distill") / "data").iterdir() if p.name.endswith(".jsonl"))
            raise SodaError(f"unknown built-in data set {name!r} (shipped: {', '.join(shipped)})")
        return str(path)
    return str(Path(value).expanduser().resolve())


def prepare(cfg: Config, out: str | Path) -> RunDir:
    """Resolve data paths, open the run directory and record the resolved config in it."""
    cfg.data = dataclasses.replace(cfg.data, prompts=resolve_data_path(cfg.data.prompts))
    cfg.teacher = dataclasses.replace(cfg.teacher, file=resolve_data_path(cfg.teacher.file))
    run = RunDir(out)
    cfg.out = str(run.path)
    save_config(cfg, run.file("config.yaml"))
    return run


def run_stage(name: str, cfg: Config, run: RunDir) -> Path:
    return STAGES[name](cfg, run)


def run_all(cfg: Config, run: RunDir) -> Path:
    """Every stage in order; finished stages are skipped, so this also resumes an interrupted run."""
    out = None
    for name in STAGES:
        out = run_stage(name, cfg, run)
    return out
