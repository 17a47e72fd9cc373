"""`longcat-convert parity --original-src`: a checkout that cannot be used is a one-line error, exit 2.

Running the real upstream checkout is a documented command (README), not a test of ours.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_cli


@pytest.fixture
def clean_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The engine puts the checkout on sys.path and imports longcat_video; undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [name for name in sys.modules if name == "longcat_video" or name.startswith("longcat_video.")]:
        del sys.modules[name]


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ") and "Traceback" not in output
    return lines[0]


def test_missing_checkout_is_one_line(tmp_path: Path):
    missing = tmp_path / "nowhere"
    result = run_cli("parity", tmp_path / "raw", tmp_path / "fv", "--level", "task", "--original-src", missing)
    assert result.exit_code == 2
    line = _error_line(result.output)
    assert str(missing) in line and "does not exist" in line and "--original-src" in line


def test_folder_without_longcat_video_is_one_line(tmp_path: Path):
    checkout = tmp_path / "LongCat-Video"
    checkout.mkdir()
    (checkout / "README.md").write_text("not the code\n")
    result = run_cli("parity", tmp_path / "raw", tmp_path / "fv", "--level", "task", "--original-src", checkout)
    assert result.exit_code == 2
    line = _error_line(result.output)
    assert str(checkout) in line and "no longcat_video/" in line


def test_missing_dependency_names_the_package_and_the_fix(tiny_raw: Path, tmp_path: Path, clean_imports: None):
    checkout = tmp_path / "LongCat-Video"
    (checkout / "longcat_video" / "block_sparse_attention").mkdir(parents=True)
    (checkout / "longcat_video" / "__init__.py").write_text("")
    (checkout / "longcat_video" / "block_sparse_attention" / "__init__.py").write_text("")
    (checkout / "longcat_video" / "block_sparse_attention" / "bsa_interface.py").write_text(
        "import longcat_test_absent_dependency\n")
    (checkout / "longcat_video" / "pipeline_longcat_video.py").write_text("")
    result = run_cli("parity", tiny_raw, tmp_path / "fv", "--level", "task", "--tasks", "t2v",
                     "--original-src", checkout)
    assert result.exit_code == 2
    line = _error_line(result.output)
    assert "'longcat_test_absent_dependency'" in line
    assert f"pip install -r {checkout.resolve() / 'requirements.txt'}" in line


def test_original_src_needs_the_task_level(tmp_path: Path):
    result = run_cli("parity", tmp_path / "raw", tmp_path / "fv", "--level", "weights", "--original-src", tmp_path)
    assert result.exit_code == 2
    assert "--level task only" in _error_line(result.output)
