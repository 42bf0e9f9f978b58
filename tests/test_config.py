import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from soda_distill.cli import main
from soda_distill.config import Config, fingerprint, load_config, parse_overrides
from soda_distill.errors import SodaError


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student:\n  model: some/model\ndistill:\n  beta: 0.5\n  epochs: 2\n")
    cfg = load_config(path, ["distill.beta=0.05", "warmup.learning_rate=1e-4", "data.limit=null", "student.bf16=false"])
    assert cfg.student.model == "some/model"
    assert cfg.distill.beta == 0.05 and cfg.distill.epochs == 2.0 and isinstance(cfg.distill.epochs, float)
    assert cfg.warmup.learning_rate == 1e-4
    assert cfg.data.limit is None and cfg.student.bf16 is False
    assert cfg.snapshot.temperature == Config().snapshot.temperature  # untouched defaults stay


@pytest.mark.parametrize("text, message", [
    ("distill:\n  betta: 0.1\n", "unknown key 'distill.betta'"),
    ("distill:\n  beta: high\n", "distill.beta: expected float"),
    ("snapshot:\n  batch_size: 2.5\n", "snapshot.batch_size: expected int"),
    ("student: [1, 2]\n", "student: expected a mapping"),
    ("student:\n  model: a\n bad indent: 1\n", "line"),
    ("student:\n", "student: expected a mapping, got None"),
    ("[student, data]\n", "expected a mapping of sections"),
    ("1: x\n", "unknown key '1'"),
    (b"student:\n  model: \xff\n", "line 2: not UTF-8 (byte 18)"),
    ("# padding\n" * 200_000, "the config file is over 1024 KiB"),  # 2 MB: refused unread, not parsed for minutes
    ("gad:\n  discriminator:\n    batch_size: 0\n", "gad.discriminator.batch_size must be at least 1, got 0"),
    ("teacher:\n  concurrency: 0\n", "teacher.concurrency must be at least 1, got 0"),
    ("snapshot:\n  batch_size: -2\n", "snapshot.batch_size must be at least 1, got -2"),
    ("seqkd:\n  lr_scheduler: cosin\n", "seqkd.lr_scheduler: 'cosin' is not one of transformers'"),
    ("distill:\n  loss_type: [sigmoid, sfft]\n", "distill.loss_type: 'sfft' is not one of TRL's"),
    ("distill:\n  loss_type: [sigmoid, sft]\n  loss_weights: [1.0]\n", "distill.loss_weights: 1 weights for 2 loss types"),
])
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SodaError) as e:
        load_config(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)


def test_unreadable_or_empty_config(tmp_path):
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(SodaError, match=f"{path}: cannot read the config file"):
            load_config(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(empty) == Config()  # an empty config is the defaults


def test_bad_override():
    with pytest.raises(SodaError, match="expected section.key=value"):
        parse_overrides(["distill.beta"])
    with pytest.raises(SodaError, match="override 'student.model=y': student is given a value of its own as well as keys"):
        parse_overrides(["student=x", "student.model=y"])


def test_counts_where_zero_means_none_take_zero():
    cfg = load_config(None, ["opd.overlap_k=0", "gad.discriminator.only_steps=0", "evaluate.judge.parse_retries=0"])
    assert cfg.opd.overlap_k == cfg.gad.discriminator.only_steps == cfg.evaluate.judge.parse_retries == 0


def test_the_checked_names_are_the_libraries_own():
    """The learning-rate schedules and DPO loss types a config is checked against are those the installed
    transformers and TRL take."""
    import re

    from transformers.trainer_utils import SchedulerType
    from trl import DPOConfig

    from soda_distill.config.training import DPO_LOSS_TYPES, LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    trl_help = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"].split("If multiple")[0]
    assert set(DPO_LOSS_TYPES) == set(re.findall(r"`'(\w+)'`", trl_help))


def test_operational_fields_do_not_change_the_fingerprint():
    cfg = Config()
    before = fingerprint(cfg.teacher)
    cfg.teacher.concurrency = 64
    assert fingerprint(cfg.teacher) == before
    cfg.teacher.temperature = 0.1
    assert fingerprint(cfg.teacher) != before


def test_lists_and_mappings():
    cfg = load_config(None, ["evaluate.benchmarks=[dolly, vicuna]", "evaluate.models.GPT-5/Teacher=a.jsonl"])
    assert cfg.evaluate.benchmarks == ["dolly", "vicuna"] and cfg.evaluate.models == {"GPT-5/Teacher": "a.jsonl"}
    with pytest.raises(SodaError, match=r"evaluate.benchmarks\[1\]: expected str, got 3"):
        load_config(None, ["evaluate.benchmarks=[dolly, 3]"])
    with pytest.raises(SodaError, match="evaluate.models: expected a mapping"):
        load_config(None, ["evaluate.models=x"])


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_config_cannot_make_the_tool_write_outside_its_run_directory(tmp_path, qa_file, tiny_model_dir, monkeypatch):
    """Every path in a config is an input, only read; the names of what evaluate writes come from the config
    (evaluate.models keys, benchmark file names) and stay inside its directory. The run directory itself is --out
    (or the config's `out`); the only other writes are the caches the environment names (SODA_DISTILL_CACHE etc.)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(qa_file, outside / "generations.jsonl")  # a benchmark named like evaluate's own generation log
    shutil.copy(qa_file, outside / "answers.jsonl")
    write_jsonl(outside / "lmsys.jsonl", [{"id": "c1", "prompt": "Hi there"}])
    (outside / "template.txt").write_text("{question} {answer_1} {answer_2}")
    run = tmp_path / "run"
    config = outside / "c.yaml"
    config.write_text(yaml.safe_dump({
        "student": {"model": str(tiny_model_dir), "bf16": False},
        "data": {"prompts": str(outside / "answers.jsonl"), "limit": 4},
        "teacher": {"file": str(outside / "answers.jsonl")},
        "snapshot": {"max_new_tokens": 4},
        "pairs": {"truncated_rejected": "open"},  # a random tiny model's answers are all cut
        "warmup": {"batch_size": 4, "max_length": 64},
        "distill": {"batch_size": 4, "max_length": 64},
        "evaluate": {"runs": [str(run)], "models": {"..": str(outside / "answers.jsonl"), "../../x": str(outside / "answers.jsonl")},
                     "benchmarks": [str(outside / "generations.jsonl")], "lmsys": str(outside / "lmsys.jsonl"),
                     "limit": 2, "max_new_tokens": 4, "judge": {"template": str(outside / "template.txt")}},
        "analyze": {"prompts": str(outside / "lmsys.jsonl")},
    }))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # relative writes would land here
    before = {"outside": tree(outside), "model": tree(tiny_model_dir)}
    assert main(["run", str(config), "--out", str(run)]) == 0
    assert main(["evaluate", str(config), "--out", str(run / "eval")]) == 0
    assert {"outside": tree(outside), "model": tree(tiny_model_dir)} == before and not any(cwd.iterdir())
    # the model '..' answering the benchmark 'generations' did not overwrite the generation log
    assert all("key" in json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines())
    assert {p.name for p in (run / "eval" / "responses").iterdir()} >= {"_.", "_._.._x"}  # never `..`


def test_the_paper_preset_sets_what_the_paper_states_under_explicit_settings():
    cfg = load_config(None, ["evaluate.preset=paper"]).evaluate
    assert (cfg.max_new_tokens, cfg.prompt_format, cfg.judge.template, cfg.judge.model, cfg.reference.max_tokens) == \
        (1536, "chat", "fastchat", "gpt-4o", 1536)
    mine = load_config(None, ["evaluate.preset=paper", "evaluate.max_new_tokens=64", "evaluate.judge.model=mine"]).evaluate
    assert (mine.max_new_tokens, mine.judge.model, mine.judge.template) == (64, "mine", "fastchat")
    assert load_config(None, []).evaluate.max_new_tokens == 256
    with pytest.raises(SodaError, match="evaluate.preset: unknown preset 'papr' \\(presets: paper\\)"):
        load_config(None, ["evaluate.preset=papr"])


@pytest.mark.parametrize("section", ["warmup", "distill", "gad"])
def test_warmup_ratio_is_a_fraction_of_the_steps(section):
    """transformers reads warmup_steps below 1 as a fraction, from 1 on as a step count: a ratio of 1 would have been
    a single warmup step."""
    from soda_distill.training import trainer_arguments
    from transformers import TrainingArguments

    cfg = load_config(None, [f"{section}.warmup_ratio=0.5"])
    args = TrainingArguments(**{k: v for k, v in trainer_arguments(getattr(cfg, section), "/tmp/x", cfg).items()
                                if k not in ("max_length", "activation_checkpointing")})
    assert args.get_warmup_steps(10) == 5
    with pytest.raises(SodaError, match=f"{section}.warmup_ratio must be at least 0 and below 1"):
        load_config(None, [f"{section}.warmup_ratio=1.0"])


def test_a_key_added_later_leaves_old_fingerprints_at_its_default():
    """distill.use_weighting came after runs were made: at its default the distill stage's fingerprint is what it
    was before (a pinned value), so `run` on such a run directory finds its DPO finished; set, it differs."""
    assert fingerprint(load_config(None, []).distill) == "165413c472b01873"
    assert fingerprint(load_config(None, ["distill.use_weighting=true"]).distill) != "165413c472b01873"


def test_a_changed_default_of_an_added_key_keeps_old_runs_at_their_value():
    """pairs.truncated_rejected's default went from open to drop: a run made with open (the key left out of its
    fingerprint, pinned here) still matches when `open` is set; the new default is a setting of its own."""
    assert fingerprint(load_config(None, ["pairs.truncated_rejected=open"]).pairs) == "728acebe6d98f4e5"
    assert fingerprint(load_config(None, []).pairs) != "728acebe6d98f4e5"
    assert load_config(None, []).pairs.truncated_rejected == "drop" and load_config(None, []).warmup.epochs == 3


def test_the_trackers_section_loads_under_its_old_name(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("training:\n  report_to: [tensorboard]\n  project: mine\n")
    assert load_config(old).trackers.report_to == ["tensorboard"] and load_config(old).trackers.project == "mine"
    assert load_config(None, ["training.project=p"]).trackers.project == "p"


def test_gads_discriminator_keys_moved_into_a_section_keep_loading_and_keying(tmp_path):
    """gad.discriminator_* became gad.discriminator.*: a config with the old names (a run's config.yaml) loads as the
    new, an override in either spelling wins over the file, and the section's fingerprint is the one runs were keyed
    with before the move (pinned values)."""
    old = tmp_path / "old.yaml"
    old.write_text("gad:\n  discriminator_learning_rate: 3.0e-5\n  discriminator_only_steps: 4\n")
    new = load_config(None, ["gad.discriminator.learning_rate=3e-5", "gad.discriminator.only_steps=4"]).gad
    assert load_config(old).gad == new and new.discriminator.only_steps == 4
    assert load_config(old, ["gad.discriminator.only_steps=5"]).gad.discriminator.only_steps == 5
    nested = tmp_path / "new.yaml"
    nested.write_text("gad:\n  discriminator:\n    only_steps: 4\n")
    assert load_config(nested, ["gad.discriminator_only_steps=6"]).gad.discriminator.only_steps == 6
    assert fingerprint(new) == "0b9760a49cfe4ade" and fingerprint(load_config(None, []).gad) == "b18339750ae9be91"


def test_keys_shows_each_key_with_its_value_and_help(capsys):
    assert main(["keys", "--section", "distill", "--section", "evaluate", "distill.beta=0.3"]) == 0
    out = capsys.readouterr().out.splitlines()
    keys = [line.split(" = ")[0] for line in out if not line.startswith(" ")]
    assert "distill.beta = 0.3" in out and "evaluate.judge.template" in keys and "warmup.epochs" not in keys
    assert all(out[i + 1].startswith("    ") and out[i + 1].strip() for i, line in enumerate(out) if not line.startswith(" "))
    assert main(["keys", "--section", "nope"]) == 2
    assert "--section nope: no such section" in capsys.readouterr().err


def test_arguments_are_told_apart_by_shape_not_by_the_disk(tmp_path, monkeypatch, capsys):
    """A settings-like argument is a setting even where a file of that name exists, and a path is never a setting."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "distill.beta=0.5").write_text("")
    assert main(["keys", "--section", "distill", "distill.beta=0.5"]) == 0
    assert "distill.beta = 0.5" in capsys.readouterr().out
    assert main(["run", "one.yaml", "two.yaml", "--dry-run"]) == 2
    assert "two.yaml: one CONFIG file at most" in capsys.readouterr().err
