"""`longcat-convert validate`: check a tree and say, with an exit code, whether it can be loaded as is."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..core import progress
from ..validation.render import render_summary
from ..validation.run import ValidateOptions, validate_tree
from .common import dtype_option, echo_json, json_option, quiet_option, report_option
from .report_file import check_report_path, write_report


@click.command("validate")
@click.argument("tree", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["raw", "fastvideo", "diffusers"]),
              help="Check the tree as this layout instead of detecting it.")
@click.option("--deep", is_flag=True, help="Also stream every tensor: NaN/Inf, all-zero tensors, and sha256 "
              "against conversion.json when the tree has one (reads all the data, in 16 MB chunks).")
@dtype_option(("float32", "bfloat16", "float16"), "Require every floating-point DiT and LoRA weight to have "
              "this dtype.")
@click.option("--allow-mixed-dtypes", is_flag=True, help="Report mixed dtypes within a component as warnings.")
@click.option("--follow-symlinks", is_flag=True,
              help="Accept symlinks that point outside the tree (e.g. a Hugging Face cache snapshot).")
@json_option("the report (schemas/validation-report.schema.json)")
@report_option("the report")
@click.option("--show", default=5, show_default=True, type=click.IntRange(min=1),
              help="Findings shown per component and kind in the summary.")
@quiet_option()
def validate_command(tree: Path, layout: str | None, deep: bool, dtype: str | None, allow_mixed_dtypes: bool,
                     follow_symlinks: bool, as_json: bool, report_path: Path | None, show: int, quiet: bool) -> None:
    """Check the checkpoint tree at TREE (raw, fastvideo or diffusers layout).

    Header-only by default (well under a second on the full 83 GB tree): configs against their schemas
    and cross-file rules, every safetensors header, indexes against shards (missing, stray, duplicate
    keys, total_size), the expected keys and shapes of the DiT from its config, dtypes, LoRA adapters
    (modules, ranks, alphas) and conversion.json. Pickle files are refused, never loaded.

    Exit codes: 0 valid, 1 findings (errors), 2 unreadable input or usage error.

    \b
    Examples:
      longcat-convert validate weights/LongCat-Video       # the published tree
      longcat-convert validate out/fv --dtype bfloat16     # bf16 DiT and LoRAs
      longcat-convert validate out/fv --deep --report v.json
      longcat-convert validate out/fv --json | jq .findings
    """
    report_target = check_report_path(report_path) if report_path is not None else None
    options = ValidateOptions(layout, deep, dtype, allow_mixed_dtypes, follow_symlinks)
    with progress.reporting(progress.wanted(quiet)):
        report = validate_tree(tree, options)
    if report_target is not None:
        write_report(report_target, report, report_path)
    if as_json:
        echo_json(report)
    else:
        click.echo(render_summary(report, show))
    sys.exit(0 if report["valid"] else 1)
