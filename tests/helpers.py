"""Small helpers for tests: load a folder's safetensors, run the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file

from longcat_convert.cli import _register, main_group


def load_folder(folder: Path, pattern: str = "*.safetensors") -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob(pattern)):
        loaded = load_file(path)
        assert not set(loaded) & set(state), f"duplicate keys in {folder}"
        state.update(loaded)
    return state


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


def run_cli(*args: str) -> Result:
    _register()
    return CliRunner().invoke(main_group, [str(a) for a in args], catch_exceptions=False)


def make_hub_cache(tree: Path, cache: Path, repo_id: str) -> Path:
    """A Hugging Face cache (HF_HUB_CACHE) holding `tree` as the snapshot of `repo_id`, for offline tests."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(tree, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
