"""Positioned reads of tensor bytes: a whole tensor, a row block along dim 0, in bounded chunks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import TORCH_DTYPE
from ..errors import LongcatError
from .header import SafetensorsHeader, TensorInfo

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 8 * 1024 * 1024  # a few in flight per output file, two files at once, well inside convert's 512 MB


@dataclass(frozen=True)
class ByteRange:
    """`length` bytes at absolute offset `offset` of `path`."""

    path: Path
    offset: int
    length: int


def tensor_range(header: SafetensorsHeader, name: str, rows: tuple[int, int] | None = None) -> ByteRange:
    """The byte range of a tensor, or of rows [start, stop) along dim 0 (contiguous in row-major order)."""
    info = header.tensors[name]
    begin, end = header.absolute_range(info)
    if rows is None:
        return ByteRange(header.path, begin, end - begin)
    start, stop = rows
    if not info.shape or not 0 <= start <= stop <= info.shape[0]:
        raise LongcatError(f"row block {rows} is outside tensor {name!r} of shape {list(info.shape)}", header.path)
    return ByteRange(header.path, begin + start * info.row_bytes, (stop - start) * info.row_bytes)


def advise(fd: int, offset: int, length: int, advice: str) -> None:
    """posix_fadvise(fd, offset, length, POSIX_FADV_<advice>) where the OS has it; only a hint, never an error."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, length, getattr(os, f"POSIX_FADV_{advice}"))
        except OSError:
            pass


def iter_chunks(byte_range: ByteRange, chunk: int = CHUNK_BYTES, fd: int | None = None) -> Iterator[bytes]:
    """Yield the bytes of a range in chunks of at most `chunk` bytes (never the whole range at once).

    fd: read from this descriptor of `byte_range.path` (left open) instead of opening the path."""
    own = fd is None
    if fd is None:
        fd = os.open(byte_range.path, os.O_RDONLY)
    try:
        position, remaining = byte_range.offset, byte_range.length
        while remaining:
            data = os.pread(fd, min(chunk, remaining), position)
            if not data:
                raise LongcatError(f"file ended while reading bytes {position}..{position + remaining}",
                                   byte_range.path, "the file was truncated while being read; re-create it")
            position += len(data)
            remaining -= len(data)
            if remaining:
                advise(fd, position, min(chunk, remaining), "WILLNEED")  # the kernel reads on while the caller works
            yield data
    finally:
        if own:
            os.close(fd)


def read_bytes(byte_range: ByteRange, fd: int | None = None) -> bytes:
    return b"".join(iter_chunks(byte_range, max(byte_range.length, 1), fd))


def read_tensor(header: SafetensorsHeader, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Materialise one tensor (or a row block of it) as a torch tensor."""
    byte_range = tensor_range(header, name, rows)  # checks `rows` before shape[0] is touched (0-d tensors)
    return decode_tensor(header, name, rows, read_bytes(byte_range))


def decode_tensor(header: SafetensorsHeader, name: str, rows: tuple[int, int] | None, data: bytes) -> torch.Tensor:
    """The tensor (or row block) whose bytes, as read from `tensor_range(header, name, rows)`, are `data`."""
    import torch

    info: TensorInfo = header.tensors[name]
    shape = list(info.shape)
    if rows is not None:
        shape[0] = rows[1] - rows[0]
    if not data:
        return torch.empty(shape, dtype=TORCH_DTYPE[info.dtype])
    return torch.frombuffer(bytearray(data), dtype=TORCH_DTYPE[info.dtype]).reshape(shape)
