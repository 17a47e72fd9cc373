"""Read and check a safetensors header without touching tensor data.

Layout of a safetensors file: an 8-byte little-endian header length N, N bytes of JSON, then the data
buffer. Each header entry gives dtype, shape and [begin, end) offsets into the data buffer. The
entries must tile the buffer exactly: no gaps, no overlaps, nothing past its end.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from ..dtypes import ITEMSIZE
from ..errors import HeaderError

# The official library refuses headers above 100 MB; a full LongCat shard header is ~40 KB.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset into the data buffer
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes in one row along dim 0 (the whole tensor for 0-d)."""
        if not self.shape:
            return self.nbytes
        return self.nbytes // self.shape[0] if self.shape[0] else 0


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    header_len: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def absolute_range(self, info: TensorInfo) -> tuple[int, int]:
        return self.data_start + info.begin, self.data_start + info.end


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and check the header of one safetensors file; raises HeaderError naming the defect."""
    path = Path(path)
    try:
        with open(path, "rb", opener=_open_nonblocking) as handle:
            return _parse(path, handle, regular_file_size(os.fstat(handle.fileno()), path))
    except OSError as exc:
        raise open_error(exc, path) from None


def read_header_fd(fd: int, path: str | Path) -> SafetensorsHeader:
    """The same check on a file already open as `fd` (read from its start; the descriptor stays open).
    `path` only names the file in errors and in the header's `path`."""
    path = Path(path)
    with open(fd, "rb", closefd=False) as handle:
        handle.seek(0)
        return _parse(path, handle, regular_file_size(os.fstat(fd), path))


def _open_nonblocking(path: str, flags: int) -> int:
    """A FIFO would block open() until someone writes to it; non-blocking, it opens and is then refused."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def regular_file_size(stat: os.stat_result, path: Path) -> int:
    if not S_ISREG(stat.st_mode):
        raise HeaderError("is not a regular file", path, "point at a regular file")
    return stat.st_size


def open_error(exc: OSError, path: Path) -> HeaderError:
    """One line for a file that cannot be opened."""
    if isinstance(exc, IsADirectoryError):
        return HeaderError("is a directory, not a safetensors file", path)
    if isinstance(exc, PermissionError):
        return HeaderError("cannot be read (permission denied)", path, "check the file's permissions")
    if isinstance(exc, FileNotFoundError):
        return HeaderError("does not exist", path)
    if isinstance(exc, NotADirectoryError):
        return HeaderError("cannot be opened: a parent of it is a file, not a folder", path)
    return HeaderError(f"cannot be read ({exc.strerror or exc})", path)


def _parse(path: Path, handle, file_size: int) -> SafetensorsHeader:
    if file_size < 8:
        raise HeaderError(f"truncated: {file_size} bytes, shorter than the 8-byte header length", path,
                          "re-download or re-create the file")
    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit", path,
                          "the file is not a safetensors file or is corrupt")
    if 8 + header_len > file_size:
        raise HeaderError(f"header length {header_len} runs past the end of the file ({file_size} bytes)", path,
                          "the file is truncated or not a safetensors file; re-download it")
    raw = handle.read(header_len)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, >4300-digit ints, deep nesting
        raise HeaderError(f"header is not valid JSON ({exc.__class__.__name__})", path,
                          "the file is corrupt or not a safetensors file") from None
    if not isinstance(parsed, dict):
        raise HeaderError("header is not a JSON object", path, "the file is corrupt")
    metadata = _parse_metadata(path, parsed.pop("__metadata__", None))
    tensors = {name: _parse_entry(path, name, entry) for name, entry in parsed.items()}
    _check_tiling(path, tensors, file_size - 8 - header_len)
    return SafetensorsHeader(path, header_len, file_size, tensors, metadata)


def _parse_metadata(path: Path, metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise HeaderError("__metadata__ must map strings to strings", path, "the file is corrupt")
    return metadata


def _parse_entry(path: Path, name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(f"entry {name!r} is not an object", path, "the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}", path,
                          f"supported dtypes: {', '.join(sorted(ITEMSIZE))}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderError(f"tensor {name!r} has an invalid shape {shape!r}", path, "the file is corrupt")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise HeaderError(f"tensor {name!r} has invalid data_offsets {offsets!r}", path, "the file is corrupt")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    expected = info.numel * ITEMSIZE[dtype]
    if info.nbytes != expected:
        raise HeaderError(f"tensor {name!r} spans {info.nbytes} bytes but {dtype}{list(shape)} needs {expected}",
                          path, "the file is corrupt")
    return info


def _is_uint(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], buffer_size: int) -> None:
    cursor = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.end > buffer_size:
            raise HeaderError(f"tensor {info.name!r} ends at byte {info.end}, past the data buffer "
                              f"({buffer_size} bytes): the file is truncated", path, "re-download or re-create it")
        if info.begin < cursor:
            raise HeaderError(f"tensor {info.name!r} overlaps the previous tensor (offset {info.begin} < {cursor})",
                              path, "the file is corrupt")
        if info.begin > cursor:
            raise HeaderError(f"gap in the data buffer before tensor {info.name!r} (bytes {cursor}..{info.begin})",
                              path, "the file is corrupt")
        cursor = info.end
    if cursor != buffer_size:
        raise HeaderError(f"{buffer_size - cursor} trailing bytes after the last tensor", path,
                          "the file is corrupt or was appended to")
