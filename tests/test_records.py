import gzip
import json
import re
import tracemalloc

import pytest

from soda_distill.cli import main
from soda_distill.config import load_config
from soda_distill.errors import InputError
from soda_distill.evaluation.analyze import analyze_runs
from soda_distill.evaluation.benchmarks import load_benchmarks
from soda_distill.evaluation.evaluate import prepare_evaluation, run_evaluate
from soda_distill.manifest import RunDir
from soda_distill.append_log import AppendLog
from soda_distill.records import MAX_LINE_BYTES, atomic_write_jsonl, is_jsonl, read_examples, read_pairs
from soda_distill.stages.teacher import run_teacher


def write(tmp_path, *lines: str):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def config(*overrides):
    return load_config(None, list(overrides))


def evaluate(tmp_path, *overrides):
    cfg = config(*overrides)
    return run_evaluate(cfg, prepare_evaluation(cfg, tmp_path / "eval"))


# Every JSONL file the tool reads, each read the way the tool reads it (these fail before any model or endpoint).
READERS = {
    "prompts": lambda path, tmp: run_teacher(config(f"data.prompts={path}", "teacher.base_url=http://127.0.0.1:9/v1",
                                                    "teacher.model=m", "teacher.api_key_env=null"), RunDir(tmp / "run")),
    "teacher-answers": lambda path, tmp: run_teacher(config(f"teacher.file={path}"), RunDir(tmp / "run")),
    "benchmark": lambda path, tmp: load_benchmarks(config(f"evaluate.benchmarks=[{path}]").evaluate),
    "lmsys": lambda path, tmp: load_benchmarks(config(f"evaluate.lmsys={path}", "evaluate.benchmarks=[]").evaluate),
    "responses": lambda path, tmp: evaluate(tmp, "evaluate.benchmarks=[vicuna]", f"evaluate.models.M/File={path}"),
    "analyze-prompts": lambda path, tmp: analyze_runs(config(f"analyze.prompts={path}"), [], tmp / "analysis"),
    "pairs": lambda path, tmp: read_pairs(path),  # pairs.jsonl as distill (and GAD) read it
}
ENORMOUS = object()  # stands for a 50 MB line (written sparse: no disk space, no time)


def turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


GOOD = {"id": "a", "messages": turns(("user", "hi"), ("assistant", "hello"))}
GOOD_PAIR = {"id": "a", "prompt": turns(("user", "hi")), "chosen": turns(("assistant", "Hello!")),
             "rejected": turns(("assistant", "Bye."))}
# (case, the records after a good first one — None: a file of blank lines only —, line, field, what the message
# says); records are complete but for their flaw, so that every reader reports the flaw itself
FILE_CASES = [
    ("bad-json", [b"{not json"], 2, None, "not valid JSON"),
    ("not-an-object", [b"[1, 2]"], 2, None, "expected a JSON object"),
    ("non-utf8", [b'{"prompt": "\xff", "response": "a"}'], 2, None, r"not UTF-8 \(byte 12\)"),
    ("enormous-line", [ENORMOUS], 2, None, "longer than 16 MiB"),
]
RECORD_CASES = [
    ("no-messages-or-prompt", [{"text": "x"}], 2, "messages", "missing"),
    ("messages-not-a-list", [{"messages": "hi"}], 2, "messages", "non-empty list"),
    ("messages-empty", [{"messages": []}], 2, "messages", "non-empty list"),
    ("turn-not-an-object", [{"messages": ["hi"]}], 2, "messages[0]", "expected an object"),
    ("role-missing", [{"messages": [{"content": "hi"}]}], 2, "messages[0].role", "unknown role None"),
    ("unknown-role", [{"messages": turns(("wizard", "hi"))}], 2, "messages[0].role", "unknown role 'wizard'"),
    ("content-missing", [{"messages": [{"role": "user"}]}], 2, "messages[0].content", "missing"),
    ("content-not-a-string", [{"messages": turns(("user", 3))}], 2, "messages[0].content", "not a string"),
    ("prompt-not-a-string", [{"prompt": ["hi"], "response": "a"}], 2, "prompt", "expected a string"),
    ("response-not-a-string", [{"prompt": "hi", "response": 5}], 2, "response", "expected a string"),
    ("id-not-a-string", [{"prompt": "q", "response": "a", "id": [1]}], 2, "id", "expected a string or integer"),
    ("empty-prompt", [{"prompt": "", "response": "a"}], 2, "prompt", "empty prompt"),
    ("whitespace-prompt", [{"messages": turns(("user", " \n\t"), ("assistant", "a"))}], 2, "messages", "empty prompt"),
    ("no-user-turn", [{"messages": turns(("system", "s"), ("assistant", "a"))}], 2, "messages", "must end with a user turn"),
    ("assistant-only", [{"messages": turns(("assistant", "a"))}], 2, "messages", "no prompt before it"),
    ("duplicate-id", [{"id": "a", "prompt": "other", "response": "a"}], 2, "id", r"duplicate id 'a' \(first on line 1\)"),
    ("duplicate-prompt-without-ids", [{"prompt": "q", "response": "a"}, {"prompt": "q", "response": "b"}], 3, "prompt",
     "the same prompt as line 2"),
    ("no-records", None, None, None, "no records"),
]
PAIR_CASES = [
    ("chosen-missing", [{k: v for k, v in GOOD_PAIR.items() if k != "chosen"} | {"id": "b"}], 2, "chosen", "missing"),
    ("chosen-not-a-list", [GOOD_PAIR | {"id": "b", "chosen": "Hello!"}], 2, "chosen", "non-empty list"),
    ("chosen-by-the-user", [GOOD_PAIR | {"id": "b", "chosen": turns(("user", "Hello!"))}], 2, "chosen", "one assistant turn"),
    ("rejected-two-turns", [GOOD_PAIR | {"id": "b", "rejected": turns(("assistant", "a"), ("assistant", "b"))}], 2,
     "rejected", "one assistant turn"),
    ("unknown-role", [GOOD_PAIR | {"id": "b", "prompt": turns(("wizard", "hi"))}], 2, "prompt[0].role", "unknown role"),
    ("no-user-turn", [GOOD_PAIR | {"id": "b", "prompt": turns(("system", "s"))}], 2, "prompt", "must end with a user turn"),
    ("whitespace-prompt", [GOOD_PAIR | {"id": "b", "prompt": turns(("user", "  "))}], 2, "prompt", "empty text"),
    ("empty-chosen", [GOOD_PAIR | {"id": "b", "chosen": turns(("assistant", ""))}], 2, "chosen", "empty text"),
    ("id-not-a-string", [GOOD_PAIR | {"id": True}], 2, "id", "expected a string or integer"),
    ("duplicate-id", [GOOD_PAIR], 2, "id", r"duplicate id 'a' \(first on line 1\)"),
    ("no-pairs", None, None, None, "no pairs"),
]
ONLY = [  # flaws only some files have
    ("teacher-answers", "no-response", [{"prompt": "q"}], 2, "messages", "no response"),
    ("responses", "no-response", [{"prompt": "q"}], 2, "messages", "no response"),
    ("benchmark", "empty-reference", [{"messages": turns(("user", "q"), ("assistant", " "))}], 2, "messages", "empty reference"),
]
CASES = [(reader, *case) for reader in READERS if reader != "pairs" for case in FILE_CASES + RECORD_CASES]
CASES += [("pairs", *case) for case in FILE_CASES + PAIR_CASES] + ONLY


@pytest.mark.parametrize("reader, case, bad, line, field, words", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_line_naming_file_line_and_field(tmp_path, reader, case, bad, line, field, words):
    path = tmp_path / "input.jsonl"
    with open(path, "wb") as f:
        for record in [] if bad is None else [GOOD_PAIR if reader == "pairs" else GOOD, *bad]:
            if record is ENORMOUS:
                f.truncate(f.tell() + (50 << 20))
            else:
                f.write((record if isinstance(record, bytes) else json.dumps(record).encode()) + b"\n")
        if bad is None:
            f.write(b"\n  \n")  # blank lines only
    with pytest.raises(InputError) as e:
        READERS[reader](path, tmp_path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), line, field)
    message = str(e.value)
    assert message.startswith(f"{path}{f', line {line}' if line else ''}{f', field {field!r}' if field else ''}: ")
    assert re.search(words, message) and "\n" not in message


def test_an_enormous_line_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "x" * (50 << 20)}) + "\n")
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="line 2: line longer than 16 MiB"):
            read_examples(path)
        assert tracemalloc.get_traced_memory()[1] < 3 * MAX_LINE_BYTES  # a bounded read's buffers, not the 50 MB line
    finally:
        tracemalloc.stop()
        path.unlink()


def test_the_command_line_prints_the_one_line_and_no_traceback(tmp_path, capsys):
    bad = write(tmp_path, json.dumps(GOOD), json.dumps({"messages": turns(("robot", "x"))}))
    assert main(["teacher", "--out", str(tmp_path / "run"), f"teacher.file={bad}"]) == 2
    assert capsys.readouterr().err == f"soda-distill: error: {bad}, line 2, field 'messages[0].role': unknown role 'robot' (expected one of ('system', 'user', 'assistant'))\n"


def test_multi_turn_prompts_are_accepted(tmp_path):
    """A conversation is a prompt: every turn before the last user turn is kept, an assistant turn after it is the
    response (for a prompts file, ignored)."""
    conversation = turns(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Name a color."))
    path = write(tmp_path, json.dumps({"messages": conversation + turns(("assistant", "Red."))}))
    [ex] = read_examples(path, want_response=True)
    assert ex.prompt == conversation and ex.response == "Red."
    [as_prompt] = read_examples(path)  # as data.prompts reads it: what the teacher is sent ends with the user's turn
    assert as_prompt.prompt == conversation
    pairs = write(tmp_path, json.dumps(GOOD_PAIR | {"prompt": conversation}))
    assert read_pairs(pairs)[0]["prompt"] == conversation


def test_a_pair_truncation_flag_must_be_a_boolean(tmp_path):
    assert read_pairs(write(tmp_path, json.dumps(GOOD_PAIR)))[0]["rejected_truncated"] is False  # older files: not cut
    bad = write(tmp_path, json.dumps(GOOD_PAIR | {"rejected_truncated": "yes"}))
    with pytest.raises(InputError, match=r"line 1, field 'rejected_truncated': expected true or false"):
        read_pairs(bad)


def test_a_corrupt_log_record_names_its_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a"}\n{"key": \n{"key": "c"}\n')
    with pytest.raises(InputError, match=r"cache.jsonl, line 2, field 'key': corrupt log record"):
        AppendLog(path, "key")


def test_formats(tmp_path):
    path = write(tmp_path, json.dumps({"messages": GOOD["messages"]}), json.dumps({"id": 7, "prompt": "q", "completion": "a"}),
                 json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}))
    a, b, c = read_examples(path)
    assert a.response == "hello" and a.prompt == [{"role": "user", "content": "hi"}] and a.id.startswith("p-")
    assert (b.id, b.prompt, b.response) == ("7", [{"role": "user", "content": "q"}], "a")
    assert c.response is None and len(c.prompt) == 2


def test_append_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    log = AppendLog(path, "key")
    log.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    with open(path, "a") as f:
        f.write('{"key": "c", "v"')  # a write cut short by a kill
    reopened = AppendLog(path, "key")
    assert set(reopened.records) == {"a", "b"}
    reopened.append([{"key": "c", "v": 3}])
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_a_byte_order_mark_opening_a_file_is_skipped(tmp_path):
    """Spreadsheets and Windows tools write one; JSONL records and YAML configs read as without it."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n" + json.dumps(GOOD | {"id": "b"}) + "\n").encode())
    assert [ex.response for ex in read_examples(path, want_response=True)] == ["hello", "hello"]
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\xef\xbb\xbfstudent:\n  model: some/model\n")
    assert load_config(config).student.model == "some/model"


def test_a_gzipped_jsonl_file_reads_as_the_plain_one(tmp_path):
    """NAME.jsonl.gz (the committed rows, any input file): written the same byte for byte each time, read as the plain
    file is; a damaged or cut one is one line naming the file and line, not a zlib traceback."""
    records = [GOOD, GOOD | {"id": "b"}]
    path = tmp_path / "answers.jsonl.gz"
    atomic_write_jsonl(path, records)
    first = path.read_bytes()
    atomic_write_jsonl(path, records)
    assert path.read_bytes() == first and gzip.decompress(first).decode().count("\n") == 2
    assert [ex.response for ex in read_examples(path, want_response=True)] == ["hello", "hello"]
    assert is_jsonl(path) and is_jsonl("x.jsonl") and not is_jsonl("x.json.gz")
    (tmp_path / "cut.jsonl.gz").write_bytes(first[: len(first) // 2])
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps(GOOD) + "\n")
    for name, words in (("cut.jsonl.gz", "ended before"), ("plain.jsonl.gz", "Not a gzipped file")):
        with pytest.raises(InputError, match=rf"{name}, line 1: not readable as gzip \(.*{words}") as e:
            read_examples(tmp_path / name)
        assert "\n" not in str(e.value)
