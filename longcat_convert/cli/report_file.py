"""`--report PATH` files: checked before the (possibly long) work, then written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import name_max, write_file_atomically
from ..core.errors import LongcatError


def check_report_path(path: Path, not_inside: dict[str, Path] | None = None) -> Path:
    """The file the report will be written to (through a symlink, its target), or a one-line error now.

    not_inside: folders the report must stay out of, by role ("source": it would change the source tree,
    "destination": it would add a file the manifest does not list)."""
    target = Path(os.path.realpath(path))
    for role, folder in (not_inside or {}).items():
        real = Path(os.path.realpath(folder))
        if target == real or target.is_relative_to(real):
            raise LongcatError(f"cannot write the report inside the {role} ({folder})", path,
                               f"write it outside the {role} folder")
    if os.path.isdir(target):
        raise LongcatError("cannot write the report: this is a folder", path, "give a file name for the report")
    if os.path.lexists(target) and not os.path.isfile(target):
        raise LongcatError("cannot write the report: this exists and is not a regular file", path,
                           "choose another file name")
    folder = target.parent
    if not folder.is_dir():
        raise LongcatError(f"cannot write the report: its folder {folder} does not exist", path,
                           "create the folder first, or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LongcatError(f"cannot write the report: its folder {folder} is not writable", path,
                           "choose a writable folder")
    if len(os.fsencode(target.name)) > name_max(folder):
        raise LongcatError("cannot write the report: the file name is too long for this file system", path,
                           "choose a shorter name")
    return target


def write_report(target: Path, report: dict, shown_as: Path | None = None) -> None:
    """Write the JSON report atomically (a reader never sees half of it, a failure leaves the old one)."""
    try:
        write_file_atomically(target, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise LongcatError(f"cannot write the report ({exc.strerror})", shown_as or target) from None
