"""`--deep`: stream every tensor once, in bounded chunks, counting NaN/Inf and zeros and hashing.

Each safetensors file is read front to back exactly once (its tensors tile the data buffer, which the
header check guarantees), so one pass gives both the per-tensor sha256 the manifest records and the
whole-file sha256. Memory stays at one chunk buffer whatever the tensor or shard size.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..dtypes import FLOATING, TORCH_DTYPE
from ..io import SafetensorsHeader, TensorInfo
from ..journal import file_sha256
from .manifest import Manifest
from .tree import Context

CHUNK_BYTES = 16 * 1024 * 1024
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
    summary = DeepSummary()
    hashed_files = {t.file for t in manifest.tensors.values()} if manifest else set()
    for rel in sorted(ctx.headers):
        header = ctx.headers[rel]
        recorded = manifest.files.get(rel) if manifest else None

        def on_tensor(info: TensorInfo, stats: TensorStats, rel: str = rel) -> None:
            _judge_tensor(ctx, rel, info, stats, manifest, expectations.get((rel, info.name)), summary)

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
    """Read `header.path` once; call `on_tensor` for each tensor in offset order; the file's sha256 if asked."""
    file_digest = hashlib.sha256() if hash_file else None
    view = memoryview(bytearray(CHUNK_BYTES))
    with open(header.path, "rb") as handle:
        head = handle.read(header.data_start)
        if file_digest is not None:
            file_digest.update(head)
        for info in sorted(header.tensors.values(), key=lambda t: t.begin):
            stats = TensorStats(digest=hashlib.sha256() if hash_tensors else None)
            _stream_tensor(handle, info, view, stats, file_digest)
            on_tensor(info, stats)
        if file_digest is not None:
            file_digest.update(handle.read())
    return file_digest.hexdigest() if file_digest is not None else None


def _stream_tensor(handle, info: TensorInfo, view: memoryview, stats: TensorStats, file_digest) -> None:
    dtype = TORCH_DTYPE[info.dtype]
    floating = info.dtype in FLOATING
    remaining = info.nbytes
    usable = len(view) - len(view) % dtype.itemsize
    while remaining:
        want = min(usable, remaining)
        got = handle.readinto(view[:want])
        if got != want:
            raise OSError(f"file ended inside tensor {info.name!r}")
        chunk = view[:got]
        for digest in (stats.digest, file_digest):
            if digest is not None:
                digest.update(chunk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = torch.frombuffer(chunk, dtype=dtype)
        if info.dtype in WIDEN:
            values = values.float()
        stats.update(values, floating)
        remaining -= got


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
