"""The map of a run directory, written once: every stage (its body, what its key covers, what it writes, the model
it yields) and every method (the stage whose model it is; its chain of stages follows from what each stage needs).

The pipeline and the CLI run stages from here; evaluate, analyze, report and plots find a run's models and files
here. Adding a method is one `Method` entry plus its stage module. Nothing here imports a trainer: a stage's body
is named as `module:function` and imported only when the stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from .errors import SodaError


@dataclass(frozen=True)
class Stage:
    """A stage's declaration. The pipeline runs it (pipeline.execute): its key is the fingerprints of `key`'s config
    sections, in order, then the digests of the outputs of `needs`, in order, then `key_extra`'s parts (keys.py); a
    stage finished under that key is skipped, one finished under another refused; else `body` runs and what it
    returns is recorded."""

    name: str  # its record in manifest.json and its subcommand
    body: str  # "module:function" in soda_distill: function(cfg, run, inputs) -> its figures (a manifest.StageResult);
    # `inputs`: each needed stage's output, as its key has it
    does: str  # one line, for the CLI's help and the README
    needs: tuple[str, ...] = ()  # the stages whose outputs it reads, each part of its key
    reads: tuple[str, ...] = ()  # the config sections a variant must leave alone to share it (registry.shared_stages)
    key: tuple[str, ...] = ()  # the sections of `reads` its key fingerprints whole, in order
    key_extra: str | None = None  # "module:function" (cfg) -> the rest of its key (keys.KeyParts): what depends on
    # its settings (a section only where set, a file a setting names) or what an earlier version keyed otherwise
    outputs: tuple[str, ...] = ()  # what a finished stage has left, relative to the run directory ("x/": a folder)
    model: str | None = None  # the model directory it yields (a Hugging Face model folder)
    metrics: str | None = None  # its per-step training metrics
    trains: bool = False  # launched as several processes, every rank trains its share; else the main process runs it
    plan: str | None = None  # "module:function" (cfg, run path) -> what it would send and cost, for --dry-run
    scratch: tuple[str, ...] = ()  # files it keeps while unfinished, to resume; deleted once it is recorded

    def planned(self, cfg, run_path: Path) -> str:
        """--dry-run: what running the stage would do, nothing run or written."""
        return imported(self.plan)(cfg, run_path) if self.plan else self.does


def imported(name: str):
    """The function `module:function` of soda_distill, imported now."""
    module, function = name.split(":")
    return getattr(importlib.import_module(f"soda_distill.{module}"), function)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("teacher", "stages.teacher:teacher_body", "teacher answers y_t, from an OpenAI-compatible API or a file",
          reads=("teacher", "data"), key_extra="stages.teacher:teacher_key", outputs=("teacher.jsonl",),
          plan="stages.teacher:plan_teacher"),
    Stage("snapshot", "stages.snapshot:snapshot_body", "the untouched student q0 answers every prompt once: y_s",
          needs=("teacher",), reads=("snapshot", "student"), key=("snapshot", "student"), outputs=("snapshot.jsonl",),
          scratch=("snapshot.partial.jsonl",)),
    Stage("pairs", "stages.pairs:pairs_body", "preference pairs (x, chosen = y_t, rejected = y_s)",
          needs=("teacher", "snapshot"), reads=("pairs",), key=("pairs",), key_extra="stages.pairs:pairs_key",
          outputs=("pairs.jsonl",)),
    Stage("warmup", "stages.warmup:warmup_body", "SFT of q0 on the teacher answers: q_w",
          needs=("teacher",), reads=("warmup", "student"), key=("warmup", "student"), outputs=("warmup/",),
          model="warmup", metrics="warmup/metrics.jsonl", trains=True),
    Stage("seqkd", "stages.seqkd:seqkd_body", "SeqKD: SFT on the teacher answers to its least held-out loss",
          needs=("teacher",), reads=("seqkd", "student"), key=("seqkd", "student"), outputs=("seqkd/",), model="seqkd",
          metrics="seqkd/metrics.jsonl", trains=True),
    Stage("distill", "stages.distill:distill_body", "DPO on the pairs from q_w, q_w the frozen reference",
          needs=("pairs", "warmup"), reads=("distill", "student", "snapshot", "pairs"),  # its refreshes: q_t's answers
          key=("distill",), key_extra="stages.distill:distill_key", outputs=("distill/",), model="distill",
          metrics="distill/metrics.jsonl", trains=True),
    Stage("gad_warmup", "stages.gad:discriminator_warmup_body", "GAD's discriminator warmup: Bradley–Terry on the pairs",
          needs=("pairs",), reads=("gad", "student"), key=("gad", "student"), outputs=("gad/discriminator_warmup/",),
          metrics="gad/discriminator_warmup/metrics.jsonl", trains=True),
    Stage("gad", "stages.gad:adversarial_body", "GAD's adversarial phase: GRPO on the discriminator's scores",
          needs=("teacher", "warmup", "gad_warmup"), reads=("gad", "student"), key=("gad",),
          outputs=("gad/generator/", "gad/discriminator/"), model="gad/generator", metrics="gad/metrics.jsonl",
          trains=True),
    Stage("opd", "stages.opd:opd_body", "open-teacher distillation: on-policy JSD to a teacher model loaded here",
          needs=("teacher", "warmup"), reads=("opd", "student"), key=("opd",), key_extra="stages.opd:opd_key",
          outputs=("opd/",), model="opd", metrics="opd/metrics.jsonl", trains=True),
)}


@dataclass(frozen=True)
class Method:
    name: str  # as `--method` takes it
    label: str  # its name in tables and figures (the paper's)
    stage: str | None  # the stage whose model it is; None: the run's untouched student
    detail: str = ""  # said beside the label in evaluation tables

    @property
    def column(self) -> str:
        """The method's cell in an evaluation table's Method column."""
        return f"{self.label} ({self.detail})" if self.detail else self.label

    @property
    def chain(self) -> list[str]:
        """The stages that produce this method's model, in the order they run."""
        return chain([self.stage] if self.stage else [])


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("base", "Base", None),
    Method("warmup", "Warmup", "warmup", detail="q_w"),
    Method("seqkd", "SeqKD", "seqkd"),
    Method("soda", "SODA", "distill"),
    Method("gad", "GAD", "gad"),
    Method("opd", "OPD", "opd", detail="white-box"),
)}
DEFAULT_METHODS = ("soda",)  # what `soda-distill run` trains without --method


def chain(stages: list[str]) -> list[str]:
    """These stages and every stage they need, transitively, in registry order (which runs each after its needs)."""
    wanted: set[str] = set()
    todo = list(stages)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += STAGES[name].needs
    return [name for name in STAGES if name in wanted]


def shared_stages(overrides: list[str], stages: tuple[str, ...] = ("teacher", "snapshot", "pairs", "warmup")) -> list[str]:
    """Of `stages` (registry order), those a run with these `section.key=value` overrides can take from a run without
    them: no config section they read touched, and all they need kept too."""
    touched = {override.split(".", 1)[0] for override in overrides}
    kept: list[str] = []
    for name in stages:
        if not touched & set(STAGES[name].reads) and all(need in kept for need in STAGES[name].needs):
            kept.append(name)
    return kept


def methods_named(names: list[str]) -> list[Method]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SodaError(f"unknown method {unknown[0]!r} (methods: {', '.join(METHODS)})")
    return [METHODS[n] for n in dict.fromkeys(names)]


def expected_stages() -> list[str]:
    """The stages every run has: those of the default methods. Others (GAD's) are optional."""
    return chain([m.stage for m in methods_named(list(DEFAULT_METHODS)) if m.stage])


def finished(run_path: Path, records: dict, stage: str) -> bool:
    """Whether `stage` finished in this run directory: its manifest record (written after its outputs) says done,
    and the model it yields, if any, is a model folder. `records` is the manifest's `stages`."""
    model = STAGES[stage].model
    return ((records.get(stage) or {}).get("status") == "done"
            and (model is None or (run_path / model / "config.json").is_file()))


def trained_models(run_path: Path, records: dict) -> list[tuple[Method, Path]]:
    """The run's trained models whose stage finished, in registry order, with their folders."""
    return [(m, run_path / STAGES[m.stage].model) for m in METHODS.values()
            if m.stage and finished(run_path, records, m.stage)]
