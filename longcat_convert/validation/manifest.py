"""The conversion manifest (`conversion.json` at the tree root): what the converter says it wrote.

Header-only checks: every recorded file exists with its byte size, every recorded tensor is in its file
with the recorded shape (dtypes are compared by the component checks), and no tensor of a recorded file is missing from the manifest.
`--deep` then compares sha256 digests (see deep.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.jsonschemas import load_schema, schema_findings
from .context import Context, read_json_reporting

MANIFEST_NAME = "conversion.json"
SHOWN_SCHEMA_PROBLEMS = 5


@dataclass(frozen=True)
class RecordedTensor:
    file: str  # relative to the tree root
    name: str
    sha256: str | None
    dtype: str | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class RecordedFile:
    path: str
    sha256: str | None
    size: int | None


@dataclass
class Manifest:
    path: Path
    tensors: dict[tuple[str, str], RecordedTensor]  # (file, name) -> record
    files: dict[str, RecordedFile]
    target_layout: str | None
    failed_lora_checks: list[str]

    def dtypes_by_file(self) -> dict[str, dict[str, str]]:
        table: dict[str, dict[str, str]] = {}
        for record in self.tensors.values():
            if record.dtype:
                table.setdefault(record.file, {})[record.name] = record.dtype
        return table

    def to_json(self, ctx: Context) -> dict:
        return {"path": ctx.rel(self.path), "tensors": len(self.tensors), "files": len(self.files),
                "target_layout": self.target_layout}


def manifest_records(document: dict) -> tuple[list[RecordedTensor], list[RecordedFile]]:
    """The one place that knows the manifest's field names."""
    tensors = [RecordedTensor(str(t.get("file")), str(t.get("name")), t.get("sha256"), t.get("dtype"),
                              tuple(t["shape"]) if isinstance(t.get("shape"), list) else None)
               for t in document.get("tensors") or [] if isinstance(t, dict)]
    files = [RecordedFile(str(f.get("path")), f.get("sha256"), f.get("bytes"))
             for f in document.get("files") or [] if isinstance(f, dict)]
    return tensors, files


def load_manifest(ctx: Context) -> Manifest | None:
    path = ctx.root / MANIFEST_NAME
    if not path.is_file():
        return None
    rel = ctx.rel(path)
    document = read_json_reporting(ctx, "manifest", path)
    if document is None:
        return None
    _check_schema(ctx, rel, document)
    tensors, files = manifest_records(document)
    target = document.get("target") if isinstance(document.get("target"), dict) else {}
    failed = [str(c.get("adapter")) for c in document.get("lora_checks") or []
              if isinstance(c, dict) and c.get("passed") is False]
    return Manifest(path, {(t.file, t.name): t for t in tensors}, {f.path: f for f in files},
                    target.get("layout"), failed)


def _check_schema(ctx: Context, rel: str, document: dict) -> None:
    try:
        load_schema("manifest")
    except FileNotFoundError:
        return
    problems = schema_findings("manifest", document)
    for problem in problems[:SHOWN_SCHEMA_PROBLEMS]:
        ctx.findings.error("manifest", "manifest", f"does not match the manifest schema: {problem.text}", rel)
    if len(problems) > SHOWN_SCHEMA_PROBLEMS:
        ctx.findings.error("manifest", "manifest", f"and {len(problems) - SHOWN_SCHEMA_PROBLEMS} more manifest "
                           "schema problems", rel)


def check_manifest_headers(ctx: Context, manifest: Manifest, layout: str) -> None:
    rel = ctx.rel(manifest.path)
    if manifest.target_layout not in (None, layout):
        ctx.findings.warning("manifest", "manifest", f"records a conversion to {manifest.target_layout}, "
                             f"but the tree is checked as {layout}", rel)
    for adapter in manifest.failed_lora_checks:
        ctx.findings.error("manifest", "manifest", f"records a failed LoRA effective-delta check for {adapter}", rel)
    for record in manifest.files.values():
        _check_recorded_file(ctx, rel, record)
    absent: dict[str, int] = {}
    for record in manifest.tensors.values():
        if record.file in ctx.headers:
            _check_recorded_tensor(ctx, record)
        elif not _inside(ctx, ctx.root / record.file) or not (ctx.root / record.file).is_file():
            absent[record.file] = absent.get(record.file, 0) + 1
    for file, count in absent.items():  # unreadable files are reported where they are checked
        ctx.findings.error("manifest", "manifest", f"records {count} tensors in {file}, which does not exist", rel)
    recorded_files = {record.file for record in manifest.tensors.values()}
    for file in sorted(recorded_files & set(ctx.headers)):
        for name in ctx.headers[file].tensors:
            if (file, name) not in manifest.tensors:
                ctx.findings.warning("manifest", "unrecorded_tensor", f"holds {name}, which {MANIFEST_NAME} "
                                     "does not record", file, name)


def _check_recorded_file(ctx: Context, rel: str, record: RecordedFile) -> None:
    path = ctx.root / record.path
    if not _inside(ctx, path) or not path.is_file():
        ctx.findings.error("manifest", "manifest", f"records {record.path}, which does not exist", rel)
    elif record.size is not None and path.stat().st_size != record.size:
        ctx.findings.error("manifest", "manifest", f"records {record.size} bytes but the file has "
                           f"{path.stat().st_size}", record.path)


def _check_recorded_tensor(ctx: Context, record: RecordedTensor) -> None:
    info = ctx.headers[record.file].tensors.get(record.name)
    if info is None:
        ctx.findings.error("manifest", "manifest", f"records {record.name} in this file, which does not hold it",
                           record.file, record.name)
    elif record.shape is not None and info.shape != record.shape:
        ctx.findings.error("manifest", "manifest", f"{record.name} has shape {list(info.shape)}, the manifest "
                           f"records {list(record.shape)}", record.file, record.name)


def _inside(ctx: Context, path: Path) -> bool:
    return path.resolve().is_relative_to(ctx.root)
