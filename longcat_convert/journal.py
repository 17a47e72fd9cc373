"""The progress journal of an unfinished conversion, for `--resume`.

While a conversion runs, its partial folder holds `.longcat-journal.json`: the plan's fingerprint and,
for every output file already complete, its sha256 and manifest records (each tensor's record holds the
sha256 of its own bytes and of the source bytes it was made from). A rerun with --resume adopts the
newest partial folder of a dead process whose fingerprint matches, keeps only the files whose bytes still
hash to the journal's value and whose source bytes still hash to the recorded source digests (checked
by the caller, which reads the source), and redoes the rest; anything else is deleted, never trusted.
The fingerprint covers the plan only: sizes and modification times prove nothing about content.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .core.errors import LongcatError
from .core.io import iter_chunks, read_header, read_json_object, tensor_range
from .core.io.reader import CHUNK_BYTES

JOURNAL = ".longcat-journal.json"
JOURNAL_FORMAT = 2  # 2: records carry source_sha256, the fingerprint no longer trusts size and mtime


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Journal:
    folder: Path
    fingerprint: str
    done: dict[str, dict] = field(default_factory=dict)  # relative path -> {"sha256", "records"}
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, relative: str, records: list[dict], sha256: str | None = None) -> None:
        """sha256: the whole file's digest, for copied files. A shard is later proven by its own header and
        its tensors' digests (already in `records`), so its bytes are hashed once, while being written.
        Safe to call from the thread that copies files while shards are written."""
        with self._lock:
            self.done[relative] = {"sha256": sha256, "records": records}
            self._save()

    def _save(self) -> None:
        temporary = self.folder / (JOURNAL + ".tmp")
        temporary.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done}))
        os.replace(temporary, self.folder / JOURNAL)

    def completed(self, relative: str) -> list[dict] | None:
        """The records of a file that is complete and intact, else None."""
        entry = self.done.get(relative)
        path = self.folder / relative
        if entry is None or not path.is_file():
            return None
        intact = file_sha256(path) == entry["sha256"] if entry["sha256"] else _shard_matches(path, entry["records"])
        return entry["records"] if intact else None

    def discard(self) -> None:
        for name in (JOURNAL, JOURNAL + ".tmp"):
            (self.folder / name).unlink(missing_ok=True)


def _shard_matches(path: Path, records: list[dict]) -> bool:
    """A safetensors file whose header lists exactly the recorded tensors, each with the recorded digest."""
    try:
        header = read_header(path)
    except LongcatError:
        return False
    if set(header.tensors) != {r["name"] for r in records}:
        return False
    for record in records:
        info = header.tensors[record["name"]]
        if info.dtype != record["dtype"] or list(info.shape) != record["shape"]:
            return False
        digest = hashlib.sha256()
        for chunk in iter_chunks(tensor_range(header, record["name"])):
            digest.update(chunk)
        if digest.hexdigest() != record["sha256"]:
            return False
    return True


def start(folder: Path, fingerprint: str) -> Journal:
    journal = Journal(folder, fingerprint)
    journal._save()
    return journal


def adopt(folder: Path, fingerprint: str) -> Journal | None:
    """The journal of a partial folder if it belongs to the same plan; None otherwise."""
    try:
        data = read_json_object(folder / JOURNAL)
    except LongcatError:
        return None
    if data.get("fingerprint") != fingerprint or not isinstance(data.get("done"), dict):
        return None
    return Journal(folder, fingerprint, data["done"])


def plan_fingerprint(plan_json: dict) -> str:
    """Identifies the plan (and the journal's format). Whether the source bytes are still those a kept file
    was made from is proven per file, by re-hashing them (see execute)."""
    body = json.dumps({"format": JOURNAL_FORMAT, "plan": plan_json}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()
