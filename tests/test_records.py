import json

import pytest

from soda_distill.errors import InputError
from soda_distill.records import AppendLog, read_examples


def write(tmp_path, *lines: str):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize("bad, line, field, words", [
    ("{not json", 2, None, "not valid JSON"),
    (json.dumps({"text": "x"}), 2, "messages", "missing"),
    (json.dumps({"messages": [{"role": "user", "content": "   "}]}), 2, "messages", "empty prompt"),
    (json.dumps({"prompt": ""}), 2, "prompt", "empty prompt"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), 2, "messages[0].role", "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), 2, "messages[0].content", "not a string"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": True}), 2, "id", "expected"),
    ("[1, 2]", 2, None, "expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, bad, line, field, words):
    path = write(tmp_path, GOOD, bad)
    with pytest.raises(InputError) as e:
        read_examples(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), line, field)
    assert words in str(e.value) and str(path) in str(e.value)


def test_teacher_file_needs_a_response(tmp_path):
    path = write(tmp_path, json.dumps({"prompt": "q"}))
    with pytest.raises(InputError, match="no response"):
        read_examples(path, want_response=True)


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, json.dumps({"id": "a", "prompt": "q1"}), json.dumps({"id": "a", "prompt": "q2"}))
    with pytest.raises(InputError, match="duplicate id 'a' \\(first on line 1\\)"):
        read_examples(path)


def test_non_utf8(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match="line 2: not UTF-8"):
        read_examples(path)


def test_formats(tmp_path):
    path = write(tmp_path, GOOD, json.dumps({"id": 7, "prompt": "q", "completion": "a"}),
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
