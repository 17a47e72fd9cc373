"""The one JSON reader of the project: configs, indexes, manifests, journals, tokenizer files.

Whatever the input, it either returns a parsed document or raises `JsonFileError` (a LongcatError, so one
line and exit 2 on the command line) naming the file and what is wrong with it: missing, a folder, empty,
too large, not UTF-8, not JSON, nested too deeply, holding NaN/Infinity (which JSON does not allow), or
not an object when an object is required. Nothing else escapes (RecursionError, huge-integer ValueError).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..errors import LongcatError

# The largest JSON file the project reads: a tokenizer.json is ~16 MB, a full-size index ~100 KB.
MAX_JSON_BYTES = 64 * 1024 * 1024


class JsonFileError(LongcatError):
    """A JSON file that cannot be used. `missing` tells a file that is absent from one that is bad."""

    def __init__(self, message: str, path: str | Path | None, fix: str | None = None, *, missing: bool = False):
        super().__init__(message, path, fix)
        self.missing = missing


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(data: bytes | str, path: str | Path | None = None, fix: str | None = None):
    """Parse a JSON text strictly (no NaN/Infinity); any defect is a JsonFileError."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise JsonFileError("is not valid JSON (not UTF-8 text)", path, fix) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise JsonFileError(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", path,
                            fix) from None
    except RecursionError:
        raise JsonFileError("is not valid JSON (nested too deeply)", path, fix) from None
    except ValueError as exc:  # NaN/Infinity, integers of more than 4300 digits
        raise JsonFileError(f"is not valid JSON ({exc})", path, fix) from None


def read_json(path: str | Path, fix: str | None = None, max_bytes: int = MAX_JSON_BYTES,
              read: Callable[[Path], bytes] | None = None):
    """The parsed document in the file at `path`. read: how the file's bytes are read, once its size is known
    to be within the limit (a conversion reads through `SourceFiles.read_file`); by default at most
    `max_bytes` + 1 bytes are read."""
    path = Path(path)
    try:
        if read is None:
            with open(path, "rb") as handle:
                data = handle.read(max_bytes + 1)
        else:
            data = read(path) if path.stat().st_size <= max_bytes else None
    except FileNotFoundError:
        raise JsonFileError("is missing (the file does not exist)", path, fix, missing=True) from None
    except IsADirectoryError:
        raise JsonFileError("is a directory, not a file", path, fix, missing=True) from None
    except NotADirectoryError:
        raise JsonFileError("does not exist (a parent of it is a file)", path, fix, missing=True) from None
    except OSError as exc:
        raise JsonFileError(f"cannot be read ({exc.strerror or exc})", path, fix) from None
    if data is None or len(data) > max_bytes:
        raise JsonFileError(f"is larger than {max_bytes} bytes, too large for a JSON file", path, fix)
    if not data.strip():
        raise JsonFileError("is empty" + (" (0 bytes)" if not data else "") + ": not valid JSON", path, fix)
    return parse_json(data, path, fix)


def read_json_object(path: str | Path, fix: str | None = None, max_bytes: int = MAX_JSON_BYTES,
                     read: Callable[[Path], bytes] | None = None) -> dict:
    """Like `read_json`, for files that must hold a JSON object (configs, indexes, manifests)."""
    document = read_json(path, fix, max_bytes, read)
    if not isinstance(document, dict):
        raise JsonFileError(f"holds a JSON {type(document).__name__}, not an object", path, fix)
    return document
