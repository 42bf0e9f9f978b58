"""The one exception type users see: it names where the problem is, so no library traceback is needed."""


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
