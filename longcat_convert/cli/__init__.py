"""The `longcat-convert` command line. Each subcommand lives in its own module and is registered here."""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..core.errors import LongcatError

# name -> (module, attribute, one-line help). Modules are imported only when their command runs, so a
# header-only command does not pay for torch, transformers or diffusers.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "tiny": ("tiny", "tiny_command", "Write a complete raw LongCat-Video tree at DST, tiny but shaped like the published one."),
    "inspect": ("inspect", "inspect_command", "Describe a tree: layout, components, DiT size and dtypes, shards, LoRAs."),
    "convert": ("convert", "convert_command", "Convert a tree into another layout (streaming, verified, atomic)."),
    "validate": ("validate", "validate_command", "Check a tree against the schemas and the key map; exit 0/1/2."),
    "parity": ("parity", "parity_command", "Compare a converted tree with its source: weights, forward or tasks."),
    "run": ("run_task", "run_command", "Run a LongCat task (t2v, i2v, vc, refine, long) from a tree of any layout."),
    "demo": ("demo", "demo_command", "Tiny trees -> convert -> validate -> parity at every level; one table."),
}


class _Group(click.Group):
    """Loads subcommands on demand and turns LongcatError into one line and exit 2 (never a traceback)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS) + [name for name in super().list_commands(ctx) if name not in COMMANDS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            module, attribute, _ = COMMANDS[name]
            self.add_command(getattr(importlib.import_module(f"{__package__}.{module}"), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])

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
      raw        the tree as Meituan publishes it: dit/ vae/ text_encoder/
                 tokenizer/ scheduler/ lora/
      fastvideo  what FastVideo's LongCatTransformer3DModel loads: split
                 q/k/v, transformer/, lora/<name>/
      diffusers  upstream key names under transformer/, a diffusers
                 model_index.json

    \b
    Typical session:
      longcat-convert tiny /tmp/raw           # a small raw tree to try on
      longcat-convert inspect /tmp/raw        # what is in it
      longcat-convert convert /tmp/raw /tmp/fv --to fastvideo
      longcat-convert validate /tmp/fv        # schemas + keys, exit 0/1/2

    \b
    Examples:
      longcat-convert demo                    # everything, on tiny trees
      longcat-convert run --help              # run any LongCat task
    """


def _register() -> None:
    """Import every subcommand now (tests use this to drive the group in-process)."""
    for name in COMMANDS:
        main_group.get_command(click.Context(main_group), name)


def main() -> None:
    main_group(prog_name="longcat-convert")
