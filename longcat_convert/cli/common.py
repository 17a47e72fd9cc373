"""What the subcommands share, so one option has one name, metavar, choice order and meaning everywhere."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from ..core.dtypes import DTYPE_NAMES

DTYPE_ORDER = ("keep", *DTYPE_NAMES)  # every --dtype lists its choices in this order


def dtype_option(choices: tuple[str, ...], help: str, default: str | None = None) -> Callable:
    """`--dtype` with the command's own choices (not every command supports every dtype), in DTYPE_ORDER."""
    ordered = [name for name in DTYPE_ORDER if name in choices]
    return click.option("--dtype", type=click.Choice(ordered), default=default, show_default=default is not None,
                        help=help)


def quiet_option(also: str = "") -> Callable:
    """`-q/--quiet`: progress is shown on a terminal only, and -q turns it off there too."""
    return click.option("-q", "--quiet", is_flag=True,
                        help=" ".join(["No progress display on stderr (shown only on a terminal anyway).", also]))


def report_option(what: str) -> Callable:
    return click.option("--report", "report_path", metavar="PATH",
                        type=click.Path(path_type=Path), help=f"Also write {what} as JSON to PATH.")


def json_option(what: str) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON on stdout instead of text.")


def echo_json(document: dict) -> None:
    click.echo(json.dumps(document, indent=2))
