"""The `longcat-convert` command line. Each subcommand lives in its own module and is registered here."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import LongcatError


class _Group(click.Group):
    """Turns LongcatError into a one-line message and exit 2 (never a traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LongcatError as exc:
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # disk full, permissions, vanished files: still one line, never a traceback
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was left at the destination", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="longcat-convert")
def main_group() -> None:
    """Convert, validate and run LongCat-Video checkpoints.

    \b
    Layouts:
      raw        the tree as Meituan publishes it (dit/ vae/ text_encoder/ tokenizer/ scheduler/ lora/)
      fastvideo  what FastVideo's LongCatTransformer3DModel loads (split q/k/v, transformer/, lora/<name>/)
      diffusers  upstream key names under transformer/ with a diffusers model_index.json

    \b
    Typical session:
      longcat-convert tiny /tmp/raw                       # a small raw tree to try things on
      longcat-convert inspect /tmp/raw                    # what is in it
      longcat-convert convert /tmp/raw /tmp/fv --to fastvideo
      longcat-convert validate /tmp/fv                    # schema + key report, exit 0/1/2
    """


def _register() -> None:
    from .cli_convert import convert_command
    from .cli_demo import demo_command
    from .cli_inspect import inspect_command
    from .cli_parity import parity_command
    from .cli_run import run_command
    from .cli_tiny import tiny_command
    from .cli_validate import validate_command

    for command in (tiny_command, inspect_command, convert_command, demo_command, validate_command,
                    parity_command, run_command):
        main_group.add_command(command)


def main() -> None:
    _register()
    main_group(prog_name="longcat-convert")
