"""Write a safetensors shard whose header is known up front, receiving tensor bytes one at a time.

The shard is never held in memory: the header is written first, then each tensor's bytes are
streamed in, in header order, and hashed on the way. The file writes themselves happen in a
background thread (`BackgroundSink`), so that reading and hashing the next chunk overlap with
writing this one, and the kernel is asked to start putting each chunk on disk as soon as it is
written, so that the disk is busy all along and the final fsync has little left to do.
"""

from __future__ import annotations

import ctypes
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
from typing import BinaryIO

from ..dtypes import ITEMSIZE
from ..errors import LongcatError

QUEUE_CHUNKS = 4  # chunks waiting for the writer thread: 4 × 16 MB in flight at most
WRITEBACK_LAG = 64 * 1024 * 1024  # wait for writeback of data this far behind the write position

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


class BackgroundSink:
    """Append byte chunks to an open binary file from a writer thread, in order.

    `write` queues a chunk (blocking while QUEUE_CHUNKS are waiting, which bounds memory); chunks must
    not be changed afterwards (bytes are immutable; other buffers are copied). An error in the thread
    is raised by the next `write` or by `finish`. After each chunk the writer starts its writeback and
    waits for the writeback of data WRITEBACK_LAG behind, so dirty pages stay few and the disk busy.
    """

    def __init__(self, file: BinaryIO, label: str = "writer"):
        self._file = file
        self._position = file.tell()
        self._flushed = self._position  # writeback started up to here
        self._settled = 0  # writeback waited for up to here
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name=f"longcat-{label}", daemon=True)
        self._thread.start()

    def write(self, chunk) -> None:
        self._raise_error()
        if not self._thread.is_alive():
            raise RuntimeError("write after the sink was finished")
        self._queue.put(chunk if isinstance(chunk, bytes) else bytes(chunk))

    def finish(self) -> None:
        """Wait until everything queued is written (not yet fsynced); raise the writer's error, if any."""
        self._stop()
        self._raise_error()

    def cancel(self) -> None:
        """Drop whatever is still queued and stop the thread; never raises."""
        self._cancelled = True
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._cancelled = True
            raise error

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._cancelled or self._error is not None:
                continue  # keep draining so that a blocked `write` returns
            try:
                self._file.write(chunk)
                self._position += len(chunk)
                self._start_writeback()
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc

    def _start_writeback(self) -> None:
        if _SYNC_FILE_RANGE is None:
            return
        self._file.flush()
        fd = self._file.fileno()
        _SYNC_FILE_RANGE(fd, self._flushed, self._position - self._flushed, _WRITE)  # a hint: errors surface in fsync
        self._flushed = self._position
        lagging = self._position - WRITEBACK_LAG
        if lagging > self._settled:
            _SYNC_FILE_RANGE(fd, self._settled, lagging - self._settled, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            self._settled = lagging


class ShardWriter:
    """Stream tensors into one safetensors file, in the order the header lists them."""

    def __init__(self, path: str | Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None):
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise LongcatError("duplicate tensor names in a shard plan", path)
        self.path = Path(path)
        self.entries = entries
        self.digests: dict[str, str] = {}
        self._next = 0
        self._file = open(self.path, "xb")
        self._file.write(encode_header(entries, metadata))
        self._sink = BackgroundSink(self._file, "shard-writer")

    def write_tensor(self, name: str, chunks: Iterable[bytes]) -> str:
        """Write the next tensor's bytes; returns their sha256 hex digest."""
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            expected = self.entries[self._next].name if self._next < len(self.entries) else "nothing"
            raise LongcatError(f"tensor {name!r} written out of order (expected {expected})", self.path)
        entry = self.entries[self._next]
        digest, written = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            self._sink.write(chunk)
            written += len(chunk)
        if written != entry.nbytes:
            raise LongcatError(f"tensor {name!r} received {written} bytes, expected {entry.nbytes}", self.path)
        self._next += 1
        self.digests[name] = digest.hexdigest()
        return self.digests[name]

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
        self._sink.cancel()
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
