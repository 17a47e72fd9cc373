"""All-or-nothing output folders: build in a hidden sibling, rename into place at the end.

A failed or interrupted run leaves the destination as it was. A run killed outright (SIGKILL) leaves a
`.NAME.longcat-partial-PID-XXXX` sibling; the next run removes partials whose process is gone and
never reads from them.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import LongcatError
from .faults import checkpoint

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.longcat-(?:partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_partials(dst: Path) -> list[Path]:
    """Leftovers of runs for `dst` whose process is gone, newest first."""
    parent = dst.parent
    if not parent.is_dir():
        return []
    found = []
    for entry in parent.iterdir():
        match = _PARTIAL.match(entry.name)
        if match and match.group("name") == dst.name and not _process_alive(int(match.group("pid"))):
            found.append(entry)
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def remove_stale_partials(dst: Path, keep: Path | None = None) -> list[Path]:
    removed = []
    for entry in stale_partials(dst):
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Terminated(BaseException):
    """Raised from SIGTERM so that the cleanup in __exit__ runs."""


class AtomicDirectory:
    """`with AtomicDirectory(dst) as work:` write into `work`; on success it becomes `dst`."""

    def __init__(self, dst: Path, overwrite: bool = False, adopt: Callable[[Path], bool] | None = None):
        """`adopt`, for --resume: called on the partial folders of dead runs, newest first; the first one it
        accepts becomes the work folder (with its content), every other leftover is deleted."""
        self.dst = Path(os.path.abspath(dst))
        self.overwrite = overwrite
        self.adopt = adopt
        self.adopted = False
        self.work: Path | None = None
        self._previous_handler = None

    def _sibling(self, kind: str) -> Path:
        return self.dst.parent / f".{self.dst.name}.longcat-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        if self.dst.exists() or self.dst.is_symlink():
            if not self.overwrite:
                raise LongcatError("already exists", self.dst, "choose a new destination or pass --overwrite")
            if not self.dst.is_dir():
                raise LongcatError("exists and is not a directory", self.dst, "remove it or choose another path")
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            self.work = self._sibling("partial")
            candidate = next((p for p in stale_partials(self.dst)
                              if p.name.startswith(f".{self.dst.name}.longcat-partial-") and self.adopt and self.adopt(p)),
                             None)
            remove_stale_partials(self.dst, keep=candidate)
            if candidate is not None:
                os.rename(candidate, self.work)
                self.adopted = True
            else:
                self.work.mkdir()
        except OSError as exc:
            raise LongcatError(f"cannot create the output folder ({exc.strerror})", self.dst.parent,
                               "check that the parent folder is writable") from None
        if hasattr(signal, "SIGTERM"):
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread
                self._previous_handler = None
        return self.work

    @staticmethod
    def _on_sigterm(signum, frame) -> None:
        raise _Terminated()

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.work is not None
        try:
            if exc_type is None:
                self._commit()
                return False
            shutil.rmtree(self.work, ignore_errors=True)
            if exc_type is _Terminated:
                raise LongcatError("terminated; nothing was written", self.dst)
            if isinstance(exc, OSError) and not isinstance(exc, LongcatError):
                raise _os_error(exc, self.dst) from None
            return False
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)

    def _commit(self) -> None:
        assert self.work is not None
        try:
            fsync_directory(self.work)
            if self.dst.exists():
                old = self._sibling("old")
                os.rename(self.dst, old)
                checkpoint("old destination moved aside")
                os.rename(self.work, self.dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.work, self.dst)
            fsync_directory(self.dst.parent)
        except OSError as exc:
            shutil.rmtree(self.work, ignore_errors=True)
            raise _os_error(exc, self.dst) from None


def _os_error(exc: OSError, dst: Path) -> LongcatError:
    if exc.errno == errno.ENOSPC:
        return LongcatError("no space left on the device; nothing was written", dst, "free disk space and rerun")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LongcatError(f"permission denied ({exc.filename or dst}); nothing was written", dst,
                            "check write permissions of the destination's parent folder")
    return LongcatError(f"{exc.strerror or exc} ({exc.filename or dst}); nothing was written", dst)
