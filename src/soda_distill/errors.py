"""The one exception type users see: it names where the problem is, so no library traceback is needed."""

from __future__ import annotations

import errno
import os
import re

# A full disk, a quota, a read-only or forbidden directory: the run stops in one line and resumes once it is fixed.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class SodaError(Exception):
    """A problem with the user's input, config or environment, worded for the user."""


class InputError(SodaError):
    """A bad record in an input file: names the file, the line and the field."""

    def __init__(self, path, line: int | None, field: str | None, message: str):
        where = str(path)
        if line is not None:
            where += f", {position(line)}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field, self.message = str(path), line, field, message


def position(line: int) -> str:
    """`line 3`, or `row 3` for a record of a file that has rows (records.Row)."""
    return f"{getattr(line, 'unit', 'line')} {line}"


def _failed_write(e: BaseException) -> tuple[str | None, str] | None:
    """(the file, if named; why) where `e` is a write that failed for lack of space or permission, else None. Not
    every writer raises an OSError: torch.save's zip writer raises a RuntimeError that names neither file nor errno
    (trainer checkpoints: optimizer, RNG states), safetensors a SafetensorError holding the errno in its text."""
    if isinstance(e, OSError):
        return (e.filename, e.strerror or str(e)) if e.errno in WRITE_ERRORS else None
    text = str(e)
    if isinstance(e, RuntimeError) and ("PytorchStreamWriter failed writing file" in text or "file write failed" in text
                                        or ("inline_container.cc" in text and "unexpected pos" in text)):
        return None, f"torch could not write it ({text.splitlines()[0] if text else 'no reason given'})"
    code = re.search(r"\(os error (\d+)\)", text) if type(e).__name__ == "SafetensorError" else None
    return (None, os.strerror(int(code.group(1)))) if code and int(code.group(1)) in WRITE_ERRORS else None


def write_error(e: BaseException, stage: str | None = None, where=None) -> SodaError | None:
    """The one line a failed write becomes (None where `e` is not one): the file (else a file in `where`), why, and
    how to go on; `stage`: the stage it stopped."""
    failed = _failed_write(e)
    if failed is None:
        return None
    file, reason = failed
    stopped = f"stage {stage} stopped; " if stage else ""
    return SodaError(f"cannot write {file or (f'a file in {where}' if where else 'a file')}: {reason}; {stopped}"
                     "everything written before is intact: free space (or make the directory writable) and run the "
                     "same command again to resume")
