"""Prompts and teacher answers from any file `datasets` reads locally — JSON, CSV, Parquet, a saved data set — with
a column mapping (`data.columns`), and the same one-line errors naming file, line (or row) and the file's field."""

import json
import os
import subprocess
import sys

import datasets
import pytest

from soda_distill.cli import main
from soda_distill.config import load_config
from soda_distill.errors import InputError, SodaError
from soda_distill.manifest import RunDir
from soda_distill.records import read_examples
from soda_distill.stages.teacher import run_teacher

ROWS = [{"instruction": "Name a color.", "output": "Red.", "key": "a"},
        {"instruction": "What is 2+2?", "output": "4", "key": "b"}]  # a CSV reader would make "4" a number
COLUMNS = {"prompt": "instruction", "response": "output", "id": "key"}


def save(tmp_path, kind: str, rows=ROWS):
    data = datasets.Dataset.from_list(rows)
    path = tmp_path / f"answers.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))  # one JSON array, as people export it
    elif kind == "csv":
        data.to_csv(str(path), index=False)
    elif kind == "parquet":
        data.to_parquet(str(path))
    else:
        data.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "saved"])
def test_teacher_answers_from_any_local_format_with_a_column_mapping(tmp_path, kind):
    path = save(tmp_path, kind)
    cfg = load_config(None, [f"teacher.file={path}", "data.columns={prompt: instruction, response: output, id: key}"])
    run = RunDir(tmp_path / "run")
    examples = read_examples(run_teacher(cfg, run), want_response=True)
    assert [(e.id, e.prompt[0]["content"], e.response) for e in examples] == \
        [("a", "Name a color.", "Red."), ("b", "What is 2+2?", "4")]
    assert len(run.manifest()["inputs"][str(path)]) == 64  # a digest of the source, folder or file


@pytest.mark.parametrize("kind, where", [("csv", "line 3"), ("parquet", "row 2"), ("json", "row 2")])
def test_a_bad_record_names_the_file_its_line_or_row_and_the_files_own_field(tmp_path, kind, where):
    path = save(tmp_path, kind, [ROWS[0], {**ROWS[1], "instruction": "  "}])
    with pytest.raises(InputError) as e:
        read_examples(path, want_response=True, columns=COLUMNS)
    assert str(e.value) == f"{path}, {where}, field 'instruction': empty prompt"
    with pytest.raises(InputError, match=rf"{where.split()[0]} {2 if kind == 'csv' else 1}, field 'answer': missing \(data.columns maps it to 'response'\)"):
        read_examples(path, columns={"prompt": "instruction", "response": "answer"})


def test_the_command_line_prints_one_line_for_an_unreadable_file(tmp_path, capsys):
    bad = tmp_path / "answers.parquet"
    bad.write_bytes(b"not parquet at all")
    assert main(["teacher", "--out", str(tmp_path / "run"), f"teacher.file={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"soda-distill: error: {bad}: cannot be read as a data set (") and err.count("\n") == 1


def test_an_unknown_column_target_is_refused():
    with pytest.raises(SodaError, match="data.columns: 'answer' is not a field to map"):
        load_config(None, ["data.columns={answer: output}"])


def test_a_hub_data_set_offline_is_one_clear_line(tmp_path):
    """No network here: `hub:` names reach datasets.load_dataset, whose failure offline is reported in one line."""
    code = ("from soda_distill.records import read_examples\n"
            "from soda_distill.errors import InputError\n"
            "try: read_examples('hub:someorg/no-such-set')\n"
            "except InputError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert out.stdout.startswith("hub:someorg/no-such-set: cannot be read as a data set (")
