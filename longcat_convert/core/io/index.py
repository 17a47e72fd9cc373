"""Sharded-checkpoint index files (`*.safetensors.index.json`) and huggingface_hub's shard naming."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import LongcatError
from .jsonfile import parse_json, read_json


@dataclass(frozen=True)
class ShardIndex:
    path: Path
    weight_map: dict[str, str]  # tensor name -> shard file name, relative to the index's folder
    total_size: int | None
    metadata: dict

    @property
    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def shard_name(prefix: str, number: int, total: int) -> str:
    """`prefix-00001-of-00006.safetensors`, or `prefix.safetensors` when there is a single shard."""
    if total == 1:
        return f"{prefix}.safetensors"
    return f"{prefix}-{number:05d}-of-{total:05d}.safetensors"


def index_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def read_index(path: str | Path, content: bytes | None = None) -> ShardIndex:
    """content: the file's bytes, when the caller has read them (else the path is read)."""
    path = Path(path)
    fix = "re-create it, e.g. with `longcat-convert convert`"
    document = read_json(path, fix) if content is None else parse_json(content, path, fix)
    return index_from_document(document, path)


def index_from_document(data, path: Path) -> ShardIndex:
    """The index held by an already parsed JSON document (read from `path`)."""
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise LongcatError("index has no `weight_map` object", path, "re-create the index")
    weight_map = data["weight_map"]
    for key, file in weight_map.items():
        if not isinstance(file, str):
            raise LongcatError(f"weight_map entry {key!r} is not a file name", path)
        check_relative_name(file, path)
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise LongcatError("index `metadata` is not an object", path)
    total = metadata.get("total_size")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise LongcatError(f"index metadata.total_size is not a byte count: {total!r}", path)
    return ShardIndex(path, dict(weight_map), total, metadata)


def check_relative_name(name: str, where: Path) -> None:
    """Refuse a file reference that could leave the folder holding the index."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or "/" in name or "\\" in name or any(part in ("..", "") for part in pure.parts) or len(pure.parts) != 1:
        raise LongcatError(f"weight_map names {name!r}, which is not a plain file name inside the folder", where,
                           "shard references must be bare file names next to the index")


def write_index(path: str | Path, weight_map: dict[str, str], total_size: int) -> None:
    body = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    Path(path).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
