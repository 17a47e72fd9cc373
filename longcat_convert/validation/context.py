"""The tree being validated: safety checks before anything is opened, and small file helpers.

Nothing here unpickles or follows a symlink out of the tree. Symlink loops, symlinks to an ancestor folder
and symlinks leaving the tree are refused up front (LongcatError, exit 2).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import LongcatError
from ..core.io import DirectFiles, FileReader, JsonFileError, SafetensorsHeader, read_json_object
from ..core.io.pickles import STRAY_PICKLE, is_pickle_name
from .findings import Findings


@dataclass
class Context:
    """State shared by the checks of one validation run."""

    root: Path  # resolved
    findings: Findings = field(default_factory=Findings)
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)  # relative path -> readable header
    components: dict[str, dict] = field(default_factory=dict)  # per-component facts for the report
    dit_only: bool = False  # none of the shared components (text encoder, tokenizer, VAE, scheduler) is present
    files: FileReader = field(default_factory=DirectFiles)  # what headers and JSON files are read through

    def rel(self, path: Path) -> str:
        try:
            return Path(os.path.abspath(path)).relative_to(self.root).as_posix() or "."
        except ValueError:
            return str(path)


def check_tree_safety(root: Path, findings: Findings, allow_outside_symlinks: bool = False) -> list[str]:
    """Walk the tree without following links; refuse loops and escapes, report dangling and special files.
    Returns the pickle files seen (relative paths), which are never opened."""

    def refuse(error: OSError) -> None:
        raise LongcatError(f"cannot be listed ({error.strerror or error})", error.filename)

    pickles = []
    for folder, dirs, files in os.walk(root, onerror=refuse, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if name in files and is_pickle_name(name):
                pickles.append(_rel(root, path))
            if stat.S_ISLNK(mode):
                _check_symlink(root, path, findings, allow_outside_symlinks)
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                findings.error("tree", "special_file", "is not a regular file (FIFO, socket or device); "
                               "it is never opened", _rel(root, path))
    return pickles


def report_stray_pickles(ctx: Context, pickles: list[str]) -> None:
    """Pickles the component checks did not judge (outside weight folders): a warning each."""
    judged = {f.file for f in ctx.findings.items if f.kind == "pickle_file"}
    for rel in pickles:
        if rel not in judged:
            ctx.findings.warning("tree", "pickle_file", STRAY_PICKLE, rel)


def _check_symlink(root: Path, path: Path, findings: Findings, allow_outside: bool) -> None:
    rel = _rel(root, path)
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        findings.error("tree", "dangling_symlink", f"is a symlink to {os.readlink(path)!r}, which does not exist", rel)
        return
    except RuntimeError:  # Python < 3.13 reports loops this way
        raise LongcatError("is part of a symlink loop; refused", path, "replace the links by real files") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LongcatError("is part of a symlink loop; refused", path, "replace the links by real files") from None
        raise LongcatError(f"symlink cannot be resolved ({exc.strerror})", path) from None
    if not target.is_relative_to(root) and not allow_outside:
        raise LongcatError(f"is a symlink to {target}, outside the tree; refused", path,
                           "copy the file into the tree, or pass --follow-symlinks if you trust the target")
    if target.is_dir() and path.parent.resolve().is_relative_to(target):
        raise LongcatError(f"is a symlink to its ancestor folder {target}: a cycle; refused", path,
                           "remove the link")


def _rel(root: Path, path: Path) -> str:
    return Path(os.path.abspath(path)).relative_to(root).as_posix()


def read_json_reporting(ctx: Context, component: str, path: Path, *, required: bool = True) -> dict | None:
    """A JSON object from `path`, or None after reporting why it cannot be used."""
    try:
        return read_json_object(path, read=ctx.files.read_file)
    except JsonFileError as exc:
        if not exc.missing:
            ctx.findings.error(component, "unreadable_file", exc.message, ctx.rel(path))
        elif required:
            ctx.findings.error(component, "missing_file", exc.message, ctx.rel(path))
        return None


def read_json_quietly(path: Path) -> dict | None:
    """A JSON object from `path`, or None without reporting anything (for second opinions)."""
    try:
        return read_json_object(path)
    except JsonFileError:
        return None
