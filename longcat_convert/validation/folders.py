"""One check per component folder: its config, its weight files, and the keys its config implies."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core import keymap
from ..core.errors import LongcatError
from ..core.jsonschemas import schema_findings
from ..core.shard_folder import FolderRules, ShardFolder
from .configs import check_dit_config, check_text_encoder_config, check_vae_config, dit_schema_name
from .context import Context, read_json_quietly
from .weights import DtypeExpectations, check_dtypes, compare_keys, scan_weight_folder, weights_summary

TEXT_ENCODER_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")
TEXT_ENCODER_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")


@dataclass
class DitResult:
    config: dict | None
    config_rel: str
    expanded: keymap.ExpandedMap | None
    weights: ShardFolder | None


def component_folder(ctx: Context, component: str, name: str) -> Path | None:
    folder = ctx.root / name
    if folder.is_dir():
        return folder
    what = "is a file, not a folder" if folder.exists() else "folder is missing"
    ctx.findings.error(component, "missing_component", what, f"{name}/")
    return None


def check_dit(ctx: Context, layout: dict, policy: DtypeExpectations, component: str = "dit",
              family: str = keymap.BASE_FAMILY) -> DitResult:
    """component: the report's name for this DiT (an avatar tree has several DiT folders)."""
    folder = component_folder(ctx, component, layout["dit_dir"])
    config_rel = f"{layout['dit_dir']}/config.json"
    if folder is None:
        return DitResult(None, config_rel, None, None)
    naming = layout["naming"]
    config = check_dit_config(ctx, component, folder / "config.json", naming, family)
    weights = scan_weight_folder(ctx, component, folder, FolderRules.dit(naming))
    if config is None and family == keymap.BASE_FAMILY:
        _check_other_naming(ctx, folder / "config.json", naming, config_rel)
    expanded = _expand(ctx, config, naming, config_rel, weights, component)
    facts = ctx.components.setdefault(component, {})
    facts.update(weights_summary(ctx, weights), naming=naming)
    if expanded is not None:
        expected = expanded.expected_shapes(naming)
        other = "fastvideo" if naming == "upstream" else "upstream"
        droppable = set(expanded.drops) if naming == "upstream" else set()
        compare_keys(ctx, component, weights, expected, droppable=droppable,
                     other_naming=(other, set(expanded.expected_shapes(other))), config_rel=config_rel)
        facts.update(expected_tensors=len(expected), expected_parameters=expanded.num_params)
    check_dtypes(ctx, component, folder, weights.located, policy)
    return DitResult(config, config_rel, expanded, weights)


def _check_other_naming(ctx: Context, path: Path, naming: str, config_rel: str) -> None:
    """A config that is fine in the other naming means the tree is in the other layout (or half-converted)."""
    other = "fastvideo" if naming == "upstream" else "upstream"
    config = read_json_quietly(path)
    if config is not None and not schema_findings(dit_schema_name(other), config):
        ctx.findings.error("dit", "wrong_naming", f"is a DiT config in the {other} naming ({config['_class_name']}, "
                           f"{keymap.heads_field(other)}): the tree is not in this layout (pass the right --layout, "
                           "or convert it)", config_rel)


def _expand(ctx: Context, config: dict | None, naming: str, config_rel: str,
            weights: ShardFolder, component: str = "dit") -> keymap.ExpandedMap | None:
    if config is None:
        ctx.findings.info(component, "config_field", "the key report is skipped: the DiT config cannot describe the "
                          "expected keys", config_rel)
        return None
    try:
        held = [info for _, info in weights.located.values()]
        keymap.check_fits(config, naming, config_rel, len(held), sum(info.numel for info in held))
        return keymap.expand(config, naming, config_rel)
    except LongcatError as exc:
        ctx.findings.error(component, "config_rule", exc.message, config_rel)
        return None


def drop_expectations(ctx: Context, result: DitResult) -> dict[tuple[str, str], str]:
    """(file, key) -> 'ones' or 'zeros' for the droppable norm keys present, checked by --deep."""
    if result.expanded is None or result.weights is None:
        return {}
    table = {}
    for key, (name, _) in result.weights.located.items():
        rule = result.expanded.drops.get(key)
        if rule is not None:
            table[(ctx.rel(result.weights.folder / name), key)] = rule.require
    return table


def check_text_encoder(ctx: Context, policy: DtypeExpectations) -> dict | None:
    return _check_component(ctx, policy, "text_encoder", "model", check_text_encoder_config, _check_text_encoder_keys)


def _check_component(ctx: Context, policy: DtypeExpectations, name: str, prefix: str,
                     check_config: Callable[[Context, Path], dict | None],
                     check_keys: Callable[[Context, ShardFolder, dict], None]) -> dict | None:
    """A component folder `name`/: its config, its weight files (`prefix` shards), the keys its config fixes,
    the summary and the dtypes. Returns the config (None if absent or unusable)."""
    folder = component_folder(ctx, name, name)
    if folder is None:
        return None
    config = check_config(ctx, folder / "config.json")
    weights = scan_weight_folder(ctx, name, folder, FolderRules(prefix, names_matter=True))
    ctx.components.setdefault(name, {}).update(weights_summary(ctx, weights))
    if config is not None and weights.located:
        check_keys(ctx, weights, config)
    check_dtypes(ctx, name, folder, weights.located, policy)
    return config


def _check_text_encoder_keys(ctx: Context, weights: ShardFolder, config: dict) -> None:
    rel = ctx.rel(weights.folder)
    embedding = next((k for k in TEXT_ENCODER_EMBEDDINGS if k in weights.located), None)
    expected = (config["vocab_size"], config["d_model"])
    if embedding is None:
        ctx.findings.error("text_encoder", "missing_key", f"neither {' nor '.join(TEXT_ENCODER_EMBEDDINGS)} is "
                           "present (the token embedding)", rel)
    elif weights.located[embedding][1].shape != expected:
        name, info = weights.located[embedding]
        ctx.findings.error("text_encoder", "shape_mismatch", f"{embedding} has shape {list(info.shape)}, expected "
                           f"[vocab_size, d_model] = {list(expected)}", ctx.rel(weights.folder / name), embedding)
    blocks = {int(m.group(1)) for key in weights.located if (m := TEXT_ENCODER_BLOCK.match(key))}
    layers = config["num_layers"]  # compared without building range(num_layers): it may be absurdly large
    if len(blocks) != layers or (blocks and (min(blocks) != 0 or max(blocks) != layers - 1)):
        ctx.findings.error("text_encoder", "missing_key" if len(blocks) < config["num_layers"] else "unexpected_key",
                           f"holds encoder blocks {_ranges(blocks)}, but num_layers is {config['num_layers']}", rel)


def check_vae(ctx: Context, policy: DtypeExpectations) -> dict | None:
    return _check_component(ctx, policy, "vae", "diffusion_pytorch_model", check_vae_config, _check_vae_keys)


def _check_vae_keys(ctx: Context, weights: ShardFolder, config: dict) -> None:
    z = config["z_dim"]
    compare_subset(ctx, "vae", weights, {"quant_conv.weight": (2 * z, 2 * z, 1, 1, 1), "quant_conv.bias": (2 * z,),
                                         "post_quant_conv.weight": (z, z, 1, 1, 1), "post_quant_conv.bias": (z,)},
                   "vae/config.json z_dim")


def compare_subset(ctx: Context, component: str, weights: ShardFolder, expected: dict[str, tuple[int, ...]],
                   source: str) -> None:
    """Check a few keys whose shapes a config fixes (components without a full key map)."""
    for key, shape in expected.items():
        if key not in weights.located:
            ctx.findings.error(component, "missing_key", f"{key} {list(shape)} is missing",
                               ctx.rel(weights.folder), key)
        elif weights.located[key][1].shape != shape:
            name, info = weights.located[key]
            ctx.findings.error(component, "shape_mismatch", f"{key} has shape {list(info.shape)}, expected "
                               f"{list(shape)} from {source}", ctx.rel(weights.folder / name), key)


def _ranges(values: set[int]) -> str:
    if not values:
        return "none"
    ordered, spans, start = sorted(values), [], None
    for index, value in enumerate(ordered):
        if start is None:
            start = value
        if index + 1 == len(ordered) or ordered[index + 1] != value + 1:
            spans.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(spans)
