"""`convert --link`: byte-identical files reflinked or hardlinked when the file system can, copied otherwise, and
hashed into the manifest whichever way they were placed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from longcat_convert.core.io import source as source_module
from tests.helpers import run_cli

CARRIED = ("vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")


def _convert(src: Path, dst: Path, *args: str):
    return run_cli("convert", src, dst, "--to", "fastvideo", "-q", *args)


def _placed(dst: Path) -> dict[str, dict]:
    manifest = json.loads((dst / "conversion.json").read_text())
    return {entry["path"]: entry for entry in manifest["files"]}


def _check_hashes(dst: Path, placed: dict[str, dict]) -> None:
    for relative in CARRIED:
        assert placed[relative]["sha256"] == hashlib.sha256((dst / relative).read_bytes()).hexdigest()


def _unsupported(*_args) -> None:
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")


def test_hardlink_shares_the_inode_and_still_hashes(raw_copy: Path, tmp_path: Path) -> None:
    dst = tmp_path / "fv"
    assert _convert(raw_copy, dst, "--link", "hardlink").exit_code == 0
    placed = _placed(dst)
    for relative in CARRIED:
        assert placed[relative]["how"] == "hardlinked"
        assert os.stat(dst / relative).st_ino == os.stat(raw_copy / relative).st_ino
    _check_hashes(dst, placed)
    assert run_cli("validate", dst).exit_code == 0 and run_cli("validate", raw_copy).exit_code == 0


def test_hardlink_across_file_systems_falls_back_to_a_copy(raw_copy: Path, tmp_path: Path, monkeypatch) -> None:
    def cross_device(*_args, **_kwargs) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(source_module.os, "link", cross_device)
    dst = tmp_path / "fv"
    assert _convert(raw_copy, dst, "--link", "hardlink").exit_code == 0
    placed = _placed(dst)
    assert {placed[relative]["how"] for relative in CARRIED} == {"copied"}
    assert all(os.stat(dst / r).st_ino != os.stat(raw_copy / r).st_ino for r in CARRIED)
    _check_hashes(dst, placed)


def test_a_hardlink_to_another_file_than_the_one_read_is_refused(raw_copy: Path, tmp_path: Path, monkeypatch) -> None:
    impostor = tmp_path / "impostor"
    impostor.write_bytes(b"not the file that was read")
    real_link = os.link
    monkeypatch.setattr(source_module.os, "link", lambda _src, dst, **kw: real_link(impostor, dst, **kw))
    dst = tmp_path / "fv"
    result = _convert(raw_copy, dst, "--link", "hardlink")
    assert result.exit_code == 2 and "another file" in result.output
    assert not dst.exists()


def test_auto_copies_where_reflinks_are_unsupported(raw_copy: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(source_module.fcntl, "ioctl", _unsupported)
    dst = tmp_path / "fv"
    assert _convert(raw_copy, dst).exit_code == 0
    placed = _placed(dst)
    assert {placed[relative]["how"] for relative in CARRIED} == {"copied"}
    _check_hashes(dst, placed)


def test_auto_reflinks_where_the_file_system_clones(raw_copy: Path, tmp_path: Path, monkeypatch) -> None:
    """A stand-in FICLONE (copies the source descriptor's bytes) shows the reflinked path end to end."""
    calls = []

    def clone(target_fd: int, request: int, source_fd: int) -> int:
        assert request == source_module.FICLONE
        calls.append(source_fd)
        position = 0
        while data := os.pread(source_fd, 1 << 20, position):
            os.write(target_fd, data)
            position += len(data)
        return 0

    monkeypatch.setattr(source_module.fcntl, "ioctl", clone)
    dst = tmp_path / "fv"
    assert _convert(raw_copy, dst, "--link", "auto").exit_code == 0
    placed = _placed(dst)
    assert {placed[relative]["how"] for relative in CARRIED} == {"reflinked"} and calls
    _check_hashes(dst, placed)
    mode = os.stat(raw_copy / CARRIED[0]).st_mode
    assert os.stat(dst / CARRIED[0]).st_mode == mode


def test_copy_never_links(raw_copy: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(source_module.fcntl, "ioctl", lambda *_: pytest.fail("copy must not try a reflink"))
    monkeypatch.setattr(source_module.os, "link", lambda *_a, **_k: pytest.fail("copy must not hardlink"))
    dst = tmp_path / "fv"
    assert _convert(raw_copy, dst, "--link", "copy").exit_code == 0
    assert {_placed(dst)[relative]["how"] for relative in CARRIED} == {"copied"}


def test_a_source_file_changed_after_planning_is_caught_when_linking(raw_copy: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    target = raw_copy / "scheduler" / "scheduler_config.json"
    real_share = source_module.SourceFiles.share

    def edit_then_share(self, path, dst, method):
        if Path(path) == target:
            target.write_text(target.read_text().replace("12.0", "13.0"))
        return real_share(self, path, dst, method)

    monkeypatch.setattr(source_module.SourceFiles, "share", edit_then_share)
    dst = tmp_path / "fv"
    result = _convert(raw_copy, dst, "--link", "hardlink")
    assert result.exit_code == 2 and "changed" in result.output
    assert not dst.exists()
