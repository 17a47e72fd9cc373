"""The one error type the tool raises for bad input; the CLI turns it into a one-line message and exit 2."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Problem:
    """One defect found while reading a file. `kind` is one of validation's finding kinds: `validate` reports
    every problem as a finding, the other commands raise the first error (`raise_first_error`). `message` reads
    after the path of the file at fault."""

    kind: str
    message: str
    key: str | None = None
    severity: str = "error"  # or "warning"
    path: str | Path | None = None  # the file at fault, when one list covers several files
    fix: str | None = None


def raise_first_error(problems: Iterable[Problem], path: str | Path | None = None, *, ignore: Collection[str] = (),
                      fixes: Mapping[str, str] | None = None, default_fix: str | None = None) -> None:
    """Raise the first error-severity problem (of a kind not in `ignore`) as a one-line LongcatError naming its
    file (`path` when the problem names none) and a fix: its own, else `fixes[kind]`, else `default_fix`."""
    first = next((p for p in problems if p.severity == "error" and p.kind not in ignore), None)
    if first is not None:
        fix = first.fix or (fixes or {}).get(first.kind) or default_fix
        raise LongcatError(first.message, first.path if first.path is not None else path, fix)
