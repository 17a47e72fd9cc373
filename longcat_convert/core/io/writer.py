"""Write a safetensors shard whose header is known up front, receiving tensor bytes one at a time.

The shard is never held in memory: the header is written first, then each tensor's bytes are
streamed in, in header order, and hashed on the way. Writing and hashing happen on background
threads (`BackgroundSink`), so that reading the next chunk overlaps with hashing and writing this one
(sha256 of a chunk takes about as long as reading it), and the kernel is told to start writing
each chunk to disk at once, so the final fsync has little left.
Optionally the whole file's sha256 is computed on the way (no read-back).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import queue
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..dtypes import ITEMSIZE
from ..errors import LongcatError

if TYPE_CHECKING:
    import torch

QUEUE_CHUNKS = 2  # chunks waiting for the writer thread (bounds memory: 2 chunks from the reader)
# Wait for the writeback of data this far behind the write position: it bounds each file's dirty pages while
# leaving the disk a deep queue of writes. (Measured on a whole 26.7 GB tree: 43 s with 1 GB, 47 s unbounded,
# 53 s with O_DIRECT writes of one 16 MB block at a time, which starve the disk of queued writes.)
WRITEBACK_LAG = 1024 * 1024 * 1024

# sync_file_range(2) flags
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def encode_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for `entries` laid out back to back in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keeps the data buffer 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes as safetensors stores them (row-major, little-endian); the inverse of `decode_tensor`."""
    import torch

    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which the os module lacks; None elsewhere (writeback is then the kernel's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        data, offset = data[written:], offset + written


class _Worker:
    """A thread that applies `consume` to queued chunks, in order. After the first error it only drains
    the queue (so that a blocked `put` returns); the error is kept in `error` for the caller's thread."""

    def __init__(self, name: str, consume: Callable[[object], object], finish: Callable[[], object] | None = None):
        self._consume, self._finish = consume, finish
        self._queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def put(self, item: object) -> None:
        self._queue.put(item)

    def stop(self) -> None:
        """Let the thread finish what is queued, then end it."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                self._guarded(self._consume, item)
        if self.error is None and self._finish is not None:
            self._guarded(self._finish)

    def _guarded(self, function: Callable[..., object], *args) -> None:
        try:
            function(*args)
        except BaseException as exc:  # handed to the caller's thread
            if self.error is None:
                self.error = exc


class _Appender:
    """Writes consecutive chunks at explicit offsets of a file descriptor, from the file's current position,
    through the page cache: each chunk's writeback is started at once, and the writeback of data WRITEBACK_LAG
    behind is waited for."""

    def __init__(self, file: BinaryIO):
        file.flush()
        self._fd = file.fileno()
        self._position = file.tell()  # file offset of the next byte
        self._flushed = self._position  # writeback started up to here
        self._settled = 0  # writeback waited for up to here

    def append(self, chunk: bytes) -> None:
        data = memoryview(chunk)
        _pwrite_all(self._fd, data, self._position)
        self._position += len(data)
        if _SYNC_FILE_RANGE is None:
            return
        _SYNC_FILE_RANGE(self._fd, self._flushed, self._position - self._flushed, _WRITE)  # a hint; errors surface in fsync
        self._flushed = self._position
        lagging = self._position - WRITEBACK_LAG
        if lagging > self._settled:
            _SYNC_FILE_RANGE(self._fd, self._settled, lagging - self._settled, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            self._settled = lagging


@dataclass(frozen=True)
class _Segment:
    """Marks where the next named segment of the stream (a tensor's bytes) begins."""

    name: str


class _SegmentDigests:
    """sha256 of each named segment of a byte stream; bytes before the first segment are not hashed."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self._name: str | None = None
        self._hash = hashlib.sha256()

    def consume(self, item: object) -> None:
        if isinstance(item, _Segment):
            self.finish()
            self._name, self._hash = item.name, hashlib.sha256()
        elif self._name is not None:
            self._hash.update(item)  # type: ignore[arg-type]  # bytes: the sink queues nothing else

    def finish(self) -> None:
        if self._name is not None:
            self.digests[self._name] = self._hash.hexdigest()
            self._name = None


class SegmentHasher:
    """sha256 of named segments of bytes that are read but not written as such (the source of a cast), on a
    thread of its own so that hashing overlaps with reading and converting. Chunks must be immutable bytes."""

    def __init__(self, label: str = "source") -> None:
        self._segments = _SegmentDigests()
        self._worker = _Worker(f"longcat-{label}-sha256", self._segments.consume, self._segments.finish)

    def begin(self, name: str) -> None:
        self._raise_error()
        self._worker.put(_Segment(name))

    def update(self, chunk: bytes) -> None:
        self._raise_error()
        self._worker.put(chunk)

    def finish(self) -> dict[str, str]:
        """Wait for the queued chunks; the sha256 hex digest of each segment, by name."""
        self._worker.stop()
        self._raise_error()
        return dict(self._segments.digests)

    def close_quietly(self) -> None:
        self._worker.stop()

    def _raise_error(self) -> None:
        if self._worker.error is not None:
            raise self._worker.error


class BackgroundSink:
    """Append byte chunks to an open binary file from a writer thread, in order.

    `write` queues a chunk (blocking while QUEUE_CHUNKS are waiting, which bounds memory); chunks must
    not be changed afterwards (bytes are immutable; other buffers are copied). An error in a thread is
    raised by the next `write` or by `finish`. Writing starts at the file's position; nothing is
    fsynced here: the owner fsyncs the file.

    digest: also sha256 everything written, on a thread of its own (read `digest` after `finish`).
    segment_digests: also sha256 each segment begun with `begin_segment`, on another thread (read
    `segment_digests` after `finish`), so that hashing overlaps with reading and writing.
    """

    def __init__(self, file: BinaryIO, label: str = "writer", *, digest: bool = False, segment_digests: bool = False):
        self._workers = [_Worker(f"longcat-{label}", _Appender(file).append)]
        self.digest = hashlib.sha256() if digest else None
        if self.digest is not None:
            self._workers.append(_Worker(f"longcat-{label}-sha256", self.digest.update))
        self._segments = _SegmentDigests() if segment_digests else None
        self._segment_worker: _Worker | None = None
        if self._segments is not None:
            self._segment_worker = _Worker(f"longcat-{label}-tensor-sha256", self._segments.consume, self._segments.finish)
            self._workers.append(self._segment_worker)
        self._reported = False

    def begin_segment(self, name: str) -> None:
        """What is written from now on is hashed as segment `name` (needs segment_digests=True)."""
        if self._segment_worker is None:
            raise RuntimeError("begin_segment needs BackgroundSink(..., segment_digests=True)")
        self._raise_error()
        self._segment_worker.put(_Segment(name))

    @property
    def segment_digests(self) -> dict[str, str]:
        """sha256 hex digest of each segment; complete after `finish`."""
        return dict(self._segments.digests) if self._segments is not None else {}

    def write(self, chunk) -> None:
        self._raise_error()
        if not all(worker.alive for worker in self._workers):
            raise RuntimeError("write after the sink was finished")
        data = chunk if isinstance(chunk, bytes) else bytes(chunk)
        for worker in self._workers:
            worker.put(data)

    def finish(self) -> None:
        """Wait until everything queued is written (not yet fsynced); raise the first error, if any."""
        self._stop()
        self._raise_error()

    def close_quietly(self) -> None:
        """Write out what is queued (unless writing failed) and stop the threads; never raises."""
        self._stop()
        self._reported = True

    def _stop(self) -> None:
        for worker in self._workers:
            worker.stop()

    def _raise_error(self) -> None:
        error = next((worker.error for worker in self._workers if worker.error is not None), None)
        if error is not None and not self._reported:
            self._reported = True
            raise error


class ShardWriter:
    """Stream tensors into one safetensors file, in the order the header lists them."""

    def __init__(self, path: str | Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None, *,
                 file_digest: bool = False):
        """file_digest: also sha256 the whole file as it is written (`file_sha256`), on a thread of its own."""
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise LongcatError("duplicate tensor names in a shard plan", path)
        self.path = Path(path)
        self.entries = entries
        self._next = 0
        self._file = open(self.path, "xb")
        self._sink = BackgroundSink(self._file, "shard-writer", digest=file_digest, segment_digests=True)
        self._sink.write(encode_header(entries, metadata))

    def write_tensor(self, name: str, chunks: Iterable[bytes]) -> None:
        """Write the next tensor's bytes (their sha256 is in `digests` once the shard is closed)."""
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            expected = self.entries[self._next].name if self._next < len(self.entries) else "nothing"
            raise LongcatError(f"tensor {name!r} written out of order (expected {expected})", self.path)
        entry = self.entries[self._next]
        self._sink.begin_segment(name)
        written = 0
        for chunk in chunks:
            self._sink.write(chunk)
            written += len(chunk)
        if written != entry.nbytes:
            raise LongcatError(f"tensor {name!r} received {written} bytes, expected {entry.nbytes}", self.path)
        self._next += 1

    @property
    def digests(self) -> dict[str, str]:
        """sha256 hex digest of each tensor's bytes, by name; hashed on a thread, so read after close()."""
        if not self._file.closed:
            raise LongcatError("tensor digests are complete only after the shard is closed", self.path)
        return self._sink.segment_digests

    @property
    def file_sha256(self) -> str:
        """sha256 of the complete file, without reading it back; needs file_digest=True and a closed writer."""
        if self._sink.digest is None or not self._file.closed:
            raise LongcatError("file_sha256 needs ShardWriter(..., file_digest=True), read after close()", self.path)
        return self._sink.digest.hexdigest()

    def close(self) -> None:
        if self._next != len(self.entries):
            self.abort()
            raise LongcatError(f"shard closed after {self._next} of {len(self.entries)} tensors", self.path)
        try:
            self._sink.finish()
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()
            raise
        self._file.close()

    def abort(self) -> None:
        self._sink.close_quietly()
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
