"""Output folders with one owner, written all or nothing.

One owner: a run claims DST (`DestinationClaim`) before it plans or creates anything and keeps the claim
until after its commit or cleanup. The claim is an exclusive `flock` on `.NAME.longcat-lock` beside DST;
a second run for the same DST fails at once, naming the holder (pid, host and start time written into
the lock file, as information only). The lock dies with its process, whatever PID namespace or container
that process lives in: liveness never rests on PIDs. The lock file is removed by its holder at the end;
only a killed run leaves it, and the next run takes it over.

All or nothing: the output is built in a hidden sibling `.NAME.longcat-partial-TOKEN` and moved into
place at the end with renameat2(RENAME_NOREPLACE), so the commit never replaces a DST that appeared while
the run worked. With overwrite, the folder that was at DST when the run claimed it is held open (so its
st_dev/st_ino cannot be reused), swapped out with renameat2(RENAME_EXCHANGE), checked to be that same
folder, then deleted; anything else at DST makes the run fail with DST untouched. Where renameat2 or its
flags are unsupported, a check-then-rename is used (see rename_noreplace, _replace_in_two_steps).

Leftovers: a partial folder exists only while its run holds the DST lock, so whoever holds the lock knows
that every partial of DST belongs to a dead run. It deletes them, or (--resume) adopts one. A DST name
too long to take the suffixes gets siblings named by a shortened name and a hash (sibling_stem).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .core.errors import LongcatError
from .faults import crash_point

TOKEN_LENGTH = 12
_LONGEST_SUFFIX = len(".longcat-partial-") + TOKEN_LENGTH
_RESERVED = re.compile(r"\..+\.longcat-(?:(?:partial|old|tmp)-[0-9a-f-]{8,40}|lock)")
DEFAULT_NAME_MAX = 255

Identity = tuple[int, int]


# ------------------------------------------------------------------------------------------ names


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system holding `folder` (or its nearest ancestor) allows."""
    try:
        return os.pathconf(_nearest_existing(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def sibling_stem(name: str, limit: int = DEFAULT_NAME_MAX) -> str:
    """The prefix of DST's hidden siblings: `.NAME`, or for a name too long to take the suffixes, a
    shortened `.PREFIX~HASH` that still fits within `limit` bytes and still identifies NAME."""
    stem = f".{name}"
    if len(os.fsencode(stem)) + _LONGEST_SUFFIX <= limit:
        return stem
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    budget = limit - _LONGEST_SUFFIX - len(digest) - 2
    prefix = name
    while prefix and len(os.fsencode(prefix)) > budget:
        prefix = prefix[:-1]
    return f".{prefix}~{digest}"


def lock_file(dst: Path) -> Path:
    """The lock file of DST (beside it, so that every path naming DST's folder finds the same file)."""
    dst = Path(os.path.abspath(dst))
    return dst.parent / f"{sibling_stem(dst.name, name_max(dst.parent))}.longcat-lock"


def _leftover_pattern(stem: str) -> re.Pattern[str]:
    # `PID-8hex` tokens are partials of versions that named them by PID; they are leftovers too.
    return re.compile(re.escape(stem) + r"\.longcat-(?P<kind>partial|old)-[0-9a-f-]{8,40}")


# ------------------------------------------------------------------------------- destination checks


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def identity(path: Path) -> Identity | None:
    """(st_dev, st_ino) of whatever is at `path` (a symlink itself, not its target); None if nothing is."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _existing_destination(dst: Path, overwrite: bool) -> Identity | None:
    """What --overwrite would replace: the identity of the folder at DST, None if DST is free."""
    try:
        info = os.lstat(dst)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None  # an ancestor is a file; _check_parent names it
    if stat.S_ISLNK(info.st_mode):
        raise LongcatError(f"is a symbolic link (to {os.readlink(dst)}); the destination must be a real path", dst,
                           f"pass the path it points to ({os.path.realpath(dst)}), or remove the link")
    if not overwrite:
        raise LongcatError("already exists", dst, "choose a new destination or pass --overwrite")
    if not stat.S_ISDIR(info.st_mode):
        raise LongcatError("exists and is not a directory", dst, "remove it or choose another path")
    return info.st_dev, info.st_ino


def _check_parent(dst: Path) -> None:
    ancestor = _nearest_existing(dst.parent)
    if not ancestor.is_dir():
        raise LongcatError("is not a folder, so the destination cannot be created inside it", ancestor,
                           "choose a destination whose parent is a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LongcatError("is not writable (or is on a read-only file system)", ancestor,
                           "check that the destination's parent folder is writable, or choose another destination")


def check_destination(dst: Path, overwrite: bool) -> Identity | None:
    """Refuse, before any work, a destination this run could not own; returns what --overwrite would replace."""
    dst = Path(os.path.abspath(dst))
    if not dst.name:
        raise LongcatError("the destination cannot be the root folder", dst, "choose a folder to create")
    if _RESERVED.fullmatch(dst.name):
        raise LongcatError("this name is reserved for longcat-convert's temporary files", dst, "choose another name")
    limit = name_max(dst.parent)
    if len(os.fsencode(dst.name)) > limit:
        raise LongcatError(f"the destination's name is {len(os.fsencode(dst.name))} bytes long; this file system "
                           f"allows at most {limit}", dst, "choose a shorter name")
    replaces = _existing_destination(dst, overwrite)
    _check_parent(dst)
    return replaces


# ------------------------------------------------------------------------------------------- lock


class DestinationLock:
    """An exclusive flock on the lock file beside DST, for the whole run.

    Only the holder unlinks the lock file, and only while it still holds the lock. A run that locked a
    file which its last holder had already unlinked sees that the path no longer names that file, and
    takes the lock again on the current one (the classic unlink/flock race)."""

    def __init__(self, path: Path, dst: Path):
        self.path = path
        self.dst = dst
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LongcatError(f"another longcat-convert run is writing this destination ({self.holder()})",
                                   self.dst, "wait for that run to finish, or choose another destination") from None
            except OSError as exc:
                os.close(fd)
                raise LongcatError(f"cannot lock {self.path.name} ({exc.strerror}); one owner per destination "
                                   "cannot be guaranteed here", self.dst,
                                   "write to a local file system that supports flock") from None
            if self._names_our_file(fd):
                self._fd = fd
                self._describe_holder()
                return
            os.close(fd)
        raise LongcatError("cannot take the destination lock: its lock file keeps changing", self.path,
                           "make sure nothing else deletes longcat-convert's lock files")

    def _names_our_file(self, fd: int) -> bool:
        held = os.fstat(fd)
        return identity(self.path) == (held.st_dev, held.st_ino)

    def _describe_holder(self) -> None:
        assert self._fd is not None
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        text = f"pid {os.getpid()} on {socket.gethostname()}, started {started}, longcat-convert {__version__}\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    def holder(self) -> str:
        """The holder's own description of itself (information only: it may live in another PID namespace)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                text = os.read(fd, 512).decode("utf-8", "replace")
            finally:
                os.close(fd)
        except OSError:
            text = ""
        text = " ".join(text.split())
        return text if text else "it has not described itself yet"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._names_our_file(self._fd):
                os.unlink(self.path)
        except OSError:
            pass  # a lock file left behind is harmless: the next run takes it over
        finally:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------- renames


class RenameUnsupported(Exception):
    """renameat2, or the flag asked for, is not available on this system or file system."""


_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def _load_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def renameat2(source: Path, target: Path, flags: int) -> None:
    if _renameat2 is None:
        raise RenameUnsupported()
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        raise RenameUnsupported()
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def rename_noreplace(source: Path, target: Path) -> None:
    """Move `source` to `target` only if nothing is at `target` (FileExistsError otherwise).

    Without renameat2 the check and the rename are two steps; rename(2) of a folder fails on anything at
    the target but an empty folder, so at worst an empty folder created between the two is replaced."""
    try:
        renameat2(source, target, RENAME_NOREPLACE)
        return
    except RenameUnsupported:
        pass
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        raise


def _remove(path: Path) -> None:
    """Delete a leftover: a real folder with its content; anything else (a symlink too) as a name only."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a hidden temporary file in the same folder, fsynced, then renamed."""
    stem = sibling_stem(path.name, name_max(path.parent))
    temporary = path.parent / f"{stem}.longcat-tmp-{uuid.uuid4().hex[:TOKEN_LENGTH]}"
    try:
        with open(temporary, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


# ------------------------------------------------------------------------------------ the claim on DST


class DestinationClaim:
    """DST, owned for a whole run: its lock taken (missing parents created first), and what --overwrite may
    replace recorded and held open. `with DestinationClaim(dst, overwrite):` around planning and writing."""

    def __init__(self, dst: Path, overwrite: bool = False):
        self.dst = Path(os.path.abspath(dst))
        self.overwrite = overwrite
        self.replaces: Identity | None = None
        self.stem = sibling_stem(self.dst.name, name_max(self.dst.parent))
        self._lock: DestinationLock | None = None
        self._pinned: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> DestinationClaim:
        check_destination(self.dst, self.overwrite)
        try:
            self._lock_destination()
            crash_point("destination locked")
            self._pin_destination()
        except BaseException as exc:
            self.release()
            if isinstance(exc, OSError):
                raise _creation_error(exc, self.dst) from None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        return False

    def _lock_destination(self) -> None:
        self._lock = DestinationLock(lock_file(self.dst), self.dst)
        for _ in range(10):
            self._make_parents()
            try:
                self._lock.acquire()
                return
            except FileNotFoundError:  # a parent another failing run had created was removed meanwhile
                continue
        raise LongcatError("its parent folder keeps disappearing", self.dst, "check what else deletes folders there")

    def _make_parents(self) -> None:
        """Create the missing parents, remembering them, so that a failed run removes them again."""
        missing = []
        folder = self.dst.parent
        while not os.path.lexists(folder):
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
                self._created.append(folder)
            except FileExistsError:
                pass

    def _pin_destination(self) -> None:
        """Record what --overwrite may replace, now that DST is ours, and keep it open until the end: while
        it is open its inode cannot be freed, so no other file can later show up under the same
        (st_dev, st_ino) and pass for it."""
        self.replaces = _existing_destination(self.dst, self.overwrite)
        if self.replaces is None:
            return
        self._pinned = os.open(self.dst, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        pinned = os.fstat(self._pinned)
        if (pinned.st_dev, pinned.st_ino) != self.replaces:
            raise self.not_ours()

    def release(self) -> None:
        """Give up DST (after our partial is gone or committed) and remove the parents we created if they
        are empty."""
        if self._pinned is not None:
            os.close(self._pinned)
            self._pinned = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._created = []

    def not_ours(self) -> LongcatError:
        """DST holds something this run does not own: never replace it."""
        if self.replaces is None:
            what = "appeared here while the conversion ran"
        else:
            what = "here is not the folder that was here when the conversion started (--overwrite replaces only that)"
        fix = "move it away, or pass --overwrite to replace it" if not self.overwrite else "check what else writes there"
        return LongcatError(f"something {what}; it was left untouched and nothing was written", self.dst, fix)


def _creation_error(exc: OSError, dst: Path) -> LongcatError:
    return LongcatError(f"cannot create the output folder ({exc.strerror})", dst.parent,
                        "check that the parent folder is writable")


# ------------------------------------------------------------------------------- the output folder


class _Terminated(BaseException):
    """Raised from SIGTERM so that the cleanup in __exit__ runs."""


class AtomicDirectory:
    """`with AtomicDirectory(dst) as work:` write into `work`; on success it becomes `dst`."""

    def __init__(self, dst: Path, overwrite: bool = False, adopt: Callable[[Path], bool] | None = None,
                 claim: DestinationClaim | None = None):
        """`adopt`, for --resume: called on the partial folders of dead runs, newest first; the first one it
        accepts becomes the work folder (with its content), every other leftover is deleted.
        `claim`: DST already claimed by the caller (who releases it); otherwise the folder claims DST itself."""
        self.dst = Path(os.path.abspath(dst))
        if claim is not None and (claim.dst != self.dst or claim.overwrite != overwrite):
            raise ValueError("the claim is for another destination or another --overwrite")
        self.overwrite = overwrite
        self.adopt = adopt
        self.adopted = False
        self.work: Path | None = None
        self._claim = claim
        self._own_claim = claim is None
        self._work_is_ours = True
        self._previous_handler = None

    @property
    def replaces(self) -> Identity | None:
        assert self._claim is not None
        return self._claim.replaces

    def _sibling(self, kind: str) -> Path:
        assert self._claim is not None
        return self.dst.parent / f"{self._claim.stem}.longcat-{kind}-{uuid.uuid4().hex[:TOKEN_LENGTH]}"

    # ----- enter

    def __enter__(self) -> Path:
        if self._own_claim:
            self._claim = DestinationClaim(self.dst, self.overwrite).__enter__()
        try:
            self.work = self._make_work_folder()
        except BaseException as exc:
            self._release()
            if isinstance(exc, OSError):
                raise _creation_error(exc, self.dst) from None
            raise
        if hasattr(signal, "SIGTERM"):
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread
                self._previous_handler = None
        return self.work

    def _make_work_folder(self) -> Path:
        work = self._sibling("partial")
        leftovers = self._leftovers()
        candidate = next((path for path, kind in leftovers if kind == "partial" and self.adopt and self.adopt(path)),
                         None)
        for path, _ in leftovers:
            if path != candidate:
                _remove(path)
        if candidate is not None:
            os.rename(candidate, work)
            self.adopted = True
        else:
            work.mkdir()
        return work

    def _leftovers(self) -> list[tuple[Path, str]]:
        """Partials of runs that held the DST lock before us (so all dead), newest first. Only real folders
        may be adopted; anything else named like a partial is a leftover to delete, never to follow."""
        assert self._claim is not None
        pattern = _leftover_pattern(self._claim.stem)
        found = []
        for entry in os.scandir(self.dst.parent):
            match = pattern.fullmatch(entry.name)
            if match:
                info = entry.stat(follow_symlinks=False)
                kind = match.group("kind") if stat.S_ISDIR(info.st_mode) else "other"
                found.append((info.st_mtime_ns, Path(entry.path), kind))
        return [(path, kind) for _, path, kind in sorted(found, key=lambda item: item[0], reverse=True)]

    @staticmethod
    def _on_sigterm(signum, frame) -> None:
        raise _Terminated()

    # ----- exit

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.work is not None
        if self._previous_handler is not None:  # from here on SIGTERM kills, which every step below survives
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        try:
            if exc_type is None:
                self._commit()
                return False
            self._discard_work()
            if exc_type is _Terminated:
                raise LongcatError("terminated; nothing was written", self.dst)
            if isinstance(exc, OSError) and not isinstance(exc, LongcatError):
                raise _os_error(exc, self.dst) from None
            return False
        finally:
            self._release()

    def _discard_work(self) -> None:
        if self.work is not None and self._work_is_ours:
            _remove(self.work)

    def _release(self) -> None:
        if self._own_claim and self._claim is not None:
            self._claim.release()

    def _commit(self) -> None:
        assert self.work is not None
        try:
            fsync_directory(self.work)
            crash_point("committing")
            if self.replaces is None or identity(self.dst) is None:
                self._move_into_free_place()
            else:
                self._replace_destination()
            fsync_directory(self.dst.parent)
        except LongcatError:
            self._discard_work()
            raise
        except OSError as exc:
            self._discard_work()
            raise _os_error(exc, self.dst) from None

    def _not_ours(self) -> LongcatError:
        assert self._claim is not None
        return self._claim.not_ours()

    def _move_into_free_place(self) -> None:
        assert self.work is not None
        try:
            rename_noreplace(self.work, self.dst)
        except FileExistsError:
            raise self._not_ours() from None

    def _replace_destination(self) -> None:
        """Swap the new tree with the DST that was there when the run claimed it, then delete that."""
        assert self.work is not None
        if identity(self.dst) != self.replaces:
            raise self._not_ours()
        try:
            renameat2(self.work, self.dst, RENAME_EXCHANGE)
        except RenameUnsupported:
            self._replace_in_two_steps()
            return
        crash_point("old destination swapped out")
        if identity(self.work) != self.replaces:  # replaced between the check and the swap: put it back
            try:
                renameat2(self.work, self.dst, RENAME_EXCHANGE)
            except OSError:
                self._work_is_ours = False
                raise LongcatError(f"was replaced while the conversion committed; what replaced it is now at "
                                   f"{self.work}", self.dst,
                                   "move it back by hand before the next run, which would delete it") from None
            raise self._not_ours()
        _remove(self.work)

    def _replace_in_two_steps(self) -> None:
        """Without RENAME_EXCHANGE: move DST aside, check it, move the new tree in. A kill between the two
        renames leaves DST absent (the old tree in a `.longcat-old-` sibling that the next run deletes)."""
        assert self.work is not None
        old = self._sibling("old")
        os.rename(self.dst, old)
        crash_point("old destination moved aside")
        if identity(old) != self.replaces:
            self._put_back(old)
            raise self._not_ours()
        try:
            rename_noreplace(self.work, self.dst)
        except FileExistsError:
            self._put_back(old)
            raise self._not_ours() from None
        _remove(old)

    def _put_back(self, old: Path) -> None:
        try:
            rename_noreplace(old, self.dst)
        except OSError:
            raise LongcatError(f"changed while the conversion committed; what was there is now at {old}", self.dst,
                               "move it back by hand before the next run, which would delete it") from None


def _os_error(exc: OSError, dst: Path) -> LongcatError:
    if exc.errno == errno.ENOSPC:
        return LongcatError("no space left on the device; nothing was written", dst, "free disk space and rerun")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LongcatError(f"permission denied ({exc.filename or dst}); nothing was written", dst,
                            "check write permissions of the destination's parent folder")
    return LongcatError(f"{exc.strerror or exc} ({exc.filename or dst}); nothing was written", dst)
