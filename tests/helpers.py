"""Small helpers for tests: load a folder's safetensors, run the CLI (in process, or as a process that a test
may kill at a crash point)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
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


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


CONVERT_CLI = "from longcat_convert.cli import main; main()"


def run_convert_process(src: Path, dst: Path, *extra: str, kill_at: int | None = None, trace: bool = False,
                        cli: str = CONVERT_CLI) -> subprocess.CompletedProcess:
    """`convert SRC DST --to fastvideo` with 300 KB shards in a fresh interpreter running `cli`; kill_at: SIGKILL
    itself at that crash point (longcat_convert.faults); trace: print every crash point to stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGCAT_CONVERT_")}
    if kill_at is not None:
        env["LONGCAT_CONVERT_KILL_AT"] = str(kill_at)
    if trace:
        env["LONGCAT_CONVERT_TRACE"] = "1"
    command = [sys.executable, "-c", cli, "convert", str(src), str(dst), "--to", "fastvideo", "-q",
               "--max-shard-size", "300KB", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
