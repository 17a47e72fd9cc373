"""`longcat-convert demo`: the whole tool on an embedded tiny checkpoint, in a few minutes on a CPU."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from .demo import Demo


@click.command("demo")
@click.argument("workdir", required=False, type=click.Path(path_type=Path))
def demo_command(workdir: Path | None) -> None:
    """Build tiny trees, convert them both ways, validate and check parity; exit 0 only if all pass.

    WORKDIR keeps the trees for you to look at (default: a temporary folder, removed afterwards).
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="longcat-demo-") as temporary:
            ok = _run(Path(temporary))
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        ok = _run(workdir)
    sys.exit(0 if ok else 1)


def _run(workdir: Path) -> bool:
    demo = Demo(workdir, click.echo)
    ok = demo.run()
    click.echo("\n".join(demo.table()))
    return ok
