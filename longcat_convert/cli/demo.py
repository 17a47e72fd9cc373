"""`longcat-convert demo`: the whole tool on an embedded tiny checkpoint, in a minute or so on a CPU."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from ..core import progress
from ..demo_steps import Demo
from .common import quiet_option


@click.command("demo")
@click.argument("workdir", required=False, type=click.Path(path_type=Path))
@quiet_option()
def demo_command(workdir: Path | None, quiet: bool) -> None:
    """Build tiny trees, convert them both ways, validate and check parity; exit 0 only if all pass.

    WORKDIR keeps the trees for you to look at (default: a temporary folder, removed afterwards).

    \b
    Examples:
      longcat-convert demo                     # about a minute on 2 CPU cores
      longcat-convert demo /tmp/demo           # keep the trees
    """
    with progress.reporting(progress.wanted(quiet)):
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="longcat-demo-") as temporary:
                ok = _run(Path(temporary), kept=False)
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            ok = _run(workdir, kept=True)
    sys.exit(0 if ok else 1)


def _run(workdir: Path, kept: bool) -> bool:
    demo = Demo(workdir, click.echo, kept)
    ok = demo.run()
    click.echo("\n".join(demo.table()))
    return ok
