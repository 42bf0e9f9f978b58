"""A stage's key must stay byte for byte what it was for the same settings and inputs, or every run directory made
before loses its finished stages. Each stage's key is written out here by hand, as the stages built it before the
pipeline took the protocol over, and checked against the pipeline's (keys.py) over the settings that change a key's
form; a finished run's keys against its manifest: test_kill_resume.py."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
from conftest import QA, write_jsonl

from soda_distill.config import REJECTED_SOURCES, fingerprint, load_config
from soda_distill.keys import key_of
from soda_distill.manifest import RunDir, combine
from soda_distill.models import model_digest, use_bf16
from soda_distill.pipeline import resolve_paths
from soda_distill.records import sha256_file, shown_data_path, source_digest
from soda_distill.registry import STAGES

PACKAGE = Path(__file__).parents[1] / "src" / "soda_distill"


def by_hand(cfg, run: RunDir, start: Path | None = None) -> dict[str, str]:
    """Each stage's key as the stages computed it before (distill's from `start` where given)."""
    p = run.path
    teacher, snapshot, pairs = (sha256_file(p / name) for name in ("teacher.jsonl", "snapshot.jsonl", "pairs.jsonl"))
    warmup = model_digest(p / "warmup")
    lora = [fingerprint(cfg.student.lora)] if cfg.student.lora else []
    t, o = cfg.teacher, cfg.opd
    shown = dataclasses.replace(t, file=shown_data_path(t.file)) if t.file else t
    source = [source_digest(t.file or cfg.data.prompts), str(cfg.data.limit),
              *([json.dumps(cfg.data.columns, sort_keys=True)] if cfg.data.columns else [])]
    rejected, same = cfg.pairs.rejected_source, cfg.pairs.same_prompts_as
    teacher_bf16 = use_bf16(cfg.student.bf16) if o.teacher_bf16 is None else o.teacher_bf16
    return {
        "teacher": combine(fingerprint(shown), *source),
        "snapshot": combine(fingerprint(cfg.snapshot), fingerprint(cfg.student), teacher),
        "pairs": combine(fingerprint(cfg.pairs), teacher, snapshot,
                         *([] if rejected in REJECTED_SOURCES else [sha256_file(Path(rejected))]),
                         *([sha256_file(Path(same))] if same else [])),
        "warmup": combine(fingerprint(cfg.warmup), fingerprint(cfg.student), teacher),
        "seqkd": combine(fingerprint(cfg.seqkd), fingerprint(cfg.student), teacher),
        "distill": combine(fingerprint(cfg.distill), pairs, model_digest(start or p / "warmup"), *lora,
                           *([fingerprint(cfg.snapshot), cfg.pairs.truncated_rejected] if cfg.distill.refresh_every else [])),
        "gad_warmup": combine(fingerprint(cfg.gad), fingerprint(cfg.student), pairs),
        "gad": combine(fingerprint(cfg.gad), teacher, warmup, model_digest(p / "gad" / "discriminator_warmup")),
        "opd": combine(fingerprint(o), teacher, warmup, model_digest(Path(o.teacher_model)), *lora,
                       *(["teacher in bf16"] if teacher_bf16 else [])),
    }


@pytest.fixture
def run(tmp_path) -> RunDir:
    """A run directory of placeholder outputs: keys read files' bytes and model folders' weights and configs only."""
    for model in ("warmup", "gad/discriminator_warmup", "teacher_model", "start"):
        (tmp_path / "run" / model).mkdir(parents=True)
        (tmp_path / "run" / model / "model.safetensors").write_bytes(model.encode())
        (tmp_path / "run" / model / "config.json").write_text(json.dumps({"name": model}))
    for name in ("teacher", "snapshot", "pairs"):
        write_jsonl(tmp_path / "run" / f"{name}.jsonl", QA[: len(name)])
    write_jsonl(tmp_path / "other.jsonl", QA[3:])
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": r["id"], "prompt": r["messages"][0]["content"]} for r in QA])
    write_jsonl(tmp_path / "columns.jsonl", [{"q": r["messages"][0]["content"], "a": r["messages"][1]["content"]} for r in QA])
    return RunDir(tmp_path / "run")


SETTINGS = {
    "defaults": [],
    "lora": ["student.lora={r: 4}"],
    "refreshed": ["distill.refresh_every=3", "snapshot.temperature=0.5"],
    "refreshed with lora, cut answers dropped": ["distill.refresh_every=3", "student.lora={r: 8, alpha: 16}",
                                                 "pairs.truncated_rejected=drop"],
    "rejected from a file": ["pairs.rejected_source={tmp}/other.jsonl"],
    "rejected: other_q0": ["pairs.rejected_source=other_q0"],
    "rejected from a file, on another run's prompts": ["pairs.rejected_source={tmp}/other.jsonl",
                                                       "pairs.same_prompts_as={tmp}/run/pairs.jsonl"],
    "opd teacher in bf16": ["opd.teacher_bf16=true"],
    "student in bf16, opd teacher in fp32": ["student.bf16=true", "opd.teacher_bf16=false"],
    "student in bf16": ["student.bf16=true"],
    "shipped teacher file": ["teacher.file=builtin:dolly_heldout", "data.limit=6"],
    "teacher file with columns": ["teacher.file={tmp}/columns.jsonl", "data.columns={prompt: q, response: a}"],
    "teacher api": ["teacher.file=null", "data.prompts={tmp}/prompts.jsonl", "teacher.base_url=http://127.0.0.1:9/v1",
                    "teacher.model=m", "teacher.top_logprobs=5", "data.limit=3"],
}


@pytest.mark.parametrize("settings", SETTINGS)
def test_every_key_is_the_one_the_stages_computed_before(run, settings):
    overrides = [s.replace("{tmp}", str(run.path.parent)) for s in SETTINGS[settings]]
    cfg = resolve_paths(load_config(None, [f"teacher.file={run.path / 'teacher.jsonl'}", "student.bf16=false",
                                           f"opd.teacher_model={run.path / 'teacher_model'}", *overrides]))
    expected = by_hand(cfg, run)
    for stage in STAGES:
        assert key_of(stage, cfg, run)[0] == expected[stage], (settings, stage)
    start = run.path / "start"  # run_distill's DPO from another model: keyed in q_w's place
    assert key_of("distill", cfg, run, {"warmup": start})[0] == by_hand(cfg, run, start)["distill"] != expected["distill"]


def test_a_shipped_teacher_file_was_keyed_by_its_path_before(run):
    """Runs made before the `builtin:NAME` rule keyed the shipped file by its path: that key is the legacy one."""
    cfg = resolve_paths(load_config(None, ["teacher.file=builtin:dolly_heldout", "data.limit=6"]))
    key, legacy = key_of("teacher", cfg, run)
    assert legacy == combine(fingerprint(cfg.teacher), source_digest(cfg.teacher.file), "6") != key


def test_no_stage_keys_or_records_itself():
    """The pipeline owns the protocol: a stage module declares its key's extra parts and returns its figures."""
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        found = re.findall(r"\brun\.(?:done|stage)\(|\bfingerprint\(|\bcombine\(", path.read_text())
        assert not found, (path.name, found)
