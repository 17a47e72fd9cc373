"""`--deep`: stream every tensor once, in bounded chunks, counting NaN/Inf and zeros and hashing.

Each safetensors file is read front to back exactly once (its tensors tile the data buffer, which the
header check guarantees), so one pass gives both the per-tensor sha256 the manifest records and the
whole-file sha256. Memory stays at BUFFERS chunk buffers whatever the tensor or shard size.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..core import progress
from ..core.dtypes import FLOATING, TORCH_DTYPE
from ..core.io import SafetensorsHeader, TensorInfo
from ..core.io.reader import advise
from ..core.torch_threads import torch_threads
from ..journal import file_sha256
from .context import Context
from .manifest import Manifest

CHUNK_BYTES = 16 * 1024 * 1024
BUFFERS = 4  # chunk buffers in flight (memory: BUFFERS × CHUNK_BYTES)
AHEAD = BUFFERS - 2  # chunks read ahead of the one being examined
# float8 kinds have no isnan/isinf kernels on every torch build; they are widened per chunk.
WIDEN = {"F8_E4M3", "F8_E5M2"}


@dataclass
class TensorStats:
    """What one pass over a tensor's chunks found. One fast min/max reduction per chunk answers NaN/Inf
    (they propagate into min/max), all-zero and all-ones; exact NaN/Inf counts only when one is present."""

    elements: int = 0
    nan: int = 0
    inf: int = 0
    any_nonzero: bool = False
    all_ones: bool = True
    digest: object = None  # a hashlib sha256 object when the tensor's hash is wanted

    def update(self, values: torch.Tensor, floating: bool) -> None:
        self.elements += values.numel()
        if values.dtype == torch.bool:
            values = values.view(torch.uint8)
        low, high = (float(v) for v in torch.aminmax(values))
        if floating and not (math.isfinite(low) and math.isfinite(high)):
            self.nan += int(torch.isnan(values).sum())
            self.inf += int(torch.isinf(values).sum())
        self.any_nonzero = self.any_nonzero or low != 0 or high != 0
        self.all_ones = self.all_ones and low == 1 and high == 1


@dataclass
class DeepSummary:
    files: int = 0
    tensors: int = 0
    bytes: int = 0
    nan_inf_tensors: int = 0
    all_zero_tensors: int = 0
    hashed_against_manifest: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def deep_scan(ctx: Context, manifest: Manifest | None, expectations: dict[tuple[str, str], str]) -> DeepSummary:
    """Scan every readable safetensors file the checks met; `expectations` maps (file, key) to ones/zeros.

    Hashes are computed only where the manifest has something to compare them with."""
    tensor_bytes = sum(info.nbytes for header in ctx.headers.values() for info in header.tensors.values())
    with progress.counter(tensor_bytes, "validate --deep") as bar:
        return _scan_all(ctx, manifest, expectations, bar)


def _scan_all(ctx: Context, manifest: Manifest | None, expectations: dict[tuple[str, str], str],
              bar) -> DeepSummary:
    summary = DeepSummary()
    hashed_files = {t.file for t in manifest.tensors.values()} if manifest else set()
    for rel in sorted(ctx.headers):
        header = ctx.headers[rel]
        recorded = manifest.files.get(rel) if manifest else None

        def on_tensor(info: TensorInfo, stats: TensorStats, rel: str = rel) -> None:
            _judge_tensor(ctx, rel, info, stats, manifest, expectations.get((rel, info.name)), summary)
            bar.update(info.nbytes)

        try:
            file_digest = scan_file(header, on_tensor, hash_tensors=rel in hashed_files,
                                    hash_file=bool(recorded and recorded.sha256))
        except OSError as exc:
            ctx.findings.error(_component_of(rel), "unreadable_file", f"could not be read to the end ({exc})", rel)
            continue
        summary.files += 1
        summary.bytes += header.file_size
        if file_digest is not None and recorded.sha256 != file_digest:
            ctx.findings.error("manifest", "hash_mismatch", "sha256 of the file differs from the manifest's", rel)
    if manifest is not None:
        _hash_other_files(ctx, manifest)
    return summary


def scan_file(header: SafetensorsHeader, on_tensor: Callable[[TensorInfo, TensorStats], None], *,
              hash_tensors: bool = True, hash_file: bool = True) -> str | None:
    """Read `header.path` once; call `on_tensor` for each tensor in offset order; the file's sha256 if asked.

    Three stages overlap: a reader thread fills a ring of BUFFERS chunk buffers AHEAD chunks in advance,
    this thread takes the statistics, and a hashing thread follows (sha256 costs about as much as
    reading); `on_tensor` is called once a tensor's hash is complete."""
    file_digest = hashlib.sha256() if hash_file else None
    tensors = sorted(header.tensors.values(), key=lambda t: t.begin)
    pieces = [_chunk_ranges(header, info) for info in tensors]
    fd = os.open(header.path, os.O_RDONLY)
    try:
        advise(fd, 0, 0, "SEQUENTIAL")
        # one torch thread: a 16 MB min/max is quick on one core, and more would fight the reader and hasher
        with (torch_threads(1), ThreadPoolExecutor(1, "longcat-deep-read") as reader,
              ThreadPoolExecutor(1, "longcat-deep-sha256") as hasher):
            pipe = _Pipeline(fd, [r for ranges in pieces for r in ranges], reader, hasher, file_digest)
            pipe.hash_bytes(_pread_exact(fd, 0, header.data_start, "the header"))
            for info, ranges in zip(tensors, pieces, strict=True):
                stats = TensorStats(digest=hashlib.sha256() if hash_tensors else None)
                for _ in ranges:
                    _take_stats(stats, pipe.next_chunk(stats.digest), info)
                pipe.finished(info, stats, on_tensor)
            end = header.data_start + max((t.end for t in tensors), default=0)
            pipe.hash_bytes(_pread_exact(fd, end, header.file_size - end, "the file's tail"))
            pipe.drain(on_tensor)
    finally:
        os.close(fd)
    return file_digest.hexdigest() if file_digest is not None else None


def _chunk_ranges(header: SafetensorsHeader, info: TensorInfo) -> list[tuple[int, int]]:
    """(absolute offset, length) of the chunks of one tensor; each holds whole elements."""
    begin, end = header.absolute_range(info)
    step = CHUNK_BYTES - CHUNK_BYTES % TORCH_DTYPE[info.dtype].itemsize
    return [(offset, min(step, end - offset)) for offset in range(begin, end, step)]


def _take_stats(stats: TensorStats, chunk: memoryview, info: TensorInfo) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = torch.frombuffer(chunk, dtype=TORCH_DTYPE[info.dtype])
    if info.dtype in WIDEN:
        values = values.float()
    stats.update(values, info.dtype in FLOATING)


class _Pipeline:
    """Chunks of one file in order, read ahead on `reader` into a ring of buffers and hashed on `hasher`.

    Chunk i lives in buffer i % BUFFERS; the read of chunk j waits until chunk j - BUFFERS is hashed, so
    with AHEAD = BUFFERS - 2 the chunk being hashed, the one being examined and the ones being read
    never share a buffer."""

    def __init__(self, fd: int, ranges: list[tuple[int, int]], reader: ThreadPoolExecutor,
                 hasher: ThreadPoolExecutor, file_digest) -> None:
        self.fd, self.ranges, self.reader, self.hasher, self.file_digest = fd, ranges, reader, hasher, file_digest
        self.buffers = [memoryview(bytearray(CHUNK_BYTES)) for _ in range(BUFFERS)]
        self.hashed: list[Future | None] = [None] * BUFFERS  # the last hashing queued per buffer
        self.reads: dict[int, Future] = {}
        self.read_next = 0  # the first chunk whose read is not queued yet
        self.taken = 0  # chunks handed out so far
        self.last: Future | None = None  # hashing is FIFO: when this is done, all queued before it are
        self.waiting: deque[tuple[Future | None, TensorInfo, TensorStats]] = deque()

    def next_chunk(self, tensor_digest) -> memoryview:
        """The next chunk's bytes (valid until the next call), its hashing already queued."""
        index = self.taken
        self.taken += 1
        while self.read_next < len(self.ranges) and self.read_next <= index + AHEAD:
            self._queue_read(self.read_next)
            self.read_next += 1
        self.reads.pop(index).result()  # raises what the read raised
        chunk = self.buffers[index % BUFFERS][:self.ranges[index][1]]
        self._hash(chunk, tensor_digest)
        self.hashed[index % BUFFERS] = self.last
        return chunk

    def hash_bytes(self, data: bytes) -> None:
        self._hash(memoryview(data), None)

    def finished(self, info: TensorInfo, stats: TensorStats, on_tensor) -> None:
        self.waiting.append((self.last, info, stats))
        while self.waiting and (self.waiting[0][0] is None or self.waiting[0][0].done()):
            self._report(on_tensor)

    def drain(self, on_tensor) -> None:
        while self.waiting:
            self._report(on_tensor)

    def _queue_read(self, index: int) -> None:
        slot = index % BUFFERS
        if self.hashed[slot] is not None:
            self.hashed[slot].result()
        offset, length = self.ranges[index]
        self.reads[index] = self.reader.submit(_pread_into, self.fd, self.buffers[slot][:length], offset)

    def _hash(self, chunk: memoryview, tensor_digest) -> None:
        digests = [d for d in (tensor_digest, self.file_digest) if d is not None]
        if digests and len(chunk):
            self.last = self.hasher.submit(_update_all, digests, chunk)

    def _report(self, on_tensor) -> None:
        pending, info, stats = self.waiting.popleft()
        if pending is not None:
            pending.result()  # raises what the hashing raised
        on_tensor(info, stats)


def _update_all(digests: list, chunk: memoryview) -> None:
    for digest in digests:
        digest.update(chunk)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise OSError(f"file ended at byte {offset + done}")
        done += got


def _pread_exact(fd: int, offset: int, length: int, what: str) -> bytes:
    data = bytearray(length)
    try:
        _pread_into(fd, memoryview(data), offset)
    except OSError:
        raise OSError(f"file ended inside {what}") from None
    return bytes(data)


def _judge_tensor(ctx: Context, rel: str, info: TensorInfo, stats: TensorStats, manifest: Manifest | None,
                  expectation: str | None, summary: DeepSummary) -> None:
    component = _component_of(rel)
    summary.tensors += 1
    if stats.nan or stats.inf:
        summary.nan_inf_tensors += 1
        ctx.findings.error(component, "nan_inf", f"{info.name} has {stats.nan} NaN and {stats.inf} Inf among "
                           f"{stats.elements} values", rel, info.name)
    if stats.elements and not stats.any_nonzero and expectation != "zeros":
        summary.all_zero_tensors += 1
        ctx.findings.warning(component, "all_zero", f"{info.name} {list(info.shape)} is all zeros", rel, info.name)
    if expectation == "zeros" and stats.any_nonzero:
        ctx.findings.error(component, "drop_value", f"{info.name} has nonzero values; a parameter-free "
                           "LayerNorm's bias must be zero to drop it", rel, info.name)
    if expectation == "ones" and not stats.all_ones:
        ctx.findings.error(component, "drop_value", f"{info.name} has values other than 1; a parameter-free "
                           "LayerNorm's weight must be ones to drop it", rel, info.name)
    record = manifest.tensors.get((rel, info.name)) if manifest else None
    if record is not None and record.sha256 and stats.digest is not None:
        summary.hashed_against_manifest += 1
        if record.sha256 != stats.digest.hexdigest():
            ctx.findings.error(component, "hash_mismatch", f"{info.name}: sha256 of its bytes differs from the "
                               "conversion manifest's", rel, info.name)


def _hash_other_files(ctx: Context, manifest: Manifest) -> None:
    for path, record in manifest.files.items():
        full = ctx.root / path
        if path in ctx.headers or not record.sha256 or not full.is_file() or not full.resolve().is_relative_to(ctx.root):
            continue
        if file_sha256(full) != record.sha256:
            ctx.findings.error("manifest", "hash_mismatch", "sha256 of the file differs from the manifest's", path)


def _component_of(rel: str) -> str:
    top = rel.split("/", 1)[0]
    return {"dit": "dit", "transformer": "dit"}.get(top, top)
