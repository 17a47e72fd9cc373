"""Write a safetensors shard whose header is known up front, receiving tensor bytes one at a time.

The shard is never held in memory: the header is written first, then each tensor's bytes are
streamed in, in header order, and hashed on the way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..dtypes import ITEMSIZE
from ..errors import LongcatError


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

    def write_tensor(self, name: str, chunks: Iterable[bytes]) -> str:
        """Write the next tensor's bytes; returns their sha256 hex digest."""
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            expected = self.entries[self._next].name if self._next < len(self.entries) else "nothing"
            raise LongcatError(f"tensor {name!r} written out of order (expected {expected})", self.path)
        entry = self.entries[self._next]
        digest, written = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            self._file.write(chunk)
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
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
