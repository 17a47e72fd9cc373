"""SRC as a hub repo id, resolved from a Hugging Face cache the test builds (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import load_folder, run_cli


def _make_cache(tiny_raw: Path, cache: Path, repo_id: str) -> Path:
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(tiny_raw, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_repo_id_resolves_from_the_offline_cache(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = _make_cache(tiny_raw, cache, "meituan-longcat/LongCat-Video")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = run_cli("convert", "meituan-longcat/LongCat-Video", tmp_path / "fv", "--to", "fastvideo", "-q")
    assert result.exit_code == 0, result.output
    assert len(load_folder(tmp_path / "fv" / "transformer")) == len(load_folder(snapshot / "dit")) + 12


def test_unknown_repo_id_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = run_cli("convert", "someone/not-cached", tmp_path / "out", "--to", "fastvideo")
    assert result.exit_code == 2 and "huggingface-cli download" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
