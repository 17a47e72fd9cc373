"""Kill a conversion with SIGKILL at many exact points; nothing half-written may survive, and --resume
must finish the job byte-identically to an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from longcat_convert.validate import ValidateOptions, validate_tree

CONVERT = "from longcat_convert.cli import main; main()"


def _run(src: Path, dst: Path, *extra: str, kill_at: int | None = None, trace: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGCAT_CONVERT_")}
    if kill_at is not None:
        env["LONGCAT_CONVERT_KILL_AT"] = str(kill_at)
    if trace:
        env["LONGCAT_CONVERT_TRACE"] = "1"
    command = [sys.executable, "-c", CONVERT, "convert", str(src), str(dst), "--to", "fastvideo", "-q",
               "--max-shard-size", "300KB", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _checkpoints(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("checkpoint ")]


@pytest.fixture(scope="module")
def reference(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An uninterrupted run, traced: the output to compare with and the list of checkpoints."""
    dst = tmp_path_factory.mktemp("reference") / "fv"
    result = _run(tiny_raw, dst, kill_at=10**9, trace=True)
    assert result.returncode == 0, result.stderr
    return dst, _checkpoints(result)


def test_checkpoints_cover_every_phase(reference: tuple[Path, list[str]]) -> None:
    labels = " ".join(reference[1])
    for phase in ("planned", "tensor", "shard", "lora/", "copied", "configs written", "index written",
                  "LoRAs checked", "manifest written", "renamed into place"):
        assert phase in labels, phase


def test_sigkill_anywhere_leaves_nothing_half_written(tiny_raw: Path, reference: tuple[Path, list[str]],
                                                      tmp_path: Path) -> None:
    expected, points = reference
    source_before = _digests(tiny_raw)
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
            assert _digests(dst) == _digests(expected), point
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        assert _digests(tiny_raw) == source_before, point
        if point not in kill_points[::3]:
            continue
        rerun = _run(tiny_raw, dst, "--overwrite")
        assert rerun.returncode == 0, rerun.stderr
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}.")]
        assert leftovers == [], (point, leftovers)
        assert _digests(dst) == _digests(expected), point
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
    rewritten = [line for line in _checkpoints(resumed) if ": tensor " in line]
    assert rewritten == [], f"resume rewrote {len(rewritten)} tensors"
    assert _digests(dst) == _digests(expected)
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
    rewritten = {line.rsplit(" of ", 1)[1] for line in _checkpoints(resumed) if ": tensor " in line}
    assert rewritten == {f"transformer/{shard.name}"}
    assert _digests(dst) == _digests(expected)


def test_resume_ignores_a_partial_of_another_plan(tiny_raw: Path, reference: tuple[Path, list[str]],
                                                  tmp_path: Path) -> None:
    expected, points = reference
    dst = tmp_path / "fv"
    other = _run(tiny_raw, dst, "--dtype", "bfloat16", kill_at=_index_of(points, "copied"))
    assert other.returncode == -signal.SIGKILL
    resumed = _run(tiny_raw, dst, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _digests(dst) == _digests(expected)
    assert [p.name for p in tmp_path.iterdir()] == ["fv"]
