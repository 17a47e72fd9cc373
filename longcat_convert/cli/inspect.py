"""`longcat-convert inspect`: what a tree holds, from headers only."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.dtypes import friendly
from ..core.text_format import human_bytes
from ..inspect_tree import describe_path
from .common import json_option


def _lines(summary: dict) -> list[str]:
    dit = summary["dit"]
    arch = dit["architecture"]
    lines = [f"{summary['path']}: {summary['layout']} layout",
             f"  components: {', '.join(summary['components'])}",
             f"  DiT ({dit['folder']}/, {dit['class']}): {dit['parameters']:,} parameters in {dit['tensors']} tensors, "
             f"{human_bytes(dit['bytes'])}, {dit['shards']} shard(s)" + (f" + {dit['index']}" if dit["index"] else ""),
             f"    hidden {arch['hidden_size']}, depth {arch['depth']}, heads {arch['heads']}, caption "
             f"{arch['caption_channels']}, adaLN {arch['adaln_tembed_dim']}, patch {arch['patch_size']}",
             "    dtypes: " + ", ".join(f"{friendly(d)} ×{n}" for d, n in dit["dtypes"].items())]
    for adapter in summary["adapters"]:
        alpha_key = "alpha_scale" if "alpha_scale" in adapter else "lora_alpha"
        ranks = ", ".join(f"rank {r} ×{n}" for r, n in adapter["ranks"].items())
        lines.append(f"  LoRA {adapter['name']} ({adapter['format']}, {adapter['file']}): {adapter['modules']} modules, "
                     f"{ranks}, {alpha_key} {adapter[alpha_key]}, {human_bytes(adapter['bytes'])}")
    if not summary["adapters"]:
        lines.append("  LoRA: none")
    if summary["model_index"]:
        lines.append(f"  model_index.json: {summary['model_index']}")
    return lines


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--layout", type=click.Choice(["raw", "fastvideo", "diffusers"]), help="Force a layout instead of detecting it.")
@json_option("the description")
def inspect_command(path: Path, layout: str | None, as_json: bool) -> None:
    """Describe the tree at PATH: layout, components, DiT size and dtypes, shards, LoRA adapters.

    Reads safetensors headers and configs only, so it takes a moment even on the 83 GB published tree.

    \b
    Examples:
      longcat-convert inspect weights/LongCat-Video
      longcat-convert inspect out/fv --json | jq .dit.dtypes
      longcat-convert inspect out/odd --layout diffusers     # skip detection
    """
    summary = describe_path(path, layout)
    click.echo(json.dumps(summary, indent=2) if as_json else "\n".join(_lines(summary)))
