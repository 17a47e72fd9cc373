"""Disk full and permission errors end with one line and exit 2, and leave the destination as it was."""

from __future__ import annotations

import builtins
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_cli


def _mount_tmpfs(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return result.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True)


def _one_line_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 1 MB tmpfs (a real ENOSPC); skipped where this process may not mount."""
    mount = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mount, "size=1m"):
        pytest.skip("cannot mount a tmpfs here; the injected ENOSPC test covers the code path")
    yield mount
    _umount(mount)


def test_disk_full_on_a_real_small_filesystem(tiny_raw: Path, small_filesystem: Path) -> None:
    result = run_cli("convert", tiny_raw, small_filesystem / "fv", "--to", "fastvideo", "-q")
    assert result.exit_code == 2
    assert "no space left" in _one_line_error(result.output)
    assert list(small_filesystem.iterdir()) == []


def test_disk_full_injected(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longcat_convert import execute

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "fv"))

    monkeypatch.setattr(execute, "_copy_file", full)
    result = run_cli("convert", tiny_raw, tmp_path / "fv", "--to", "fastvideo", "-q")
    assert result.exit_code == 2 and "no space left" in _one_line_error(result.output)
    assert list(tmp_path.iterdir()) == []


def test_read_only_destination_parent(tiny_raw: Path, tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    if os.geteuid() != 0 or not _mount_tmpfs(parent, "size=8m,ro"):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        result = run_cli("convert", tiny_raw, parent / "fv", "--to", "fastvideo", "-q")
        assert result.exit_code == 2
        line = _one_line_error(result.output)
        assert "writable" in line or "read-only" in line.lower() or "permission" in line.lower()
        assert list(parent.iterdir()) == []
    finally:
        _umount(parent)


def test_unwritable_destination_injected(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdir = Path.mkdir

    def refuse(self: Path, *args, **kwargs):
        if ".longcat-partial-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    result = run_cli("convert", tiny_raw, tmp_path / "fv", "--to", "fastvideo", "-q")
    assert result.exit_code == 2 and "writable" in _one_line_error(result.output)
    assert not (tmp_path / "fv").exists()


def test_unreadable_source_shard(raw_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """root ignores file modes, so the refusal is injected where the file is opened."""
    victim = sorted((raw_copy / "dit").glob("*-00002-of-*.safetensors"))[0]
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, *args, **kwargs):
        if str(file) == str(victim):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def guarded_os_open(path, *args, **kwargs):
        if str(path) == str(victim):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo", "-q")
    assert result.exit_code == 2
    line = _one_line_error(result.output)
    assert victim.name in line and "permission denied" in line.lower()
    assert not (tmp_path / "fv").exists()
