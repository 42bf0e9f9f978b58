"""An append-only JSONL log that survives a kill: what the endpoint caches and resumable generations are kept in."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import InputError


class AppendLog:
    """An append-only JSONL file, one record per line, keyed by `key_field`.

    Each append reaches the file (the kernel) before it returns, so a killed process loses nothing it appended; a
    process killed mid-write leaves at most one partial last line, cut off on open, so what is read back is exactly
    the records that were completely written. The file is fsync'd at most every SYNC_EVERY_S and on `sync()`: a
    machine that crashes loses at most that last fraction of a second (an fsync per record capped a collection at
    ~230 requests/s here).
    """

    SYNC_EVERY_S = 0.2

    def __init__(self, path: Path, key_field: str):
        self.path, self.key_field = Path(path), key_field
        self.records: dict[str, dict] = {}
        self._file, self._synced = None, 0.0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for lineno, line in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(line)
                self.records[rec[self.key_field]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(self.path, lineno, self.key_field, "corrupt log record; remove the line to retry it")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def append(self, records: list[dict]) -> None:
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self._file.flush()
            if time.monotonic() - self._synced >= self.SYNC_EVERY_S:
                self.sync()
        except OSError as e:  # a torn last line is cut off when the log is opened again
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        for r in records:
            self.records[r[self.key_field]] = r

    def sync(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def __del__(self):
        if self._file is not None:
            self._file.close()
