"""Every command line of README's Usage section, run as written (with /tmp/ moved into a fresh folder) by the
installed `longcat-convert`, in order, on the tiny trees the lines themselves make."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import make_hub_cache

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_REPO = "meituan-longcat/LongCat-Video"


def usage_lines() -> list[str]:
    """The indented `longcat-convert ...` lines between '## Usage' and the next heading."""
    section = README.read_text(encoding="utf-8").split("\n## Usage\n", 1)[1]
    section = re.split(r"\n#+ ", section, maxsplit=1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    longcat-convert ")]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "longcat-convert"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from longcat_convert.cli import main; main()"]


def test_every_usage_line_runs_as_written(tmp_path: Path) -> None:
    lines = usage_lines()
    assert len(lines) >= 14 and any(HUB_REPO in line for line in lines)
    # a hub repo id resolves offline from a cache holding the tiny tree the first line makes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    timings = []
    for line in lines:
        argv = shlex.split(line.replace("/tmp/", f"{tmp_path}/"), comments=True)
        assert argv[0] == "longcat-convert", line
        if HUB_REPO in argv and not (tmp_path / "hub").exists():
            make_hub_cache(tmp_path / "raw", tmp_path / "hub", HUB_REPO)
        started = time.perf_counter()
        done = subprocess.run(_command() + argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        timings.append(f"{time.perf_counter() - started:6.1f} s  {line}")
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        if argv[1] == "demo":
            _check_demo_table(done.stdout)
    print("\n".join(["README Usage lines:", *timings]))


DEMO_STEPS = 26 + 11  # base LongCat-Video rows, LongCat-Video-Avatar 1.5 rows (tiny, validate, convert, parity, INT8)


def _check_demo_table(output: str) -> None:
    rows = [line for line in output.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(rows) == DEMO_STEPS and all(row.startswith("PASS") for row in rows), output
    assert len({row.index(" s  ") for row in rows}) == 1, "the table's columns do not line up"
    summary = output.strip().splitlines()[-1]
    assert summary.startswith(f"demo: {DEMO_STEPS}/{DEMO_STEPS} steps passed") and "removed on exit" in summary, summary


def diffusers_snippet() -> list[str]:
    """The indented block of README's 'Use with diffusers' section (a shell command and a Python heredoc)."""
    section = README.read_text(encoding="utf-8").split("\n## Use with diffusers\n", 1)[1]
    section = re.split(r"\n#+ ", section, maxsplit=1)[0]
    block = section.split("\n\n")[1]
    return [line[4:] for line in block.splitlines() if line.startswith("    ")]


def test_the_diffusers_snippet_runs_as_written(tmp_path: Path) -> None:
    lines = diffusers_snippet()
    assert 3 <= len(lines) <= 10 and lines[-1] == "EOF", lines
    script = "\n".join(lines).replace("/tmp/", f"{tmp_path}/") + "\n"
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert re.search(r"^\(1, 9, 64, 64, 3\) float32 0\.\d+$", done.stdout, re.MULTILINE), done.stdout
