"""Carry out a ConversionPlan: stream bytes into shards, copy the other files, write configs and indexes,
check every LoRA's effective delta, write the manifest, and only then move the result into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from . import __version__, journal, jsonschemas, keymap
from .atomic import AtomicDirectory, DestinationClaim
from .dtypes import TORCH_DTYPE
from .errors import LongcatError
from .faults import checkpoint
from .io import (
    SafetensorsHeader,
    ShardWriter,
    TensorEntry,
    iter_chunks,
    read_header,
    read_tensor,
    tensor_range,
    write_index,
)
from .io.reader import CHUNK_BYTES
from .io.writer import BackgroundSink
from .journal import Journal, file_sha256, plan_fingerprint
from .plan import ConversionPlan, OutputTensor, ShardPlan, Slice
from .tree import Tree
from .validate import ValidateOptions, refuse_if_invalid, validate_tree

if TYPE_CHECKING:
    import torch

MANIFEST = "conversion.json"


class HeaderCache:
    """Source headers, read once; adapters and DiT shards already read by the tree reader are reused."""

    def __init__(self, tree: Tree):
        self.root = tree.root
        self._headers: dict[str, SafetensorsHeader] = dict(tree.dit.headers)
        self._headers.update({a.file: a.header for a in tree.adapters})

    def __getitem__(self, file: str) -> SafetensorsHeader:
        if file not in self._headers:
            self._headers[file] = read_header(self.root / file)
        return self._headers[file]


# ------------------------------------------------------------------------------------ tensor bytes


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _slice_chunks(headers: HeaderCache, piece: Slice) -> Iterator[bytes]:
    header = headers[piece.file]
    if piece.cols is None:
        yield from iter_chunks(tensor_range(header, piece.key, piece.rows))
        return
    block = read_tensor(header, piece.key, piece.rows)
    yield _tensor_bytes(block[:, piece.cols[0]:piece.cols[1]])


def _blockdiag_chunks(headers: HeaderCache, tensor: OutputTensor) -> Iterator[bytes]:
    """Rows of a zero matrix with the sources placed one after another on its diagonal."""
    import torch

    dtype = TORCH_DTYPE[tensor.source_dtype]
    col = 0
    for piece in tensor.sources:
        block = read_tensor(headers[piece.file], piece.key, piece.rows)
        padded = torch.zeros(block.shape[0], tensor.shape[1], dtype=dtype)
        padded[:, col:col + block.shape[1]] = block
        col += block.shape[1]
        yield _tensor_bytes(padded)


def _source_chunks(headers: HeaderCache, tensor: OutputTensor) -> Iterator[bytes]:
    """The output's bytes in the source dtype."""
    if tensor.op == "scalar":
        import torch

        yield _tensor_bytes(torch.full(tensor.shape, tensor.value, dtype=torch.float64).to(TORCH_DTYPE[tensor.source_dtype]))
    elif tensor.op == "blockdiag":
        yield from _blockdiag_chunks(headers, tensor)
    else:
        for piece in tensor.sources:
            yield from _slice_chunks(headers, piece)


def _convert_chunks(chunks: Iterable[bytes], tensor: OutputTensor) -> Iterator[bytes]:
    """Cast (and scale, for an alpha rescale) chunk by chunk; chunks always hold whole elements."""
    import torch

    source, target = TORCH_DTYPE[tensor.source_dtype], TORCH_DTYPE[tensor.dtype]
    for chunk in chunks:
        values = torch.frombuffer(bytearray(chunk), dtype=source)
        if tensor.multiplier is not None:
            values = values.to(torch.float64) * tensor.multiplier
        yield _tensor_bytes(values.to(target))


def output_chunks(headers: HeaderCache, tensor: OutputTensor) -> Iterator[bytes]:
    chunks = _source_chunks(headers, tensor)
    if tensor.op == "scalar" or tensor.is_byte_copy:
        return chunks
    return _convert_chunks(chunks, tensor)


# -------------------------------------------------------------------------------------------- steps


def _check_drops(plan: ConversionPlan, headers: HeaderCache) -> None:
    for drop in plan.drops:
        values = read_tensor(headers[drop.file], drop.key).float()
        expected = 1.0 if drop.require == "ones" else 0.0
        if not bool((values == expected).all()):
            raise LongcatError(f"tensor {drop.key!r} would be dropped ({drop.reason}), but it is not all {drop.require}",
                               headers.root / drop.file, "this checkpoint has affine parameters neither target model can hold")


def _write_shard(work: Path, shard: ShardPlan, headers: HeaderCache, progress: tqdm) -> list[dict]:
    """The manifest records of the shard's tensors (each with the sha256 of its bytes)."""
    path = work / shard.file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an unfinished file from an adopted partial folder
    entries = [TensorEntry(t.name, t.dtype, t.shape) for t in shard.tensors]
    with ShardWriter(path, entries, shard.metadata, direct_io=True) as writer:
        for tensor in shard.tensors:
            checkpoint(f"tensor {tensor.name} of {shard.file}")
            writer.write_tensor(tensor.name, _counted(output_chunks(headers, tensor), progress))
    digests = writer.digests
    return [{"name": t.name, "file": shard.file, "dtype": t.dtype, "shape": list(t.shape), "source_dtype": t.source_dtype,
             "rule": t.rule, "op": t.op, "sources": [s.to_json() for s in t.sources], "sha256": digests[t.name]}
            for t in shard.tensors]


def _counted(chunks: Iterable[bytes], progress: tqdm) -> Iterator[bytes]:
    for chunk in chunks:
        progress.update(len(chunk))
        yield chunk


def _copy_file(source: Path, target: Path, progress: tqdm) -> dict:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    with open(source, "rb") as reader, open(target, "xb") as writer:
        sink = BackgroundSink(writer, target, "copy", digest=True)  # writes and hashes in threads while the next chunk is read
        try:
            while chunk := reader.read(CHUNK_BYTES):
                sink.write(chunk)
                progress.update(len(chunk))
            sink.finish()
        finally:
            sink.close_quietly()
        writer.flush()
        os.fsync(writer.fileno())
    shutil.copymode(source, target)
    assert sink.digest is not None
    return {"sha256": sink.digest.hexdigest(), "bytes": source.stat().st_size}


def _write_text(path: Path, text: str) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _check_loras(plan: ConversionPlan, tree: Tree, work: Path) -> list[dict]:
    if not plan.adapters:
        return []
    import torch  # only conversions with LoRAs pay for it

    from .lora_check import compare, responses

    expanded = keymap.expand(tree.dit.config, tree.naming)
    results = []
    for adapter in plan.adapters:
        shard = adapter.shard
        round_to = {piece.key: t.dtype for t in shard.tensors for piece in t.sources if t.dtype != t.source_dtype}
        tolerance = 1e-9
        if any(t.multiplier is not None for t in shard.tensors):
            tolerance = max(4 * torch.finfo(TORCH_DTYPE[t.dtype]).eps for t in shard.tensors if t.op != "scalar")
        source = responses(tree.root / adapter.source_file, adapter.source_format, expanded, round_to)
        target = responses(work / adapter.target_file, adapter.target_format, expanded)
        result = compare(adapter.name, source, target, tolerance)
        if not result.passed:
            raise LongcatError(f"LoRA {adapter.name}: the converted adapter's effective delta differs from the source "
                               f"(max rel error {result.max_rel_error:.3e}, missing modules {list(result.missing)[:3]})",
                               tree.root / adapter.source_file, "please report this as a bug")
        results.append({"source": adapter.source_file, "target": adapter.target_file, **result.to_json()})
    return results


def _progress(total: int, quiet: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", file=sys.stderr,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


def _write_outputs(plan: ConversionPlan, tree: Tree, work: Path, headers: HeaderCache, journal: Journal,
                   progress: tqdm) -> tuple[list[dict], list[dict]]:
    """Shards and copied files, skipping those an adopted journal proves complete."""
    tensors: list[dict] = []
    files: list[dict] = []
    for shard in plan.shards:
        records = journal.completed(shard.file)
        if records is None:
            records = _write_shard(work, shard, headers, progress)
            journal.record(shard.file, records)
        else:
            progress.update(shard.nbytes)
        tensors.extend(records)
        checkpoint(f"shard {shard.file} complete")
    for copy in plan.copies:
        records = journal.completed(copy.target)
        if records is None:
            records = [{**_copy_file(tree.root / copy.source, work / copy.target, progress), "path": copy.target,
                        "source": copy.source, "how": "copied"}]
            journal.record(copy.target, records, records[0]["sha256"])
        else:
            progress.update(records[0]["bytes"])
        files.extend(records)
        checkpoint(f"copied {copy.target}")
    return tensors, files


def execute(plan: ConversionPlan, tree: Tree, dst: Path, *, overwrite: bool = False, quiet: bool = False,
            resume: bool = False, claim: DestinationClaim | None = None) -> dict:
    """Write the converted tree to `dst` atomically; returns the manifest.

    resume: adopt the partial folder of an interrupted run of the same plan and keep what it proves done.
    claim: `dst` already claimed by the caller since before planning (else it is claimed here)."""
    headers = HeaderCache(tree)
    _check_drops(plan, headers)
    checkpoint("planned")
    copy_bytes = plan.copy_bytes
    sources = sorted({tree.root / piece.file for s in plan.shards for t in s.tensors for piece in t.sources})
    fingerprint = plan_fingerprint(plan.to_json(), sources + [tree.root / c.source for c in plan.copies])
    adopt = (lambda folder: journal.adopt(folder, fingerprint) is not None) if resume else None
    atomic = AtomicDirectory(dst, overwrite=overwrite, adopt=adopt, claim=claim)
    with atomic as work, _progress(plan.tensor_bytes + copy_bytes, quiet) as progress:
        log = (journal.adopt(work, fingerprint) if atomic.adopted else None) or journal.start(work, fingerprint)
        tensors, files = _write_outputs(plan, tree, work, headers, log, progress)
        for relative, content in plan.json_files.items():
            files.append({**_write_text(work / relative, json.dumps(content, indent=2) + "\n"), "path": relative,
                          "how": "written"})
        checkpoint("configs written")
        for index in plan.indexes:
            write_index(work / index.file, index.weight_map, index.total_size)
            files.append({**_file_digest(work / index.file), "path": index.file, "how": "written"})
        checkpoint("index written")
        lora_checks = _check_loras(plan, tree, work)
        checkpoint("LoRAs checked")
        manifest = _manifest(plan, tree, tensors, files, lora_checks)
        jsonschemas.check("manifest", manifest, work / MANIFEST)
        _write_text(work / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        checkpoint("manifest written")
        log.discard()
        _check_output(work, dst, plan.target_layout)
    checkpoint("renamed into place")
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
