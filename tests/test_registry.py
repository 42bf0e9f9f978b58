"""The registry is the one map of a run directory: consistent, complete, and read by everything that finds a run's
stages or models. That a real run leaves exactly what it lists is checked where runs are made (test_e2e, test_gad)."""

import json
import subprocess
import sys

import pytest

from soda_distill.errors import SodaError
from soda_distill.manifest import RunDir
from soda_distill.plots import TRAINING_CURVES
from soda_distill.registry import METHODS, STAGES, chain, expected_stages, finished, methods_named, shared_stages


def test_every_stage_runs_after_what_it_needs():
    import dataclasses

    from soda_distill.config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    order = list(STAGES)
    for name, stage in STAGES.items():
        assert stage.reads and set(stage.reads) <= sections, name
        assert all(order.index(need) < order.index(name) for need in stage.needs), name
        assert stage.outputs, name
        if stage.model:
            assert any(out.rstrip("/") == stage.model for out in stage.outputs), name


def test_every_stage_function_exists():
    from soda_distill.registry import imported

    for stage in STAGES.values():
        for name in filter(None, (stage.body, stage.key_extra, stage.plan)):
            assert callable(imported(name)), (stage.name, name)


def test_method_chains():
    assert METHODS["base"].chain == []
    assert METHODS["warmup"].chain == ["teacher", "warmup"]
    assert METHODS["seqkd"].chain == ["teacher", "seqkd"]
    assert METHODS["soda"].chain == ["teacher", "snapshot", "pairs", "warmup", "distill"] == expected_stages()
    assert METHODS["gad"].chain == ["teacher", "snapshot", "pairs", "warmup", "gad_warmup", "gad"]
    assert METHODS["opd"].chain == ["teacher", "warmup", "opd"]
    assert chain(["distill", "gad", "seqkd", "opd"]) == list(STAGES)  # shared stages once
    assert [m.column for m in METHODS.values()] == ["Base", "Warmup (q_w)", "SeqKD", "SODA", "GAD", "OPD (white-box)"]
    with pytest.raises(SodaError, match="unknown method 'sodaa'"):
        methods_named(["sodaa"])


def test_a_variant_shares_the_stages_its_overrides_leave_alone():
    """What bench/quality.py's variants and bench/sweep.py's points take from the run they start from."""
    assert shared_stages(["distill.beta=0.5"]) == ["teacher", "snapshot", "pairs", "warmup"]
    assert shared_stages(["pairs.rejected_source=other_q0"]) == ["teacher", "snapshot", "warmup"]
    assert shared_stages(["pairs.same_prompts_as=runs/a/pairs.jsonl"]) == ["teacher", "snapshot", "warmup"]
    assert shared_stages(["snapshot.temperature=1.0"]) == ["teacher", "warmup"]  # the pairs read the snapshot
    assert shared_stages(["warmup.epochs=3", "distill.beta=0.5"]) == ["teacher", "snapshot", "pairs"]
    assert shared_stages(["student.model=other"]) == ["teacher"]  # the teacher's answers do not depend on it
    assert shared_stages(["data.limit=10"]) == []  # other prompts: another teacher stage


def test_a_variant_starts_from_copies_or_links_of_the_shared_stages(tmp_path):
    from soda_distill.manifest import copy_stages

    source = tmp_path / "source"
    (source / "warmup" / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (source / "warmup" / "model.safetensors").write_text("weights")
    (source / "warmup" / "config.json").write_text("{}")
    for name in ("teacher", "snapshot", "pairs"):
        (source / f"{name}.jsonl").write_text(name)
    stages = {name: {"status": "done", "fingerprint": name} for name in ("teacher", "snapshot", "pairs", "warmup")}
    (source / "manifest.json").write_text(json.dumps({"stages": stages, "inputs": {"prompts": "abc"}}))
    copy_stages(source, tmp_path / "copy", shared_stages(["warmup.epochs=3"]))
    copied = json.loads((tmp_path / "copy" / "manifest.json").read_text())
    assert list(copied["stages"]) == ["teacher", "snapshot", "pairs"] and copied["inputs"] == {"prompts": "abc"}
    assert not (tmp_path / "copy" / "warmup").exists() and (tmp_path / "copy" / "pairs.jsonl").stat().st_nlink == 1
    linked = tmp_path / "linked"  # a sweep's point: linked, and given more stages on a later call
    copy_stages(source, linked, ["teacher"], link=True)
    copy_stages(source, linked, shared_stages(["distill.beta=0.5"]), link=True)
    assert list(json.loads((linked / "manifest.json").read_text())["stages"]) == ["teacher", "snapshot", "pairs", "warmup"]
    assert (linked / "warmup" / "model.safetensors").stat().st_nlink == 2 and not (linked / "warmup" / "checkpoints").exists()
    # a source run that stopped at its warmup (`--method warmup`) gives what it has: not its unfinished stages
    stages["snapshot"]["status"] = "started"
    del stages["pairs"]
    (source / "manifest.json").write_text(json.dumps({"stages": stages}))
    copy_stages(source, tmp_path / "partial", ["teacher", "snapshot", "pairs"])
    assert list(json.loads((tmp_path / "partial" / "manifest.json").read_text())["stages"]) == ["teacher"]
    assert not (tmp_path / "partial" / "snapshot.jsonl").exists()


def test_every_training_stage_has_its_curves():
    assert {c.stage for c in TRAINING_CURVES} == {name for name, s in STAGES.items() if s.metrics}
    assert all(c.metrics == STAGES[c.stage].metrics for c in TRAINING_CURVES)


def test_finished_needs_the_record_and_the_model(tmp_path):
    run = RunDir(tmp_path / "run")
    record = {"status": "done", "fingerprint": "x", "wall_s": 1.0}
    run.manifest_path.write_text(json.dumps({"stages": {"warmup": record, "pairs": record}}))
    assert run.finished("pairs") and not run.finished("distill")
    (run.path / "warmup").mkdir()
    assert not run.finished("warmup")  # a model folder needs its config.json
    (run.path / "warmup" / "config.json").write_text("{}")
    assert run.finished("warmup")
    assert [(m.name, p) for m, p in run.trained_models()] == [("warmup", run.path / "warmup")]
    assert not finished(run.path, {"warmup": {**record, "status": "started"}}, "warmup")


def test_reading_results_imports_no_trainer():
    """Evaluation and reporting import no trainer; the report needs no torch at all."""
    code = ("import sys, soda_distill, soda_distill.report, soda_distill.markdown_html, soda_distill.plots; "
            "assert 'torch' not in sys.modules, 'report imports torch'; "
            "import soda_distill.evaluation.evaluate, soda_distill.evaluation.analyze, soda_distill.evaluation.judge; "
            "import soda_distill.cli, soda_distill.manifest; "
            "assert not [m for m in sys.modules if m == 'trl' or m.startswith('trl.')], 'evaluation imports trl'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_quality_variant_takes_the_stages_its_settings_leave_alone(tmp_path, monkeypatch):
    """bench/quality.py: what a variant copies from a run of configs/quality.yaml, and when its q_w is a row of its own."""
    from pathlib import Path

    from soda_distill.config import load_config, save_config
    from soda_distill.pipeline import resolve_paths

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import quality

    def a_run(path: Path, settings: list[str], fingerprints: dict[str, str]) -> Path:
        (path / "warmup").mkdir(parents=True)
        (path / "warmup" / "config.json").write_text("{}")
        save_config(resolve_paths(load_config(quality.CONFIG, settings)), path / "config.yaml")
        stages = {name: {"status": "done", "fingerprint": fp} for name, fp in fingerprints.items()}
        (path / "manifest.json").write_text(json.dumps({"stages": stages}))
        return path

    source = a_run(tmp_path / "seed-42", [], dict.fromkeys(("teacher", "snapshot", "pairs", "warmup"), "a"))
    assert quality.shared_with(source, ["distill.refresh_every=4"], "distill") == ["teacher", "snapshot", "pairs", "warmup"]
    assert quality.shared_with(source, ["warmup.epochs=3"], "distill") == ["teacher", "snapshot", "pairs"]
    assert quality.shared_with(source, ["warmup.teacher_kl=1.0"], "warmup") == ["teacher"]
    assert quality.shared_with(source, ["data.limit=10"], "distill") == []
    assert quality.shared_with(tmp_path / "nothing", [], "distill") == []
    # a variant's q_w is a row of its own once trained with settings no earlier run had
    same, other = (a_run(tmp_path / name, [], {"warmup": fp}) for name, fp in (("same", "a"), ("other", "b")))
    assert not quality.new_model(same, "warmup", [source]) and quality.new_model(other, "warmup", [source])
    again = a_run(tmp_path / "again", [], {"warmup": "b"})  # the same settings as `other`, named after it
    assert not quality.new_model(again, "warmup", [source, other])
    assert not quality.new_model(tmp_path / "x", "warmup", []) and not (tmp_path / "x").exists()  # a variant not begun


def test_reads_name_every_section_a_key_reads(tmp_path, monkeypatch):
    """Each section a stage's key takes whole, declared (`key`) or added by its `key_extra`, is one its `reads` names
    (its own first): one outside them would let a variant reuse a stage whose settings it changed, which then stops on
    its key. (Single settings read directly, such as data.limit for the teacher, are not seen here.)"""
    import dataclasses

    from soda_distill import keys
    from soda_distill.config import load_config

    for model in ("warmup", "gad/discriminator_warmup", "teacher_model"):  # weights enough for a model's digest
        (tmp_path / "run" / model).mkdir(parents=True)
        (tmp_path / "run" / model / "model.safetensors").write_bytes(b"")
        (tmp_path / "run" / model / "config.json").write_text("{}")
    for name in ("teacher.jsonl", "snapshot.jsonl", "pairs.jsonl"):
        (tmp_path / "run" / name).write_text("{}\n")
    cfg = load_config(None, [f"teacher.file={tmp_path / 'run' / 'teacher.jsonl'}", "distill.refresh_every=4",
                             f"opd.teacher_model={tmp_path / 'run' / 'teacher_model'}", "student.lora={r: 8}"])
    section_of = {}  # a section's type, or its own sections' (student.lora: student) -> its name in the config
    for name, section in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)):
        inner = [getattr(section, f.name) for f in dataclasses.fields(section)] if dataclasses.is_dataclass(section) else []
        section_of |= {type(value): name for value in (section, *inner) if dataclasses.is_dataclass(value)}

    for stage in STAGES.values():
        assert set(stage.key) <= set(stage.reads), stage.name
        seen = set()
        monkeypatch.setattr(keys, "fingerprint", lambda section: seen.add(section_of[type(section)]) or "fp")
        keys.key_of(stage.name, cfg, RunDir(tmp_path / "run"))
        assert stage.reads[0] in seen and seen <= set(stage.reads), (stage.name, seen)


def test_committed_rows_of_another_precision_are_left_out(tmp_path, monkeypatch):
    """bench/quality.py --with-committed: a committed row trained in another precision or scored in another dtype than
    this call's does not join its table (nor does a row this call makes again); a row with no provenance recorded
    (made before) does where this call scores as rows then did, in the student's precision."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import quality

    (tmp_path / "index.json").write_text(json.dumps({"seed-42/SODA": "a.jsonl", "seed-43/SODA": "b.jsonl",
                                                     "seed-44/SODA": "c.jsonl", "seed-44/Base": "d.jsonl",
                                                     "seed-45/SODA": "e.jsonl"}))
    (tmp_path / "provenance.json").write_text(json.dumps({"seed-42/SODA": {"precision": "fp32"},
                                                          "seed-43/SODA": {"precision": "bf16"},
                                                          "seed-45/SODA": {"precision": "bf16", "nll_dtype": "float32"}}))
    kept = quality.committed_rows(tmp_path, {"seed-44/Base"}, {"precision": "bf16", "nll_dtype": "bfloat16"})
    assert kept == {"seed-43/SODA": str(tmp_path / "b.jsonl"), "seed-44/SODA": str(tmp_path / "c.jsonl")}
    # trained in bf16 and scored in fp32 (evaluate.nll_dtype's default): only a row that says it was scored so joins
    kept = quality.committed_rows(tmp_path, set(), {"precision": "bf16", "nll_dtype": "float32"})
    assert kept == {"seed-45/SODA": str(tmp_path / "e.jsonl")}


def test_a_seed_without_a_base_row_takes_a_committed_one(tmp_path, monkeypatch):
    """bench/quality.py --with-committed: Base does not depend on the seed, so a seed that neither makes nor has a Base
    row gets a committed one's answers; the kept row says whose they are and keeps its provenance."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import quality

    committed = {"seed-42/Base": "a.jsonl", "seed-42/SODA": "b.jsonl"}
    made_on = {"seed-42/Base": "x86_64, 2 cores, bf16 on amx"}
    assert quality.shared_bases(committed, [42, 43, 44], {"seed-44/Base", "seed-44/SODA"}, made_on,
                                "x86_64, 2 cores, bf16 on amx") == {"seed-43/Base": "seed-42/Base"}
    assert quality.shared_bases({"seed-42/SODA": "b.jsonl"}, [43], set(), made_on, "x86_64, 2 cores, bf16 on amx") == {}
    # made on another kind of machine (or one that did not say which): its greedy answers are not this one's
    for other in ("x86_64, 2 cores, bf16 on avx512_bf16", "x86_64, 2 cores, bf16"):
        assert quality.shared_bases(committed, [43], set(), {"seed-42/Base": other}, "x86_64, 2 cores, bf16 on amx") == {}
    # kept: the row's file, and its provenance naming the row whose answers these are
    evaldir, rows = tmp_path / "evaluation", tmp_path / "rows"
    for label in ("seed-42/Base", "seed-43/Base", "seed-43/SeqKD"):
        (evaldir / "responses" / label.replace("/", "_")).mkdir(parents=True)
        (evaldir / "responses" / label.replace("/", "_") / "b.jsonl").write_text(f'{{"row": "{label}"}}\n')
    rows.mkdir()
    (rows / "provenance.json").write_text(json.dumps({"seed-42/Base": {"precision": "bf16", "machine": "m"}}))
    (rows / "seed-42_Base.jsonl").write_text('{"row": "as kept before"}\n')
    evaluation = {"benchmarks": [{"name": "b"}],
                  "rows": [{"model": "seed-42", "method": "Base"}, {"model": "seed-43", "method": "Base"},
                           {"model": "seed-43", "method": "SeqKD"}]}
    quality.keep_rows(evaldir, evaluation, rows, {"seed-43/SeqKD"}, {"precision": "bf16", "machine": "n"},
                      {"seed-43/Base": "seed-42/Base"})
    made_by = json.loads((rows / "provenance.json").read_text())
    assert made_by["seed-43/Base"] == {"precision": "bf16", "machine": "m", "answers_of": "seed-42/Base"}
    assert made_by["seed-43/SeqKD"] == {"precision": "bf16", "machine": "n"}
    # gzipped, read back as evaluate reads a response file; a row kept before as plain JSONL replaced
    from soda_distill.records import read_jsonl

    assert json.loads((rows / "index.json").read_text())["seed-43/Base"] == "seed-43_Base.jsonl.gz"
    assert [r for _, r in read_jsonl(rows / "seed-43_Base.jsonl.gz")] == [{"row": "seed-43/Base"}]
    assert sorted(p.name for p in rows.glob("seed-42_*")) == ["seed-42_Base.jsonl.gz"]


def test_a_table_from_committed_rows_keeps_what_made_them(tmp_path, monkeypatch):
    """bench/quality.py: a results file rewritten from committed rows (`--methods none --with-committed`) keeps the
    stage records of the runs it did not touch and the commands that made them."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import quality

    done = {"warmup": {"done": True, "wall_s": 817.9}, "distill": {"done": True, "wall_s": 1965.6}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"command": "first", "date": "d1", "runs": {"seed-42": done}}))
    again = {"command": "again", "date": "d2", "evaluation_complete": True,
             "runs": {"seed-42": {"warmup": {"done": False}}, "seed-43": {"warmup": {"done": True, "wall_s": 5.0}}}}
    merged = quality.carry_over(path, again)
    assert merged["runs"] == {"seed-42": done, "seed-43": {"warmup": {"done": True, "wall_s": 5.0}}}
    assert merged["earlier_commands"] == [{"date": "d1", "command": "first"}]
    path.write_text(json.dumps(merged))
    assert quality.carry_over(path, {**again, "date": "d3"})["earlier_commands"] == [{"date": "d1", "command": "first"}]
    # a piece that leaves the table unfinished: the file's table and history stay, the piece's record beside them
    piece = {**again, "command": "next", "evaluation_complete": False}
    unfinished = quality.carry_over(path, piece)
    assert unfinished == {**merged, "in_progress": piece}
    path.write_text(json.dumps(unfinished))
    finished = quality.carry_over(path, {**again, "command": "next", "date": "d4"})
    assert "in_progress" not in finished and finished["command"] == "next"
    assert finished["earlier_commands"] == [{"date": "d1", "command": "first"}, {"date": "d2", "command": "again"}]
    assert quality.carry_over(tmp_path / "none.json", piece) == piece
