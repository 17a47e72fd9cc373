"""SRC as a hub repo id, resolved from a Hugging Face cache the test builds (no network)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from longcat_convert.hub import download_command, looks_like_repo_id, resolve_source
from tests.helpers import load_folder, make_hub_cache, run_cli


def test_repo_id_resolves_from_the_offline_cache(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(tiny_raw, cache, "meituan-longcat/LongCat-Video")
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
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert download_command("someone/not-cached", "weights/not-cached") in result.output
    assert not (tmp_path / "out").exists()


def test_download_hint_uses_the_installed_hub_command() -> None:
    installed = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points}
    hint = download_command("a/b", "weights/b")
    assert hint.split()[0] in installed  # hf on huggingface-hub >= 1.0, huggingface-cli before
    assert download_command("a/b", "w/b", {"hf", "huggingface-cli"}) == "hf download a/b --local-dir w/b"
    assert download_command("a/b", "w/b", {"huggingface-cli"}) == "huggingface-cli download a/b --local-dir w/b"
    assert "snapshot_download('a/b', local_dir='w/b')" in download_command("a/b", "w/b", set())


def test_anything_that_looks_like_a_path_is_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert looks_like_repo_id("meituan-longcat/LongCat-Video")
    (tmp_path / "weights").mkdir()
    for text in ("weights/LongCat-Video", "./weights/LongCat-Video", "/weights/LongCat-Video", "~/x/y", "../x/y"):
        assert not looks_like_repo_id(text), text
    assert resolve_source(Path("./weights/LongCat-Video")) == Path("weights/LongCat-Video")


@pytest.mark.parametrize(("src", "parent_exists"), [("weights/LongCat-Video", True),
                                                    ("./weights/LongCat-Video", False),
                                                    ("./weights/LongCat-Video", True)])
def test_a_missing_local_folder_is_not_looked_up_on_the_hub(src: str, parent_exists: bool, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if parent_exists:
        (tmp_path / "weights").mkdir()
    monkeypatch.setattr("huggingface_hub.snapshot_download", _no_hub)
    result = run_cli("convert", src, tmp_path / "out", "--to", "fastvideo")
    assert result.exit_code == 2 and "weights/LongCat-Video: does not exist" in result.output, result.output
    assert not (tmp_path / "out").exists()


def _no_hub(*args, **kwargs):
    raise AssertionError("a local path was looked up on the hub")
