import pytest

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
])
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SodaError) as e:
        load_config(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_bad_override():
    with pytest.raises(SodaError, match="expected section.key=value"):
        parse_overrides(["distill.beta"])


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
