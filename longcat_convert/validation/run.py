"""Validate a LongCat-Video checkpoint tree (raw, fastvideo or diffusers layout) and build the report.

Header-only by default: configs against their schemas and cross-file rules, every safetensors header,
indexes against shards, the expected key set and shapes from the config and the key map, dtypes, LoRA
adapters (plus their 0-d alpha values) and the conversion manifest. `deep=True` also streams every
tensor (NaN/Inf, all-zero, sha256 against the manifest). Tree-level refusals (not a tree, no layout,
symlink loops or escapes) raise LongcatError; everything else becomes a finding in the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..core import jsonschemas, keymap
from ..core.dtypes import POLICY_NAMES
from ..core.errors import LongcatError
from ..core.io import DirectFiles, FileReader
from ..core.layout_detect import avatar_variant_of_layout, check_root, detect_layout
from .adapters import check_lora_folder
from .avatar import check_avatar_tree, check_converted_avatar
from .configs import check_cross_rules, check_model_index, check_scheduler_config, check_tokenizer
from .context import Context, check_tree_safety, report_stray_pickles
from .findings import Findings
from .folders import check_dit, check_text_encoder, check_vae, drop_expectations
from .manifest import check_manifest_headers, load_manifest
from .weights import DtypeExpectations

REPORT_SCHEMA_VERSION = 1
SHARED_COMPONENTS = tuple(keymap.load_map_document()["shared_components"])


@dataclass(frozen=True)
class ValidateOptions:
    layout: str | None = None  # force a layout instead of detecting it
    deep: bool = False
    dtype: str | None = None  # float32 / bfloat16 / float16: every floating DiT and LoRA weight must have it
    allow_mixed_dtypes: bool = False
    follow_symlinks: bool = False  # accept symlinks pointing outside the tree


def refuse_if_invalid(report: dict, root: Path, fix: str, shown: int = 3) -> None:
    """Raise a one-line LongcatError naming the report's first errors (the rest are counted)."""
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    if not errors:
        return
    first, others = errors[0], errors[1:shown]
    message = first["message"] + "".join(f"; also {f['file'] + ': ' if f.get('file') else ''}{f['message']}"
                                         for f in others)
    if len(errors) > shown:
        message += f" ({len(errors) - shown} more errors)"
    raise LongcatError(message, root / first["file"] if first.get("file") else root, fix)


def validate_tree(root: str | Path, options: ValidateOptions = ValidateOptions(),
                  files: FileReader | None = None) -> dict:
    """The validation report (see schemas/validation-report.schema.json). files: what the headers and JSON
    files are read through (a conversion passes its held `SourceFiles`, so that it converts what was judged)."""
    started = time.perf_counter()
    root = Path(root)
    check_root(root)
    resolved = root.resolve()
    findings = Findings()
    ctx = Context(resolved, findings, dit_only=not any((resolved / name).exists() for name in SHARED_COMPONENTS),
                  files=files or DirectFiles())
    pickles = check_tree_safety(ctx, options.follow_symlinks)  # before any file is opened
    detected = detect_layout(resolved, options.layout)
    layout = keymap.layout(detected.name)
    family = keymap.layout_family(detected.name)
    variant = avatar_variant_of_layout(detected.name, resolved)
    if family == keymap.AVATAR_FAMILY and layout["model_index"] is None:
        return _validate_raw_avatar(ctx, variant, detected, options, pickles, started)
    manifest = load_manifest(ctx)
    policy = DtypeExpectations(POLICY_NAMES[options.dtype] if options.dtype else None, options.allow_mixed_dtypes,
                               manifest.dtypes_by_file() if manifest else {})

    _check_model_index(ctx, layout)
    dit = check_dit(ctx, layout, policy, family=family)
    check_lora_folder(ctx, layout, dit.expanded, policy)
    if family == keymap.AVATAR_FAMILY:
        check_converted_avatar(ctx, variant, dit.config, dit.config_rel, policy)
        for folder in keymap.extra_dit_folders(variant, detected.name):
            if (resolved / folder).is_dir():
                check_dit(ctx, {**layout, "dit_dir": folder}, policy, component=folder, family=family)
    if ctx.dit_only:
        folders = ", ".join(f"{name}/" for name in SHARED_COMPONENTS)
        findings.warning("tree", "missing_component", f"a DiT-only tree (no {folders}): the DiT and its LoRAs can be "
                         "loaded and converted; the pipeline needs those folders too")
    else:
        _check_shared_components(ctx, options, policy, detected.name, dit)
    if manifest is not None:
        check_manifest_headers(ctx, manifest, detected.name)
    report_stray_pickles(ctx, pickles)
    deep = _deep_scan(ctx, manifest, dit) if options.deep else None

    layout_facts = {"name": detected.name, "reason": detected.reason, "forced": detected.forced}
    return _report(ctx, options, layout_facts, manifest.to_json(ctx) if manifest else None, deep, started)


def _report(ctx: Context, options: ValidateOptions, layout: dict, manifest: dict | None, deep,
            started: float) -> dict:
    findings = ctx.findings
    report = {
        "report": "longcat-convert validation",
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool_version": __version__,
        "root": str(ctx.root),
        "layout": layout,
        "deep": options.deep,
        "valid": not findings.has_errors,
        "counts": {severity: findings.count(severity) for severity in ("error", "warning", "info")},
        "components": ctx.components,
        "manifest": manifest,
        "deep_scan": deep.to_json() if deep else None,
        "findings": [finding.to_json() for finding in findings.items],
        "elapsed_seconds": round(time.perf_counter() - started, 4),
    }
    return jsonschemas.checked_report("validation-report", report)


def _validate_raw_avatar(ctx: Context, variant: str | None, detected, options: ValidateOptions,
                         pickles: list[str], started: float) -> dict:
    """A LongCat-Video-Avatar tree as published (several DiT folders, the base tree beside it)."""
    if variant is None:
        raise LongcatError(f"the {detected.name} layout names no avatar version", ctx.root)
    ctx.dit_only = False
    policy = DtypeExpectations(POLICY_NAMES[options.dtype] if options.dtype else None, options.allow_mixed_dtypes)
    check_avatar_tree(ctx, variant, policy, options.follow_symlinks, options.deep)
    report_stray_pickles(ctx, pickles)
    deep = _deep_scan(ctx, None, None) if options.deep else None
    return _report(ctx, options, {"name": detected.name, "reason": detected.reason, "forced": detected.forced},
                   None, deep, started)


def _check_shared_components(ctx: Context, options: ValidateOptions, policy: DtypeExpectations, layout_name: str,
                             dit) -> None:
    """text_encoder/, tokenizer/, vae/ and scheduler/, and the rules tying their configs to the DiT's."""
    copied = DtypeExpectations(None, options.allow_mixed_dtypes, policy.recorded)  # conversion copies these as they are
    text_encoder = check_text_encoder(ctx, copied)
    tokenizer = ctx.root / "tokenizer"
    if tokenizer.is_dir():
        check_tokenizer(ctx, tokenizer, options.deep)
    else:
        ctx.findings.error("tokenizer", "missing_component", "folder is missing", "tokenizer/")
    vae = check_vae(ctx, copied)
    check_scheduler_config(ctx, ctx.root / "scheduler" / "scheduler_config.json", layout_name)
    check_cross_rules(ctx, (dit.config, dit.config_rel) if dit.config else None,
                      (text_encoder, "text_encoder/config.json") if text_encoder else None,
                      (vae, "vae/config.json") if vae else None)


def _deep_scan(ctx: Context, manifest, dit):
    from .deep import deep_scan

    return deep_scan(ctx, manifest, drop_expectations(ctx, dit) if dit is not None else {})


def _check_model_index(ctx: Context, layout: dict) -> None:
    path = ctx.root / "model_index.json"
    if layout["model_index"] is not None:
        check_model_index(ctx, path, layout["model_index"])
    elif path.exists():
        ctx.findings.info("model_index", "model_index", "the raw layout has no model_index.json; this one is "
                          "ignored", "model_index.json")
