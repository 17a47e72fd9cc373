"""Kill a conversion with SIGKILL at many exact points; nothing half-written may survive, and --resume
must finish the job byte-identically to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core.io import read_header
from longcat_convert.validation.run import ValidateOptions, validate_tree
from tests.helpers import file_digests, run_convert_process


def _run(src: Path, dst: Path, *extra: str, kill_at: int | None = None, trace: bool = False) -> subprocess.CompletedProcess:
    return run_convert_process(src, dst, *extra, kill_at=kill_at, trace=trace)


def _crash_points(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("crash point ")]


@pytest.fixture(scope="module")
def reference(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An uninterrupted run, traced: the output to compare with and the list of crash points."""
    dst = tmp_path_factory.mktemp("reference") / "fv"
    result = _run(tiny_raw, dst, kill_at=10**9, trace=True)
    assert result.returncode == 0, result.stderr
    return dst, _crash_points(result)


def test_crash_points_cover_every_phase(reference: tuple[Path, list[str]]) -> None:
    labels = " ".join(reference[1])
    for phase in ("planned", "tensor", "shard", "lora/", "copied", "configs written", "index written",
                  "refinement_lora checked", "manifest written", "renamed into place"):
        assert phase in labels, phase


def test_sigkill_anywhere_leaves_nothing_half_written(tiny_raw: Path, reference: tuple[Path, list[str]],
                                                      tmp_path: Path) -> None:
    expected, points = reference
    source_before = file_digests(tiny_raw)
    total = len(points)
    kill_points = sorted({1 + (total - 1) * i // 23 for i in range(24)})
    assert len(kill_points) >= 20
    outcomes = {"absent": 0, "complete": 0}
    for point in kill_points:
        dst = tmp_path / f"fv-{point}"
        result = _run(tiny_raw, dst, kill_at=point)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr)
        if dst.exists():
            report = validate_tree(dst, ValidateOptions(deep=True))
            assert report["valid"] and report["deep_scan"]["hashed_against_manifest"] > 0, point
            assert file_digests(dst) == file_digests(expected), point
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        assert file_digests(tiny_raw) == source_before, point
        if point not in kill_points[::3]:
            continue
        rerun = _run(tiny_raw, dst, "--overwrite")
        assert rerun.returncode == 0, rerun.stderr
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}.")]
        assert leftovers == [], (point, leftovers)
        assert file_digests(dst) == file_digests(expected), point
    assert outcomes["absent"] and outcomes["complete"]


def _index_of(points: list[str], text: str) -> int:
    return next(n for n, line in enumerate(points, start=1) if text in line)


def test_resume_reuses_completed_files_and_matches(tiny_raw: Path, reference: tuple[Path, list[str]],
                                                   tmp_path: Path) -> None:
    expected, points = reference
    dst = tmp_path / "fv"
    middle = _index_of(points, "copied")  # every shard done, the copies begin
    assert _run(tiny_raw, dst, kill_at=middle).returncode == -signal.SIGKILL
    partials = [p for p in tmp_path.iterdir() if ".longcat-partial-" in p.name]
    assert len(partials) == 1 and not dst.exists()
    resumed = _run(tiny_raw, dst, "--resume", kill_at=10**9, trace=True)
    assert resumed.returncode == 0, resumed.stderr
    rewritten = [line for line in _crash_points(resumed) if ": tensor " in line]
    assert rewritten == [], f"resume rewrote {len(rewritten)} tensors"
    assert file_digests(dst) == file_digests(expected)
    assert [p.name for p in tmp_path.iterdir()] == ["fv"]


def test_resume_redoes_a_damaged_file(tiny_raw: Path, reference: tuple[Path, list[str]], tmp_path: Path) -> None:
    expected, points = reference
    dst = tmp_path / "fv"
    assert _run(tiny_raw, dst, kill_at=_index_of(points, "copied")).returncode == -signal.SIGKILL
    partial = next(p for p in tmp_path.iterdir() if ".longcat-partial-" in p.name)
    shard = sorted((partial / "transformer").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = _run(tiny_raw, dst, "--resume", kill_at=10**9, trace=True)
    assert resumed.returncode == 0, resumed.stderr
    rewritten = {line.rsplit(" of ", 1)[1] for line in _crash_points(resumed) if ": tensor " in line}
    assert rewritten == {f"transformer/{shard.name}"}
    assert file_digests(dst) == file_digests(expected)


def test_resume_ignores_a_partial_of_another_plan(tiny_raw: Path, reference: tuple[Path, list[str]],
                                                  tmp_path: Path) -> None:
    expected, points = reference
    dst = tmp_path / "fv"
    other = _run(tiny_raw, dst, "--dtype", "bfloat16", kill_at=_index_of(points, "copied"))
    assert other.returncode == -signal.SIGKILL
    resumed = _run(tiny_raw, dst, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert file_digests(dst) == file_digests(expected)
    assert [p.name for p in tmp_path.iterdir()] == ["fv"]


# ---- --resume proves the source bytes, not their size and mtime ------------------------------------------------


def _rewrite_keeping_size_and_mtime(path: Path, offset: int, new: bytes) -> None:
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        assert handle.read(len(new)) != new
        handle.seek(offset)
        handle.write(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _change_tensor(path: Path, key: str) -> None:
    """Flip every bit of the first 8 bytes of one tensor's data (the header stays as it was)."""
    header = read_header(path)
    offset = header.absolute_range(header.tensors[key])[0]
    old = path.read_bytes()[offset:offset + 8]
    _rewrite_keeping_size_and_mtime(path, offset, bytes(b ^ 0xFF for b in old))


@pytest.mark.parametrize("victim, extra", [
    ("dit/diffusion_pytorch_model-00003-of-00006.safetensors", ()),
    ("dit/diffusion_pytorch_model-00003-of-00006.safetensors", ("--dtype", "bfloat16")),  # source hashed apart
    ("lora/refinement_lora.safetensors", ()),  # block-diagonal lora_B: built from several source tensors
])
def test_resume_redoes_what_a_changed_source_made(raw_copy: Path, tmp_path: Path, reference: tuple[Path, list[str]],
                                                  victim: str, extra: tuple[str, ...]) -> None:
    """Content changed after a crash, size and mtime put back: only the outputs made from the changed bytes
    (and the changed copy) are redone, and the result is what a fresh conversion of the new source gives."""
    out = tmp_path / "out"
    dst = out / "fv"
    points = reference[1]  # raw_copy is a copy of the reference's source
    if extra:
        traced = _run(raw_copy, tmp_path / "traced", *extra, kill_at=10**9, trace=True)
        assert traced.returncode == 0, traced.stderr
        points = _crash_points(traced)
    killed = _run(raw_copy, dst, *extra, kill_at=_index_of(points, "copied scheduler/"))
    assert killed.returncode == -signal.SIGKILL and not dst.exists()
    source_file = raw_copy / victim
    key = sorted(read_header(source_file).tensors, key=lambda k: ("up" not in k, k))[0]
    _change_tensor(source_file, key)
    config = raw_copy / "scheduler/scheduler_config.json"
    offset = config.read_bytes().index(b"1000")
    _rewrite_keeping_size_and_mtime(config, offset, b"1001")

    resumed = _run(raw_copy, dst, "--resume", *extra, kill_at=10**9, trace=True)
    assert resumed.returncode == 0, resumed.stderr
    convert(ConvertRequest(src=raw_copy, dst=tmp_path / "fresh", to="fastvideo", dtype=extra[1] if extra else "keep",
                           max_shard_size="300KB", quiet=True))
    assert file_digests(dst) == file_digests(tmp_path / "fresh")

    manifest = json.loads((dst / "conversion.json").read_text())
    made_from_victim = {r["file"] for r in manifest["tensors"]
                        if any(s["file"] == victim and s["key"] == key for s in r["sources"])}
    rewritten = {line.rsplit(" of ", 1)[1] for line in _crash_points(resumed) if ": tensor " in line}
    assert made_from_victim and rewritten == made_from_victim
    assert any("copying scheduler/scheduler_config.json" in line for line in _crash_points(resumed))
    assert [p.name for p in out.iterdir()] == ["fv"]
