"""The source files of one conversion, read from descriptors held from planning to commit.

A conversion plans from headers and then streams bytes at the offsets those headers gave, so the bytes
it reads must come from the very files it planned from. Every source read goes through `SourceFiles`:
a safetensors file is opened once, its identity taken from fstat (device, inode, size, mtime_ns,
ctime_ns) and its header read from that descriptor; tensor bytes are then pread from the same
descriptor, so a file atomically replaced on disk cannot feed us bytes at stale offsets. Files that are
only copied (VAE, text encoder, tokenizer, ...) are opened one at a time, streamed and closed, so a tree
of thousands of small files never holds thousands of descriptors.

`verify()`, run before the output is committed, proves that nothing read has changed since: each path
still names the file that was read (not a replacement) with the same size, mtime and ctime (an
in-place write moves ctime even when mtime is put back) and, for held files, the same header bytes.
Any difference is one LongcatError naming the file. A timestamp moves only when the file system's
clock ticks (a few ms), so a file whose last change is that recent is looked at again once the clock
has moved on: a write after we opened it then always shows.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_IMODE
from typing import TYPE_CHECKING

from ..errors import LongcatError
from .header import SafetensorsHeader, open_error, read_header, read_header_fd, regular_file_size
from .reader import CHUNK_BYTES, ByteRange, decode_tensor, iter_chunks, tensor_range

if TYPE_CHECKING:
    import torch

CHANGED_FIX = "rerun when nothing writes to the source"
TIMESTAMP_TICK_NS = 20_000_000  # longer than the coarse clock tick file timestamps come from (1-10 ms on Linux)
SETTLE_ATTEMPTS = 50  # a file still changing after this many ticks is being written: refused


@dataclass(frozen=True)
class FileIdentity:
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # permission bits (a change of mode also moves ctime)

    @classmethod
    def of(cls, stat: os.stat_result) -> FileIdentity:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                   S_IMODE(stat.st_mode))

    def change_to(self, now: FileIdentity) -> str | None:
        """How the file changed between this identity and `now`, in words; None if it did not."""
        if (now.device, now.inode) != (self.device, self.inode):
            return "the path now names another file"
        if now.size != self.size:
            return f"its size went from {self.size} to {now.size} bytes"
        if (now.mtime_ns, now.ctime_ns) != (self.mtime_ns, self.ctime_ns):
            return "it was written to or its metadata changed"
        return None


def source_changed(path: Path | str, how: str) -> LongcatError:
    return LongcatError(f"changed while it was being converted ({how}); nothing was written", path, CHANGED_FIX)


@dataclass
class _HeldFile:
    fd: int
    identity: FileIdentity
    header: SafetensorsHeader | None = None
    header_digest: str | None = None  # sha256 of the length prefix and the header JSON


class SourceFiles:
    """Source files of one tree: `header`, `chunks`, `read`, `tensor`, `stream`, `read_file`, then `verify`.

    Use as a context manager (or call `close`) to release the descriptors."""

    def __init__(self) -> None:
        self._held: dict[Path, _HeldFile] = {}
        self._streamed: dict[Path, FileIdentity] = {}
        self._opening = threading.Lock()  # output files are written from several threads

    # ---- safetensors files, held open ------------------------------------------------------------

    def header(self, path: str | Path) -> SafetensorsHeader:
        path = Path(path)
        held = self._hold(path)
        if held.header is None:
            with self._opening:
                if held.header is None:
                    held.header_digest = _header_digest(held.fd, header := read_header_fd(held.fd, path))
                    held.header = header
        return held.header

    def chunks(self, byte_range: ByteRange, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
        """A range's bytes, from the held descriptor of its file."""
        held = self._hold(byte_range.path)
        try:
            yield from iter_chunks(byte_range, chunk, held.fd)
        except LongcatError:  # the file ended before the range did
            raise source_changed(byte_range.path, "it was truncated") from None

    def read(self, byte_range: ByteRange) -> bytes:
        return b"".join(self.chunks(byte_range, max(byte_range.length, 1)))

    def tensor(self, header: SafetensorsHeader, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return decode_tensor(header, name, rows, self.read(tensor_range(header, name, rows)))

    def _hold(self, path: Path) -> _HeldFile:
        held = self._held.get(path)
        if held is None:
            with self._opening:
                held = self._held.get(path)
                if held is None:
                    fd, identity = _open(path)
                    held = self._held[path] = _HeldFile(fd, identity)
        return held

    # ---- other files, streamed one at a time -------------------------------------------------------

    def stream(self, path: str | Path, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
        """A whole file's bytes from one descriptor, closed afterwards, for a file planned by name only (a
        copy): its identity when opened must still hold after the last byte (else it changed mid-read) and
        again at `verify`; a file gone since it was listed has changed."""
        path = Path(path)
        try:
            yield from self._stream(path, chunk)
        except LongcatError as exc:
            raise _unless_removed(path, exc) from None

    def read_file(self, path: str | Path) -> bytes:
        """A small file read while planning (a config, an index), proven unchanged at `verify` like the rest."""
        return b"".join(self._stream(Path(path), CHUNK_BYTES))

    def _stream(self, path: Path, chunk: int) -> Iterator[bytes]:
        """Ends by recording the file's identity; a file read before must still be the file read then."""
        fd, identity = _open(path)
        try:
            position = 0
            while data := os.pread(fd, chunk, position):
                position += len(data)
                yield data
            how = identity.change_to(FileIdentity.of(os.fstat(fd)))
            if how is None and position != identity.size:
                how = f"{position} bytes were read, {identity.size} expected"
            if how is not None:
                raise source_changed(path, how)
        finally:
            os.close(fd)
        before = self._streamed.setdefault(path, identity)
        if before != identity:
            raise source_changed(path, before.change_to(identity) or "its mode changed")

    def share(self, path: str | Path, target: Path, method: str) -> bool:
        """Make the new file `target` share `path`'s bytes without copying them: "reflink" clones the extents of
        the descriptor opened here (copy-on-write: either side can change later without affecting the other);
        "hardlink" gives that very inode a second name (checked to be the inode opened). False, with nothing
        left at `target`, when the file system cannot; the caller then copies. The bytes are still to be hashed
        with `stream`, which also proves the file unchanged."""
        path = Path(path)
        try:
            fd, identity = _open(path)
        except LongcatError as exc:
            raise _unless_removed(path, exc) from None
        try:
            known = self._held[path].identity if path in self._held else self._streamed.get(path)
            if known is not None and known != identity:
                raise source_changed(path, known.change_to(identity) or "its mode changed")
            shared = _reflink(fd, target) if method == "reflink" else _hardlink(path, identity, target)
            if shared and method == "hardlink":  # a new link moves the inode's ctime, and only that
                identity = self._relinked(path, fd, identity)
        finally:
            os.close(fd)
        self._streamed[path] = identity
        return shared

    def _relinked(self, path: Path, fd: int, before: FileIdentity) -> FileIdentity:
        after = _settled_identity(fd, path)
        if (after.device, after.inode, after.size, after.mtime_ns, after.mode) != (
                before.device, before.inode, before.size, before.mtime_ns, before.mode):
            raise source_changed(path, before.change_to(after) or "its mode changed")
        if path in self._held:
            self._held[path].identity = after
        return after

    def identity(self, path: str | Path) -> FileIdentity:
        """The identity a file had when it was opened (held or streamed)."""
        path = Path(path)
        return self._held[path].identity if path in self._held else self._streamed[path]

    # ---- proof and release -----------------------------------------------------------------------

    def verify(self) -> None:
        """Raise a LongcatError naming the first file read that has changed since it was opened."""
        for path, held in list(self._held.items()):  # a snapshot: a thread copying files may add to these
            how = _change_since(path, held.identity)
            if how is None and held.header is not None and _header_digest(held.fd, held.header) != held.header_digest:
                how = "its header was rewritten"
            if how is not None:
                raise source_changed(path, how)
        for path, identity in list(self._streamed.items()):
            how = _change_since(path, identity)
            if how is not None:
                raise source_changed(path, how)

    def close(self) -> None:
        held, self._held = self._held, {}
        for entry in held.values():
            os.close(entry.fd)

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # a tree read only to be described (inspect) is never closed explicitly
        try:
            self.close()
        except OSError:
            pass


class DirectFiles:
    """Plain reads from the paths, nothing held: the other `FileReader`."""

    def header(self, path: str | Path) -> SafetensorsHeader:
        return read_header(path)

    def read_file(self, path: str | Path) -> bytes:
        return Path(path).read_bytes()


FileReader = SourceFiles | DirectFiles  # what headers and small files are read through


def _unless_removed(path: Path, error: LongcatError) -> LongcatError:
    """A file planned by name that is gone now has changed under us; any other error stands as it is."""
    return error if os.path.lexists(path) else source_changed(path, "it was removed")


FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)
CANNOT_SHARE = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM, errno.ENOSYS, errno.EMLINK}


def _reflink(source_fd: int, target: Path) -> bool:
    target_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.ioctl(target_fd, FICLONE, source_fd)
        os.fsync(target_fd)
        return True
    except OSError as exc:
        if exc.errno not in CANNOT_SHARE:
            raise
    finally:
        os.close(target_fd)
    target.unlink()
    return False


def _hardlink(path: Path, identity: FileIdentity, target: Path) -> bool:
    try:
        os.link(path, target)
    except OSError as exc:
        if exc.errno in CANNOT_SHARE:
            return False
        raise
    linked = os.stat(target, follow_symlinks=False)
    if (linked.st_dev, linked.st_ino) != (identity.device, identity.inode):  # the path was swapped meanwhile
        target.unlink()
        raise source_changed(path, "the path now names another file")
    return True


def _open(path: Path) -> tuple[int, FileIdentity]:
    """O_RDONLY (non-blocking, so that a FIFO is refused rather than waited on) and the file's identity."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise open_error(exc, path) from None
    try:
        regular_file_size(os.fstat(fd), path)
        return fd, _settled_identity(fd, path)
    except BaseException:
        os.close(fd)
        raise


def _settled_identity(fd: int, path: Path) -> FileIdentity:
    """The file's identity once its ctime is older than one timestamp tick, so that any later change moves it."""
    identity = FileIdentity.of(os.fstat(fd))
    for _ in range(SETTLE_ATTEMPTS):
        age = time.time_ns() - identity.ctime_ns
        if not 0 <= age < TIMESTAMP_TICK_NS:  # old enough, or stamped ahead of our clock (any later stamp differs)
            return identity
        time.sleep((TIMESTAMP_TICK_NS - age) / 1e9)
        again = FileIdentity.of(os.fstat(fd))
        if again == identity:
            return identity
        identity = again
    raise LongcatError("is being written to right now", path, CHANGED_FIX)


def _change_since(path: Path, identity: FileIdentity) -> str | None:
    try:
        now = FileIdentity.of(os.stat(path))
    except FileNotFoundError:
        return "it was removed"
    except OSError as exc:
        return f"it can no longer be examined ({exc.strerror or exc})"
    return identity.change_to(now)


def _header_digest(fd: int, header: SafetensorsHeader) -> str:
    return hashlib.sha256(os.pread(fd, header.data_start, 0)).hexdigest()
