"""What the report reads from a run directory, tolerantly: its config, manifest and pairs' lengths, each either read or
named as a problem (never raised); and which of the given directories are runs, evaluations or analyses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import SodaError
from ..records import read_jsonl
from ..registry import STAGES, expected_stages, finished

# The stages every run has (SODA's), then the optional ones (other methods'), each with what it leaves behind.
EXPECTED = expected_stages()
OPTIONAL = [name for name in STAGES if name not in EXPECTED]


@dataclass
class Run:
    name: str
    path: Path
    config: dict | None = None
    config_text: str | None = None
    manifest: dict | None = None
    pair_lengths: dict[str, list[int]] | None = None  # whitespace words of chosen and rejected, from pairs.jsonl
    problems: list[str] = field(default_factory=list)  # files that exist but could not be read

    @property
    def stages(self) -> dict[str, dict]:
        return (self.manifest or {}).get("stages", {})

    def status(self, stage: str) -> str:
        if finished(self.path, self.stages, stage):
            return "done"
        return "started" if any((self.path / out).exists() for out in STAGES[stage].outputs) else "missing"


def _read(run: Run, name: str, parse):
    """parse(text) of a file in the run directory; None when it is absent or unreadable (then named in problems)."""
    path = run.path / name
    if not path.is_file():
        return None
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        run.problems.append(f"`{name}` could not be read ({type(e).__name__}: {str(e).splitlines()[0]})")
        return None


def _pair_lengths(run: Run) -> dict[str, list[int]] | None:
    """Whitespace-word lengths of the chosen and rejected responses in pairs.jsonl."""
    path = run.path / "pairs.jsonl"
    if not path.is_file():
        return None
    lengths = {"chosen": [], "rejected": []}
    try:
        for _, obj in read_jsonl(path):
            for side in lengths:
                lengths[side].append(len(obj[side][-1]["content"].split()))
    except (SodaError, KeyError, IndexError, TypeError, AttributeError) as e:
        run.problems.append(f"`pairs.jsonl` could not be read ({type(e).__name__}: {e})")
        return None
    return lengths


def _parse_config(text: str) -> dict:
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError("not a mapping of sections")
    return config


def _parse_manifest(text: str) -> dict:
    manifest = json.loads(text)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise ValueError("no mapping of stages")
    return manifest


def load_run(path: Path, name: str) -> Run:
    run = Run(name, path)
    run.config_text, run.config = _read(run, "config.yaml", lambda text: (text, _parse_config(text))) or (None, None)
    run.manifest = _read(run, "manifest.json", _parse_manifest)
    run.pair_lengths = _pair_lengths(run)
    return run


def classify(paths: list[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """Run directories, evaluation directories and analysis directories, each once, in the order given; the
    evaluations and analyses inside each run directory follow the ones given."""
    runs, evaluations, analyses = [], [], []
    for path in paths:
        if not path.is_dir():
            raise SodaError(f"{path}: not a directory")
        if (path / "results.json").is_file():
            evaluations.append(path)
        elif (path / "analysis.json").is_file():
            analyses.append(path)
        else:
            runs.append(path)
    for run in runs:
        evaluations += sorted(p.parent for p in run.glob("*/results.json"))
        analyses += sorted(p.parent for p in run.glob("*/analysis.json"))
    unique = lambda items: list(dict.fromkeys(p.resolve() for p in items))
    return unique(runs), unique(evaluations), unique(analyses)


def names(paths: list[Path]) -> list[str]:
    """Directory names, or whole paths where two names clash."""
    names = [p.name for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]
