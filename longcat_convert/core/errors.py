"""The one error type the tool raises for bad input; the CLI turns it into a one-line message and exit 2."""

from __future__ import annotations

from pathlib import Path


class LongcatError(Exception):
    """Bad input or an environment problem the user can fix.

    `path` names the file at fault, `fix` says what to do about it.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.fix:
            text += f" (fix: {self.fix})"
        return " ".join(text.split())


class HeaderError(LongcatError):
    """A safetensors file whose header or layout is invalid."""
