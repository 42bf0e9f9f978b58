"""The whole run's config (`Config`, one field per section) and how it is read: a YAML file, then `section.key=value`
overrides from the command line, then an evaluation preset under both, each value checked against its field's type
(ints read as floats where a float is wanted) and every unknown key refused, naming where it is.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import SodaError
from ..records import read_text_file
from .endpoints import TeacherConfig
from .fields import AT_LEAST_ONE, section
from .evaluation import EVALUATE_PRESETS, AnalyzeConfig, CheckConfig, CompareConfig, EvaluateConfig
from .inputs import DataConfig, PairsConfig, SnapshotConfig, StudentConfig
from .onpolicy import GadConfig, OpdConfig
from .training import DistillConfig, SeqKDConfig, TrackersConfig, WarmupConfig

MAX_CONFIG_BYTES = 1 << 20
# Keys that moved: a config written with the old name (a run's config.yaml included) still loads, as the new one.
MOVED = {**{f"gad.discriminator_{key}": f"gad.discriminator.{key}"
            for key in ("learning_rate", "warmup_epochs", "only_steps", "batch_size")},
         "training.report_to": "trackers.report_to", "training.project": "trackers.project"}


@dataclass
class Config:
    student: StudentConfig = section(StudentConfig, "the student q0: its model, precision and LoRA adapters")
    data: DataConfig = section(DataConfig, "the training prompts")
    teacher: TeacherConfig = section(TeacherConfig,
        "the teacher (stage 1): an OpenAI-compatible endpoint, or a file of its answers")
    snapshot: SnapshotConfig = section(SnapshotConfig, "sampling of q0's own answers to the prompts (stage 2)")
    pairs: PairsConfig = section(PairsConfig,
        "the preference pairs, the teacher's answer chosen and q0's rejected (stage 3)")
    trackers: TrackersConfig = section(TrackersConfig, "the experiment trackers of every training stage")
    warmup: WarmupConfig = section(WarmupConfig, "SFT of q0 on the teacher's answers, giving q_w (stage 4)")
    seqkd: SeqKDConfig = section(SeqKDConfig, "the SeqKD baseline: the same SFT, stopped at its least held-out loss")
    distill: DistillConfig = section(DistillConfig,
        "DPO from q_w on the pairs, q_w the reference, giving SODA (stage 5)")
    gad: GadConfig = section(GadConfig, "the GAD baseline")
    opd: OpdConfig = section(OpdConfig, "open-teacher on-policy distillation")
    evaluate: EvaluateConfig = section(EvaluateConfig,
        "`soda-distill evaluate`: the rows, the benchmarks, the decoding, the reference and the judge")
    analyze: AnalyzeConfig = section(AnalyzeConfig, "`soda-distill analyze`: the representation analysis")
    compare: CompareConfig = section(CompareConfig,
        "`soda-distill compare`: the methods and seeds trained side by side")
    check: CheckConfig = section(CheckConfig, "the before/after `soda-distill run` ends with")
    out: str | None = field(default=None, metadata={
        "help": "the run directory (null: `runs/<config name>`); `--out` on the command line wins"})


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp` (the few kinds a config uses), converting int to float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SodaError as e:
                errors.append(str(e))
        raise SodaError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SodaError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SodaError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SodaError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise SodaError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        first = min(map(str, unknown))
        key = f"{where}.{first}" if where else first
        raise SodaError(f"unknown key '{key}' (known here: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    for k, v in kwargs.items():
        if k in AT_LEAST_ONE and isinstance(v, int) and v < 1:
            raise SodaError(f"{where}.{k} must be at least 1, got {v}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` strings → nested dict; values are read as YAML scalars (`1e-5`, `true`, `null`)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SodaError(f"override '{item}': expected section.key=value")
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SodaError(f"override '{item}': {p} is given a value of its own as well as keys")
        value = yaml.safe_load(raw) if raw else ""
        # YAML reads 1e-5 as a string; accept the usual float spellings people type.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else value
            except ValueError:
                pass
        node[leaf] = value
    return tree


def _moved(values: dict) -> dict:
    """`values` with each old key of MOVED under its new name, unless the new one is also given."""
    for old, new in MOVED.items():
        *parents, leaf = old.split(".")
        nodes = [values]
        for p in parents:
            nodes.append(nodes[-1].get(p) if isinstance(nodes[-1].get(p), dict) else {})
        if leaf not in nodes[-1]:
            continue
        value = nodes[-1].pop(leaf)
        for parent, name, node in reversed(list(zip(nodes, parents, nodes[1:]))):
            if not node:  # a section left empty by the move goes with it
                del parent[name]
        *new_parents, new_leaf = new.split(".")
        target = values
        for p in new_parents:
            target = target.setdefault(p, {})
        target.setdefault(new_leaf, value)
    return values


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    values: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            values = yaml.safe_load(read_text_file(path, "config file", MAX_CONFIG_BYTES)) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark else ""
            raise SodaError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(values, dict):
            raise SodaError(f"{path}: expected a mapping of sections at the top level")
    values = _merge(_moved(values), _moved(parse_overrides(overrides or [])))
    preset = (values.get("evaluate") or {}).get("preset") if isinstance(values.get("evaluate"), dict) else None
    if preset is not None:
        if preset not in EVALUATE_PRESETS:
            raise SodaError(f"{where}: evaluate.preset: unknown preset {preset!r} (presets: {', '.join(EVALUATE_PRESETS)})")
        values["evaluate"] = _merge(EVALUATE_PRESETS[preset], values["evaluate"])
    try:
        return _build(Config, values, "")
    except SodaError as e:
        raise SodaError(f"{where}: {e}") from None
