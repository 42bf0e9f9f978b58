"""Files on disk: validated JSONL reading and atomic writes (append-only logs: append_log.py).

Records use the conventional formats other tools read as is: `messages` (chat turns) for prompts and
responses, `prompt`/`chosen`/`rejected` for preference pairs.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import InputError, SodaError, position

ROLES = ("system", "user", "assistant")
# One record's line at most: a longer one is refused after reading this much, never read whole into memory.
MAX_LINE_BYTES = 16 << 20


@functools.cache
def _umask() -> int:
    """The process's umask (reading it means setting it: done once, when a file is first written, not at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_text_file(path: Path, what: str, max_bytes: int) -> str:
    """A whole small text file (a config, a template); missing, too big or not UTF-8 is an error naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(path, None, None, f"cannot read the {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise InputError(path, None, None, f"the {what} is over {max_bytes >> 10} KiB, the most it may be")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as spreadsheets and Windows tools write, is skipped
    except UnicodeDecodeError as e:
        raise InputError(path, data.count(b"\n", 0, e.start) + 1, None, f"not UTF-8 (byte {e.start})") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes files private; give them the permissions open() would
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # a failed write names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text; gzipped where the name ends in .gz (no time stamp in it: the same text gives the same bytes)."""
    data = text.encode("utf-8")
    atomic_write_bytes(path, gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def atomic_write_jsonl(path: Path, records) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


HUB = "hub:"  # `hub:ORG/NAME` or `hub:ORG/NAME:SPLIT`, a data set on the Hugging Face Hub (online only)
DATASET_FORMATS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}  # other local files are read as JSONL


class Row(int):
    """A record's position in a file that has rows rather than lines (Parquet, a saved data set, the Hub)."""

    unit = "row"


def _dataset(path: str):
    """A file or data set that `datasets` reads (every value of a CSV a string, as the file has it)."""
    import datasets

    if path.startswith(HUB):
        name, _, split = path[len(HUB):].partition(":")
        return datasets.load_dataset(name, split=split or "train")
    if Path(path).is_dir():
        loaded = datasets.load_from_disk(path)
        return loaded[next(iter(loaded))] if isinstance(loaded, datasets.DatasetDict) else loaded  # its first split
    kind = DATASET_FORMATS[Path(path).suffix.lower()]
    options = {}
    if kind == "csv":
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        options = {"features": datasets.Features({c: datasets.Value("string") for c in header}), "keep_default_na": False}
    return datasets.load_dataset(kind, data_files=path, split="train", **options)


def read_rows(path: Path | str, columns: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line or row number, object) for each record of a JSONL file, or of any file `datasets` reads locally
    (JSON, CSV, Parquet, a `save_to_disk` folder) or a `hub:` data set; `columns` renames the file's columns to
    this package's names ({prompt: instruction, response: output}). A bad record names file, line and field."""
    path = str(path)
    if path.startswith(HUB) or Path(path).is_dir() or Path(path).suffix.lower() in DATASET_FORMATS:
        try:
            dataset = _dataset(path)
        except Exception as e:  # datasets' own message says what it could not read
            raise InputError(path, None, None, f"cannot be read as a data set ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        csv = path.lower().endswith(".csv")  # numbered by file line: its first line is the header
        # a column a record lacks comes back as None from a data set's common schema: it is left out, as in JSONL
        rows = ((i if csv else Row(i), {k: v for k, v in obj.items() if v is not None})
                for i, obj in enumerate(dataset, 2 if csv else 1))
    else:
        rows = read_jsonl(Path(path))
    for lineno, obj in rows:
        for ours, theirs in (columns or {}).items():
            if theirs not in obj:
                raise InputError(path, lineno, theirs, f"missing (data.columns maps it to '{ours}')")
            obj[ours] = obj.pop(theirs)
        yield lineno, obj


def source_digest(path: Path | str) -> str:
    """A digest of an input: a file's bytes; a data set folder's or the Hub's records as read."""
    path = str(path)
    if not path.startswith(HUB) and Path(path).is_file():
        return sha256_file(Path(path))
    h = hashlib.sha256()
    for _, obj in read_rows(path):
        h.update(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line (of a gzipped file too: NAME.jsonl.gz); a bad line is an
    error naming file and line."""
    path = Path(path)
    try:
        f = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise InputError(path, None, None, "file not found") from None
    with f:
        lineno = 0
        while raw := _read_line(f, path, lineno):
            lineno += 1
            if len(raw) - raw.endswith(b"\n") > MAX_LINE_BYTES:
                raise InputError(path, lineno, None, f"line longer than {MAX_LINE_BYTES >> 20} MiB, the most one record may have")
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark opening the file is skipped
            except UnicodeDecodeError as e:
                raise InputError(path, lineno, None, f"not UTF-8 (byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(path, lineno, None, f"not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(path, lineno, None, "expected a JSON object")
            yield lineno, obj


def _read_line(f, path: Path, lineno: int) -> bytes:
    try:
        return f.readline(MAX_LINE_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a .gz file that is not gzip, is cut short or damaged
        raise InputError(path, lineno + 1, None, f"not readable as gzip ({e})") from None


def is_jsonl(path: str | Path) -> bool:
    """Whether a path names a JSONL file, gzipped or not."""
    return str(path).endswith((".jsonl", ".jsonl.gz"))


@dataclass
class Example:
    """One prompt (chat turns ending with a user turn) and, when known, its reference/teacher response."""

    id: str
    prompt: list[dict]
    response: str | None = None
    truncated: bool = False  # the response was cut at its token limit (`finish_reason: length`)


def _check_messages(path, lineno, messages, field_name) -> None:
    if not isinstance(messages, list) or not messages:
        raise InputError(path, lineno, field_name, "expected a non-empty list of {role, content} turns")
    for i, m in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise InputError(path, lineno, where, "expected an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise InputError(path, lineno, f"{where}.role", f"unknown role {m.get('role')!r} (expected one of {ROLES})")
        if not isinstance(m.get("content"), str):
            raise InputError(path, lineno, f"{where}.content", "missing or not a string")


def prompt_id(prompt: list[dict]) -> str:
    return "p-" + hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def parse_example(path, lineno: int, obj: dict, want_response: bool) -> Example:
    """Accept `messages` (chat turns), or `prompt` (a string) with optional `response`/`completion`."""
    response = None
    if "messages" in obj:
        messages = obj["messages"]
        _check_messages(path, lineno, messages, "messages")
        if messages[-1]["role"] == "assistant":
            response = messages[-1]["content"]
            messages = messages[:-1]
            if not messages:
                raise InputError(path, lineno, "messages", "has an assistant turn but no prompt before it")
        prompt = messages
        if prompt[-1]["role"] != "user":
            raise InputError(path, lineno, "messages", "the prompt must end with a user turn")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise InputError(path, lineno, "prompt", "expected a string")
        prompt = [{"role": "user", "content": obj["prompt"]}]
        for key in ("response", "completion"):
            if key in obj:
                if not isinstance(obj[key], str):
                    raise InputError(path, lineno, key, "expected a string")
                response = obj[key]
    else:
        raise InputError(path, lineno, "messages", "missing (each record needs 'messages' or 'prompt')")
    if not prompt[-1]["content"].strip():
        raise InputError(path, lineno, "messages" if "messages" in obj else "prompt", "empty prompt")
    if want_response and response is None:
        raise InputError(path, lineno, "messages", "no response: the last turn must be the assistant's")
    rid = obj.get("id", prompt_id(prompt))
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise InputError(path, lineno, "id", "expected a string or integer")
    return Example(id=str(rid), prompt=prompt, response=response, truncated=obj.get("finish_reason") == "length")


def read_examples(path: Path, want_response: bool = False, limit: int | None = None,
                  columns: dict[str, str] | None = None) -> list[Example]:
    """Prompts (and responses) from any file `read_rows` reads; `columns` as it takes them."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    columns = columns or {}
    for lineno, obj in read_rows(path, columns):
        try:
            ex = parse_example(path, lineno, obj, want_response)
        except InputError as e:  # the field as the file names it
            field = (e.field or "").split("[")[0].split(".")[0]
            if field not in columns:
                raise
            raise InputError(path, lineno, columns[field] + e.field[len(field):], e.message) from None
        if ex.id in seen:
            if "id" in obj:
                raise InputError(path, lineno, "id", f"duplicate id {ex.id!r} (first on {position(seen[ex.id])})")
            raise InputError(path, lineno, "messages" if "messages" in obj else "prompt",
                             f"the same prompt as {position(seen[ex.id])} (a record without an 'id' is known by its prompt)")
        seen[ex.id] = lineno
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise InputError(path, None, None, "no records")
    return examples


def read_pairs(path: Path) -> list[dict]:
    """Preference pairs (TRL's conversational `prompt`/`chosen`/`rejected`, as the pairs stage writes them), checked."""
    pairs, seen = [], {}
    for lineno, obj in read_jsonl(path):
        for key, roles in (("prompt", None), ("chosen", ["assistant"]), ("rejected", ["assistant"])):
            if key not in obj:
                raise InputError(path, lineno, key, "missing (each pair needs 'prompt', 'chosen' and 'rejected')")
            _check_messages(path, lineno, obj[key], key)
            if roles and [m["role"] for m in obj[key]] != roles:
                raise InputError(path, lineno, key, "expected one assistant turn")
            if not obj[key][-1]["content"].strip():
                raise InputError(path, lineno, key, "empty text")
        if obj["prompt"][-1]["role"] != "user":
            raise InputError(path, lineno, "prompt", "the prompt must end with a user turn")
        rid = obj.get("id")
        if not isinstance(rid, (str, int, type(None))) or isinstance(rid, bool):
            raise InputError(path, lineno, "id", "expected a string or integer")
        if rid is not None and rid in seen:
            raise InputError(path, lineno, "id", f"duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = lineno
        flags = {key: obj.get(key, False) for key in ("chosen_truncated", "rejected_truncated")}  # absent: not cut
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise InputError(path, lineno, key, "expected true or false (whether the answer was cut at its token limit)")
        pairs.append({key: obj[key] for key in ("prompt", "chosen", "rejected")} | flags)
    if not pairs:
        raise InputError(path, None, None, "no pairs (the pairs stage counts what it dropped in manifest.json)")
    return pairs


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


BUILTIN = "builtin:"
SHIPPED_DATA = resources.files("soda_distill") / "data"


def shown_data_path(path: str) -> str:
    """A data file as results show it: a shipped one as `builtin:NAME`, the same on every machine; others as given."""
    return f"{BUILTIN}{Path(path).stem}" if Path(path).parent == Path(str(SHIPPED_DATA)) and Path(path).suffix == ".jsonl" else path


def resolve_data_path(value: str | None) -> str | None:
    """`builtin:NAME` → a data file shipped with the package; other paths → absolute."""
    if value is None:
        return None
    if value.startswith(HUB):
        return value
    if value.startswith(BUILTIN):
        name = value[len(BUILTIN):]
        path = SHIPPED_DATA / f"{name}.jsonl"
        if not path.is_file():
            names = sorted(p.name.removesuffix(".jsonl") for p in SHIPPED_DATA.iterdir() if p.name.endswith(".jsonl"))
            raise SodaError(f"unknown built-in data set {name!r} (shipped: {', '.join(names)})")
        return str(path)
    return str(Path(value).expanduser().resolve())


def read_metrics(path: Path) -> list[dict]:
    """Every logged step of a `metrics.jsonl`; a torn last line (a kill mid-write) is left out, as on resume."""
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return steps


def token_logprobs(logprobs: dict | None) -> dict:
    """An answer's tokens as the endpoint scored them (a chat completion's `logprobs`, asked for with `top_logprobs`):
    {"logprobs": [[token, logprob, [[alternative, logprob], ...]], ...]}, or nothing where there are none."""
    content = (logprobs or {}).get("content")
    if not content:
        return {}
    return {"logprobs": [[t["token"], t["logprob"], [[a["token"], a["logprob"]] for a in t.get("top_logprobs") or []]]
                         for t in content]}
