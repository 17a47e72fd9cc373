"""The tree being validated: safety checks before anything is opened, and small file helpers.

Nothing here unpickles or follows a symlink out of the tree. Symlink loops, symlinks to an ancestor folder
and symlinks leaving the tree are refused up front (LongcatError, exit 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.io import DirectFiles, FileReader, JsonFileError, SafetensorsHeader, read_json_object
from ..core.io.pickles import STRAY_PICKLE, is_pickle_name
from ..core.tree import list_files
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


def check_tree_safety(ctx: Context, follow_symlinks: bool = False) -> list[str]:
    """The one walk of the tree (`core.tree.list_files`): loops and escapes refused (LongcatError, exit 2),
    dangling symlinks and special files reported. Returns the pickle files seen (relative paths), never opened."""
    listing = list_files(ctx.root, follow_symlinks)
    for problem in listing.problems:
        ctx.findings.error("tree", problem.kind, problem.message, ctx.rel(Path(problem.path)))
    return [file for file in listing.files if is_pickle_name(file)]


def report_stray_pickles(ctx: Context, pickles: list[str]) -> None:
    """Pickles the component checks did not judge (outside weight folders): a warning each."""
    judged = {f.file for f in ctx.findings.items if f.kind == "pickle_file"}
    for rel in pickles:
        if rel not in judged:
            ctx.findings.warning("tree", "pickle_file", STRAY_PICKLE, rel)


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
