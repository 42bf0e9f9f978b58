"""The one exception type users see: it names where the problem is, so no library traceback is needed."""


class SodaError(Exception):
    """A problem with the user's input, config or environment, worded for the user."""


class InputError(SodaError):
    """A bad record in an input file: names the file, the line and the field."""

    def __init__(self, path, line: int | None, field: str | None, message: str):
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = str(path), line, field
