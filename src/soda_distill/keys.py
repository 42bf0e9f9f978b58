"""A stage's key: one short fingerprint of everything its result depends on, as the registry declares it — the
fingerprints of the config sections of `Stage.key`, the digests of the outputs of `Stage.needs`, then the parts its
`key_extra` adds, in that order.

A stage finished under its key is skipped and one finished under another refused, so for the same settings and
inputs a key must stay what it was, byte for byte: a run directory made by an earlier version keeps its finished
stages. tests/test_stage_keys.py writes each stage's key out by hand and checks it against this.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from .config import Config, fingerprint
from .manifest import RunDir, combine
from .records import sha256_file
from .registry import STAGES, Stage, imported


@dataclass
class KeyParts:
    """What a stage's `key_extra` adds to its key, in order: a config section (its fingerprint), a Path (a model
    folder's digest, a file's sha256), a text as it is; None adds nothing. `legacy`: the whole list as an earlier
    version keyed the same settings (a stage finished under it is taken as finished, its record rewritten)."""

    parts: list
    legacy: list | None = None


def section(cfg: Config, name: str):
    """A config section by its name, `student` or `student.lora`."""
    return functools.reduce(getattr, name.split("."), cfg)


def digest(path: Path, folder: bool) -> str:
    """A model folder's digest (weights' names, sizes and times, config), or a file's sha256."""
    from .models import model_digest  # imported here: it imports torch, which a --dry-run needs not

    return model_digest(path) if folder else sha256_file(path)


def _part(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if dataclasses.is_dataclass(value):
        return fingerprint(value)
    if isinstance(value, Path):
        return digest(value, value.is_dir())
    raise TypeError(f"a key part is a config section, a Path, a text or None, not {type(value).__name__}")


def _yields_folder(stage: str) -> bool:
    return bool(STAGES[stage].model) or STAGES[stage].outputs[0].endswith("/")


def stage_inputs(stage: Stage, run: RunDir, given: dict[str, Path] | None = None) -> dict[str, Path]:
    """Each stage that `stage` needs -> its output: this run's, unless `given` names another."""
    return {need: Path(given[need]) if given and given.get(need) else run.output(need) for need in stage.needs}


def stage_key(stage: Stage, cfg: Config, inputs: dict[str, Path]) -> tuple[str, str | None]:
    """(the stage's key, the key an earlier version gave the same settings and inputs, or None)."""
    declared = [fingerprint(section(cfg, name)) for name in stage.key]
    declared += [digest(inputs[need], _yields_folder(need)) for need in stage.needs]
    extra = imported(stage.key_extra)(cfg) if stage.key_extra else KeyParts([])
    combined = lambda parts: combine(*declared, *(p for p in map(_part, parts) if p is not None))
    return combined(extra.parts), None if extra.legacy is None else combined(extra.legacy)


def key_of(name: str, cfg: Config, run: RunDir, given: dict[str, Path] | None = None) -> tuple[str, str | None]:
    """The key of stage `name` in `run` (see stage_key)."""
    stage = STAGES[name]
    return stage_key(stage, cfg, stage_inputs(stage, run, given))
