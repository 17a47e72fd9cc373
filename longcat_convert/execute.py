"""Carry out a ConversionPlan: stream bytes into shards, copy the other files, write configs and indexes,
check each LoRA's effective delta as soon as it is written, write the manifest, check the result as `validate`
would (the manifest against its schema included), and only then move it into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tqdm import tqdm

from . import __version__, journal
from .atomic import AtomicDirectory, DestinationClaim
from .core.dtypes import TORCH_DTYPE
from .core.errors import LongcatError
from .core.io import (
    SafetensorsHeader,
    ShardWriter,
    SourceFiles,
    TensorEntry,
    decode_tensor,
    read_header,
    tensor_bytes,
    tensor_range,
    write_index,
)
from .core.io.writer import BackgroundSink, SegmentHasher
from .core.lora_format import parse
from .core.tree import Tree
from .faults import crash_point
from .journal import Journal, file_sha256, plan_fingerprint
from .plan import AdapterPlan, ConversionPlan, FileCopy, OutputTensor, ShardPlan, Slice
from .validation.run import ValidateOptions, refuse_if_invalid, validate_tree

if TYPE_CHECKING:
    import torch

MANIFEST = "conversion.json"
OUTPUT_STREAMS = 2  # output files written at once when the output is big (a sha256 stream per core)
PARALLEL_BYTES = 256 * 1024 * 1024  # outputs smaller than this are written one file at a time, in plan order


class Progress(Protocol):
    """What bytes done are reported to: the tqdm bar, or _SharedProgress when several files are written at once."""

    def update(self, count: int, /) -> object: ...


Tap = Callable[[bytes], None]  # receives the raw source bytes behind an output tensor, in order


class Sources:
    """The plan's source files (paths relative to the tree root), read from the descriptors the tree was
    read from: the bytes streamed are those of the files the plan was made from."""

    def __init__(self, tree: Tree):
        self.root = tree.root
        self.files: SourceFiles = tree.sources

    def header(self, file: str) -> SafetensorsHeader:
        return self.files.header(self.root / file)

    def chunks(self, piece: Slice) -> Iterator[bytes]:
        """The raw bytes of a slice's rows (all of its columns)."""
        return self.files.chunks(tensor_range(self.header(piece.file), piece.key, piece.rows))

    def block(self, piece: Slice, tap: Tap | None = None) -> torch.Tensor:
        """A slice's rows as a tensor; `tap` sees their raw bytes."""
        data = b"".join(self.chunks(piece))
        if tap is not None:
            tap(data)
        return decode_tensor(self.header(piece.file), piece.key, piece.rows, data)

    def digest(self, tensor: OutputTensor) -> str:
        """sha256 of the raw source bytes behind an output tensor: its slices' rows, one after another."""
        digest = hashlib.sha256()
        for piece in tensor.sources:
            for chunk in self.chunks(piece):
                digest.update(chunk)
        return digest.hexdigest()


# ------------------------------------------------------------------------------------ tensor bytes


def _tapped(chunks: Iterable[bytes], tap: Tap | None) -> Iterator[bytes]:
    for chunk in chunks:
        if tap is not None:
            tap(chunk)
        yield chunk


def _slice_chunks(sources: Sources, piece: Slice, tap: Tap | None) -> Iterator[bytes]:
    if piece.cols is None:
        yield from _tapped(sources.chunks(piece), tap)
        return
    block = sources.block(piece, tap)
    yield tensor_bytes(block[:, piece.cols[0]:piece.cols[1]])


def _blockdiag_chunks(sources: Sources, tensor: OutputTensor, tap: Tap | None) -> Iterator[bytes]:
    """Rows of a zero matrix with the sources placed one after another on its diagonal."""
    import torch

    dtype = TORCH_DTYPE[tensor.source_dtype]
    col = 0
    for piece in tensor.sources:
        block = sources.block(piece, tap)
        padded = torch.zeros(block.shape[0], tensor.shape[1], dtype=dtype)
        padded[:, col:col + block.shape[1]] = block
        col += block.shape[1]
        yield tensor_bytes(padded)


def _scalar_chunks(sources: Sources, tensor: OutputTensor, tap: Tap | None) -> Iterator[bytes]:
    """The planned value; its source (the alpha it was derived from) is read only for the source digest."""
    import torch

    if tap is not None:
        for piece in tensor.sources:
            for chunk in sources.chunks(piece):
                tap(chunk)
    yield tensor_bytes(torch.full(tensor.shape, tensor.value, dtype=torch.float64).to(TORCH_DTYPE[tensor.source_dtype]))


def _source_chunks(sources: Sources, tensor: OutputTensor, tap: Tap | None) -> Iterator[bytes]:
    """The output's bytes in the source dtype."""
    if tensor.op == "scalar":
        yield from _scalar_chunks(sources, tensor, tap)
    elif tensor.op == "blockdiag":
        yield from _blockdiag_chunks(sources, tensor, tap)
    else:
        for piece in tensor.sources:
            yield from _slice_chunks(sources, piece, tap)


def _convert_chunks(chunks: Iterable[bytes], tensor: OutputTensor) -> Iterator[bytes]:
    """Cast (and scale, for an alpha rescale) chunk by chunk; chunks always hold whole elements."""
    import torch

    source, target = TORCH_DTYPE[tensor.source_dtype], TORCH_DTYPE[tensor.dtype]
    for chunk in chunks:
        values = torch.frombuffer(bytearray(chunk), dtype=source)
        if tensor.multiplier is not None:
            values = values.to(torch.float64) * tensor.multiplier
        yield tensor_bytes(values.to(target))


def _dequant_chunks(sources: Sources, tensor: OutputTensor, tap: Tap | None) -> Iterator[bytes]:
    """An INT8 weight's rows times their scales, computed as upstream's QuantizedLinear does in `tensor.dtype`."""
    from .core.int8 import dequantize_rows

    quantized, scale = (sources.block(piece, tap) for piece in tensor.sources)
    yield tensor_bytes(dequantize_rows(quantized, scale, TORCH_DTYPE[tensor.dtype]))


def _quantize_chunks(sources: Sources, tensor: OutputTensor, tap: Tap | None) -> Iterator[bytes]:
    """Upstream's INT8 quantisation of the (joined) source rows: the int8 weight or the float32 scales."""
    import torch

    from .core.int8 import quantize_rows

    weight = torch.cat([sources.block(piece, tap) for piece in tensor.sources])
    quantized, scale = quantize_rows(weight.to(TORCH_DTYPE[tensor.work_dtype or tensor.source_dtype]))
    yield tensor_bytes(quantized if tensor.op == "int8_weight" else scale)


def output_chunks(sources: Sources, tensor: OutputTensor, tap: Tap | None = None) -> Iterator[bytes]:
    """The output tensor's bytes; `tap`, if given, sees the raw source bytes they are made from."""
    if tensor.op == "dequant":
        return _dequant_chunks(sources, tensor, tap)
    if tensor.op in ("int8_weight", "int8_scale"):
        return _quantize_chunks(sources, tensor, tap)
    chunks = _source_chunks(sources, tensor, tap)
    if tensor.op == "scalar" or tensor.is_byte_copy:
        return chunks
    return _convert_chunks(chunks, tensor)


# -------------------------------------------------------------------------------------------- steps


def _check_drops(plan: ConversionPlan, sources: Sources) -> None:
    for drop in plan.drops:
        values = sources.block(Slice(drop.file, drop.key)).float()
        expected = 1.0 if drop.require == "ones" else 0.0
        if not bool((values == expected).all()):
            raise LongcatError(f"tensor {drop.key!r} would be dropped ({drop.reason}), but it is not all {drop.require}",
                               sources.root / drop.file, "this checkpoint has affine parameters neither target model can hold")


def _write_shard(work: Path, shard: ShardPlan, sources: Sources, progress: Progress) -> list[dict]:
    """The manifest records of the shard's tensors, each with the sha256 of its bytes and of its source bytes
    (the same for a byte copy; hashed on a thread as they are read otherwise)."""
    path = work / shard.file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an unfinished file from an adopted partial folder
    entries = [TensorEntry(t.name, t.dtype, t.shape) for t in shard.tensors]
    hasher = SegmentHasher()
    try:
        with ShardWriter(path, entries, shard.metadata) as writer:
            for tensor in shard.tensors:
                crash_point(f"tensor {tensor.name} of {shard.file}")
                tap = None
                if not tensor.is_byte_copy:
                    hasher.begin(tensor.name)
                    tap = hasher.update
                writer.write_tensor(tensor.name, _counted(output_chunks(sources, tensor, tap), progress))
        source_digests = hasher.finish()
    finally:
        hasher.close_quietly()
    digests = writer.digests
    return [{"name": t.name, "file": shard.file, "dtype": t.dtype, "shape": list(t.shape), "source_dtype": t.source_dtype,
             "rule": t.rule, "op": t.op, "sources": [s.to_json() for s in t.sources], "sha256": digests[t.name],
             "source_sha256": digests[t.name] if t.is_byte_copy else source_digests[t.name]}
            for t in shard.tensors]


def _counted(chunks: Iterable[bytes], progress: Progress) -> Iterator[bytes]:
    for chunk in chunks:
        progress.update(len(chunk))
        yield chunk


LINK_METHODS = ("auto", "reflink", "hardlink", "copy")


def _place_file(files: SourceFiles, source: Path, target: Path, relative: str, progress: Progress, link: str) -> dict:
    """Reflink or hardlink `source` to `target` when `link` asks and the file system can, else copy it; either
    way its bytes are hashed from the source for the manifest. Returns the record's sha256, bytes and how."""
    method = "reflink" if link == "auto" else link
    if method in ("reflink", "hardlink"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if files.share(source, target, method):
            digest, size = _hashed(files.stream(source), progress)
            if method == "reflink":
                os.chmod(target, files.identity(source).mode)
            return {"sha256": digest, "bytes": size, "how": f"{method}ed"}
    return {**_copy_file(files, source, target, relative, progress), "how": "copied"}


def _hashed(chunks: Iterable[bytes], progress: Progress | None = None) -> tuple[str, int]:
    """sha256 hex digest and byte count of `chunks`."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
        if progress is not None:
            progress.update(len(chunk))
    return digest.hexdigest(), size


def _copy_file(files: SourceFiles, source: Path, target: Path, relative: str, progress: Progress) -> dict:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    copied = 0
    with open(target, "xb") as writer:
        sink = BackgroundSink(writer, "copy", digest=True)  # writes and hashes in threads while the next chunk is read
        try:
            for chunk in files.stream(source):
                crash_point(f"copying {relative}")
                sink.write(chunk)
                copied += len(chunk)
                progress.update(len(chunk))
            sink.finish()
        finally:
            sink.close_quietly()
        writer.flush()
        os.fsync(writer.fileno())
    os.chmod(target, files.identity(source).mode)  # the mode of the file read, whatever is at the path now
    assert sink.digest is not None
    return {"sha256": sink.digest.hexdigest(), "bytes": copied}


def _file_source_digest(files: SourceFiles, source: Path) -> str:
    return _hashed(files.stream(source))[0]


def _write_text(path: Path, text: str) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _check_lora(adapter: AdapterPlan, plan: ConversionPlan, tree: Tree, work: Path, sources: Sources) -> dict:
    """The converted adapter's effective ΔW, module by module, against its source's (exact, float64); run right
    after the adapter is written, while both files are in the page cache."""
    import torch  # only conversions with LoRAs pay for it

    from .core.lora_delta import AdapterDeltas, compare_deltas

    source_lora = next(a.lora for a in tree.adapters if a.file == adapter.source_file)
    shard = adapter.shard
    round_to = {piece.key: t.dtype for t in shard.tensors for piece in t.sources if t.dtype != t.source_dtype}
    tolerance = 1e-9
    if any(t.multiplier is not None for t in shard.tensors):
        tolerance = max(4 * torch.finfo(TORCH_DTYPE[t.dtype]).eps for t in shard.tensors if t.op != "scalar")
    source = AdapterDeltas(source_lora, plan.expanded, sources.files.tensor, round_to)
    target = AdapterDeltas(parse(read_header(work / adapter.target_file)).check(), plan.expanded)
    result = compare_deltas(source, target, lambda _terms, bound=tolerance: bound)
    if not result.passed:
        raise LongcatError(f"LoRA {adapter.name}: the converted adapter's effective delta differs from the source "
                           f"(max rel error {result.max_rel_error:.3e}, differing modules "
                           f"{[m.module for m in result.modules if not m.passed][:3]}, missing modules "
                           f"{result.missing[:3]})",
                           tree.root / adapter.source_file, "please report this as a bug")
    return {"source": adapter.source_file, "target": adapter.target_file, "adapter": adapter.name,
            "modules": len(source.parts), "max_rel_error": result.max_rel_error, "tolerance": tolerance,
            "missing_modules": result.missing, "extra_modules": result.unexpected, "passed": True}


def _progress(total: int, quiet: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", file=sys.stderr,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def _kept_shard(log: Journal, shard: ShardPlan, sources: Sources) -> list[dict] | None:
    """The journal's records of a shard whose output is intact and whose every tensor's source bytes still
    hash to the recorded source digest; None if it must be written (again)."""
    records = log.completed(shard.file)
    if records is None:
        return None
    recorded = {r.get("name"): r.get("source_sha256") for r in records}
    if any(recorded.get(t.name) != sources.digest(t) for t in shard.tensors):
        return None
    return records


def _kept_copy(log: Journal, copy: FileCopy, sources: Sources) -> list[dict] | None:
    """The journal's record of a copy that is intact and whose source still has the same bytes."""
    records = log.completed(copy.target)
    if records is None or _file_source_digest(sources.files, sources.root / copy.source) != records[0]["sha256"]:
        return None
    return records


class _SharedProgress:
    """The one progress bar, updated from every thread writing an output file. Once `stop` is set (the conversion
    failed), the next update in any of them raises _Stopped, so each ends within a chunk."""

    def __init__(self, bar: tqdm):
        self._bar = bar
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def update(self, count: int) -> None:
        if self.stop.is_set():
            raise _Stopped
        with self._lock:
            self._bar.update(count)


class _Stopped(Exception):
    """Ends a thread writing an output file once the conversion has failed elsewhere (the output is abandoned)."""


@dataclass
class _Outputs:
    """What writing the output files produced, keyed by output file (threads finish in any order)."""

    plan: ConversionPlan
    tree: Tree
    work: Path
    sources: Sources
    log: Journal
    progress: _SharedProgress
    link: str
    tensors: dict[str, list[dict]] = field(default_factory=dict)
    files: dict[str, list[dict]] = field(default_factory=dict)
    lora_checks: dict[str, dict] = field(default_factory=dict)

    @cached_property
    def adapters(self) -> dict[str, AdapterPlan]:
        """The plan's adapters by the shard file they are written to."""
        return {adapter.shard.file: adapter for adapter in self.plan.adapters}

    def write_shard(self, shard: ShardPlan) -> None:
        """A shard (kept if an adopted journal proves it made from the same source bytes); an adapter's is checked
        as soon as it is complete, while both files are in the page cache."""
        adapter = self.adapters.get(shard.file)
        records = _kept_shard(self.log, shard, self.sources)
        if records is None:
            records = _write_shard(self.work, shard, self.sources, self.progress)
            self.log.record(shard.file, records)
        else:
            self.progress.update(shard.nbytes)
        self.tensors[shard.file] = records
        self.sources.files.verify()  # fail early rather than after the remaining files
        crash_point(f"shard {shard.file} complete")
        if adapter is not None:
            self.lora_checks[shard.file] = _check_lora(adapter, self.plan, self.tree, self.work, self.sources)
            crash_point(f"LoRA {adapter.name} checked")

    def copy(self, copy: FileCopy) -> None:
        """A file carried over (kept if an adopted journal proves it intact and its source unchanged)."""
        records = _kept_copy(self.log, copy, self.sources)
        if records is None:
            placed = _place_file(self.sources.files, self.tree.root / copy.source, self.work / copy.target,
                                 copy.target, self.progress, self.link)
            records = [{**placed, "path": copy.target, "source": copy.source}]
            self.log.record(copy.target, records, records[0]["sha256"])
        else:
            self.progress.update(records[0]["bytes"])
        self.files[copy.target] = records
        crash_point(f"copied {copy.target}")

    def in_plan_order(self) -> tuple[list[dict], list[dict], list[dict]]:
        """Tensor, file and LoRA check records, in the plan's order whatever order the files were written in."""
        return ([record for shard in self.plan.shards for record in self.tensors[shard.file]],
                [record for copy in self.plan.copies for record in self.files[copy.target]],
                [self.lora_checks[a.shard.file] for a in self.plan.adapters])


def _write_outputs(plan: ConversionPlan, tree: Tree, work: Path, sources: Sources, log: Journal,
                   bar: tqdm, link: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Shards and copied files; returns tensor, file and LoRA check records (in plan order).

    An output of PARALLEL_BYTES or more is written OUTPUT_STREAMS files at a time: one stream leaves the disk idle
    while it hashes (sha256 runs at about the speed a disk copies) and the cores idle while it waits for the disk.
    Largest first, except that adapters (small, but busy computing: casts, alpha rescaling, the ΔW check) come
    right after the first file, so that their computing overlaps the others' disk time rather than ending the run.
    A smaller output is written file by file in plan order."""
    outputs = _Outputs(plan, tree, work, sources, log, _SharedProgress(bar), link)
    jobs = ([(shard.nbytes, shard.file in outputs.adapters, partial(outputs.write_shard, shard)) for shard in plan.shards]
            + [(copy.nbytes, False, partial(outputs.copy, copy)) for copy in plan.copies])
    if sum(size for size, _, _ in jobs) < PARALLEL_BYTES:
        for _, _, job in jobs:
            job()
        return outputs.in_plan_order()
    by_size = sorted((item for item in jobs if not item[1]), key=lambda item: -item[0])
    ordered = by_size[:1] + [item for item in jobs if item[1]] + by_size[1:]
    with ThreadPoolExecutor(max_workers=OUTPUT_STREAMS, thread_name_prefix="longcat-output") as pool:
        futures = [pool.submit(job) for _, _, job in ordered]
        try:
            for future in as_completed(futures):
                future.result()  # the first failure ends the conversion
        except BaseException:
            outputs.progress.stop.set()  # running files stop within a chunk; leaving the pool waits for them
            for future in futures:
                future.cancel()
            raise
    return outputs.in_plan_order()


def execute(plan: ConversionPlan, tree: Tree, dst: Path, *, overwrite: bool = False, quiet: bool = False,
            resume: bool = False, claim: DestinationClaim | None = None, link: str = "auto") -> dict:
    """Write the converted tree to `dst` atomically; returns the manifest.

    Every source byte is read from the files the tree was read from (`tree.sources`); if any of them has
    changed when the output is complete, nothing is committed.
    resume: adopt the partial folder of an interrupted run of the same plan and keep what it proves done.
    claim: `dst` already claimed by the caller since before planning (else it is claimed here).
    link: how files carried over unchanged (text encoder, VAE, tokenizer, ...) are placed: auto (a reflink where
    the file system supports it, else a copy), reflink, hardlink (each falling back to a copy), copy."""
    if link not in LINK_METHODS:
        raise LongcatError(f"unknown link method {link!r}; choose one of {', '.join(LINK_METHODS)}")
    sources = Sources(tree)
    _check_drops(plan, sources)
    crash_point("planned")
    copy_bytes = plan.copy_bytes
    fingerprint = plan_fingerprint(plan.to_json())
    adopt = (lambda folder: journal.adopt(folder, fingerprint) is not None) if resume else None
    atomic = AtomicDirectory(dst, overwrite=overwrite, adopt=adopt, claim=claim)
    with atomic as work, _progress(plan.tensor_bytes + copy_bytes, quiet) as progress:
        log = (journal.adopt(work, fingerprint) if atomic.adopted else None) or journal.start(work, fingerprint)
        tensors, files, lora_checks = _write_outputs(plan, tree, work, sources, log, progress, link)
        for relative, content in plan.json_files.items():
            files.append({**_write_text(work / relative, json.dumps(content, indent=2) + "\n"), "path": relative,
                          "how": "written"})
        crash_point("configs written")
        for index in plan.indexes:
            write_index(work / index.file, index.weight_map, index.total_size)
            files.append({**_file_digest(work / index.file), "path": index.file, "how": "written"})
        crash_point("index written")
        manifest = _manifest(plan, tree, tensors, files, lora_checks)
        _write_text(work / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        crash_point("manifest written")
        sources.files.verify()  # the last moment before the rename: everything read is still what was planned
        log.discard()
        _check_output(work, dst, plan.target_layout)
    crash_point("renamed into place")
    return manifest


def _check_output(work: Path, dst: Path, layout: str) -> None:
    """The converted tree passes `validate` (header-only) before it is moved into place."""
    report = validate_tree(work, ValidateOptions(layout=layout))
    refuse_if_invalid(report, dst, "nothing was written: the converted tree would not pass `longcat-convert "
                      "validate`; please report this with the source tree's `validate` output")


def _file_digest(path: Path) -> dict:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _manifest(plan: ConversionPlan, tree: Tree, tensors: list[dict], files: list[dict], lora_checks: list[dict]) -> dict:
    return {
        "tool": "longcat-convert",
        "version": __version__,
        "source": {"path": str(tree.root), "layout": plan.source_layout},
        "target": {"layout": plan.target_layout},
        "dtype_policy": plan.policy.describe(),
        "census": {"before": plan.census_before, "after": plan.census_after},
        "tensors": tensors,
        "files": files,
        "drops": [{"file": d.file, "key": d.key, "reason": d.reason} for d in plan.drops],
        "skipped": [{"path": k.path, "reason": k.reason} for k in plan.skipped],
        "adapters": [{"name": a.name, "source": a.source_file, "target": a.target_file, "modules": a.modules,
                      "notes": list(a.notes)} for a in plan.adapters],
        "lora_checks": lora_checks,
    }
