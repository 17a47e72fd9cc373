"""Component configs: schema checks, rules a schema cannot express, runtime flags reported apart."""

from __future__ import annotations

from pathlib import Path

from ..core import keymap
from ..core.jsonschemas import SchemaProblem, load_schema, schema_findings
from ..core.layout_detect import FASTVIDEO_PIPELINE_CLASSES
from .context import Context, read_json_reporting

RUNTIME_FIELDS = ("enable_flashattn3", "enable_flashattn2", "enable_xformers", "enable_bsa", "bsa_params", "cp_split_hw")
META_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path")
HEAD_FIELDS = ("num_heads", "num_attention_heads")
AVATAR_FIELDS = ("audio_window", "audio_block", "audio_channel", "intermediate_dim", "output_dim", "context_tokens",
                 "vae_scale", "audio_prenorm", "class_range", "class_interval")
BSA_HEAD_DIMS = (16, 32, 64, 128, 256)
# The pipeline hard-codes these VAE compression factors.
VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR = 8, 4
PUBLISHED_SHIFT = 12.0


AVATAR_NON_CONSTRUCTOR_FIELDS = ("architectures", "model_max_length")


def dit_schema_name(naming: str, family: str = keymap.BASE_FAMILY) -> str:
    base = "dit-config" if naming == "upstream" else "fastvideo-transformer-config"
    return f"avatar-{base}" if family == keymap.AVATAR_FAMILY else base


def _read_checked(ctx: Context, component: str, path: Path, schema: str,
                  runtime_fields: tuple[str, ...] = ()) -> tuple[dict, list[SchemaProblem]] | None:
    """Read a JSON config and report its schema problems as findings; None when it cannot be read."""
    document = read_json_reporting(ctx, component, path)
    if document is None:
        return None
    problems = schema_findings(schema, document)
    for problem in problems:
        kind = "runtime_flag" if problem.field in runtime_fields else "config_field"
        ctx.findings.error(component, kind, problem.text, ctx.rel(path))
    return document, problems


def check_dit_config(ctx: Context, component: str, path: Path, naming: str,
                     family: str = keymap.BASE_FAMILY) -> dict | None:
    """The DiT config if its architecture fields can drive the key map; findings otherwise."""
    checked = _read_checked(ctx, component, path, dit_schema_name(naming, family), RUNTIME_FIELDS)
    if checked is None:
        return None
    config, problems = checked
    rel = ctx.rel(path)
    _check_heads_fields(ctx, component, rel, config, naming)
    _check_unknown_dit_fields(ctx, component, rel, config, naming, family)
    architecture_ok = all(p.field in RUNTIME_FIELDS for p in problems)
    rules_ok = architecture_ok and _check_architecture_rules(ctx, component, rel, config, naming)
    _check_runtime_flags(ctx, component, rel, config, naming, rules_ok)
    ctx.components.setdefault(component, {})["config"] = _config_summary(config, naming, rules_ok)
    return config if rules_ok else None


def _check_heads_fields(ctx: Context, component: str, rel: str, config: dict, naming: str) -> None:
    wanted = keymap.heads_field(naming)
    other = next(f for f in HEAD_FIELDS if f != wanted)
    if other not in config:
        return
    if wanted in config and config[wanted] != config[other]:
        ctx.findings.error(component, "config_rule", f"{wanted} is {config[wanted]!r} but {other} is "
                           f"{config[other]!r}; this layout reads {wanted}", rel)
    elif wanted not in config:
        ctx.findings.info(component, "config_field", f"{other} is the field name of the other naming; this "
                          f"layout reads {wanted}", rel)


def _check_unknown_dit_fields(ctx: Context, component: str, rel: str, config: dict, naming: str,
                              family: str = keymap.BASE_FAMILY) -> None:
    known = set(load_schema(dit_schema_name(naming, family))["properties"]) | set(HEAD_FIELDS) | set(META_FIELDS)
    if family == keymap.AVATAR_FAMILY:
        tolerated = [f for f in AVATAR_NON_CONSTRUCTOR_FIELDS if f in config]
        if tolerated:
            ctx.findings.info(component, "config_field", f"{', '.join(tolerated)}: not constructor arguments (as "
                              "published; diffusers ignores them, upstream's INT8 loader drops them)", rel)
        for name in config:
            if name not in known:
                ctx.findings.warning(component, "unknown_field", f"field {name!r} is not a field of the avatar "
                                     "DiT; loaders ignore it", rel)
        return
    avatar = [f for f in config if f in AVATAR_FIELDS]
    if avatar:
        ctx.findings.warning(component, "unknown_field", f"has LongCat-Video-Avatar fields ({', '.join(avatar)}); "
                             "only the base DiT's keys are checked", rel)
    for name in config:
        if name not in known and name not in AVATAR_FIELDS:
            ctx.findings.warning(component, "unknown_field", f"field {name!r} is not a field of the DiT; "
                                 "loaders ignore it", rel)


def _check_architecture_rules(ctx: Context, component: str, rel: str, config: dict, naming: str) -> bool:
    heads_name = keymap.heads_field(naming)
    hidden, heads, patch = config["hidden_size"], config[heads_name], config["patch_size"]
    ok = True
    if hidden % heads:
        ctx.findings.error(component, "config_rule", f"hidden_size {hidden} is not divisible by {heads_name} "
                           f"{heads}", rel)
        ok = False
    elif (hidden // heads) % 8:
        ctx.findings.error(component, "config_rule", f"head_dim {hidden // heads} (hidden_size / {heads_name}) "
                           "is not a multiple of 8", rel)
    if patch[0] != 1:
        ctx.findings.error(component, "config_rule", f"patch_size[0] is {patch[0]}; the model patches only "
                           "spatially (it must be 1)", rel)
    if config["in_channels"] != config["out_channels"]:
        ctx.findings.warning(component, "config_rule", f"in_channels {config['in_channels']} != out_channels "
                             f"{config['out_channels']}; the pipeline feeds the output back as input", rel)
    return ok


def _check_runtime_flags(ctx: Context, component: str, rel: str, config: dict, naming: str, rules_ok: bool) -> None:
    if "cp_split_hw" in config and config["cp_split_hw"] is None:
        ctx.findings.info(component, "runtime_flag", "cp_split_hw is null (as published); the upstream model "
                          "needs it set at run time (the demos pass [1, 1])", rel)
    if config.get("enable_bsa") is True and not isinstance(config.get("bsa_params"), dict):
        ctx.findings.error(component, "runtime_flag", "enable_bsa is true but bsa_params is not set", rel)
    if rules_ok and isinstance(config.get("bsa_params"), dict):
        head_dim = config["hidden_size"] // config[keymap.heads_field(naming)]
        if head_dim not in BSA_HEAD_DIMS:
            ctx.findings.warning(component, "runtime_flag", f"head_dim {head_dim} is not one the block-sparse "
                                 f"attention kernel supports {BSA_HEAD_DIMS}; enabling BSA would fail", rel)


def _config_summary(config: dict, naming: str, rules_ok: bool) -> dict:
    architecture = {k: v for k, v in config.items() if k not in RUNTIME_FIELDS and k not in META_FIELDS}
    runtime = {k: config[k] for k in RUNTIME_FIELDS if k in config}
    summary: dict = {"class_name": config.get("_class_name"), "architecture": architecture, "runtime": runtime}
    if rules_ok:
        hidden = config["hidden_size"]
        summary["derived"] = {"head_dim": hidden // config[keymap.heads_field(naming)],
                              "ffn_hidden_size": keymap.ffn_hidden_size(hidden, config["mlp_ratio"])}
    return summary


def check_scheduler_config(ctx: Context, path: Path, layout_name: str) -> dict | None:
    checked = _read_checked(ctx, "scheduler", path, "scheduler-config")
    if checked is None:
        return None
    config, problems = checked
    rel = ctx.rel(path)
    known = set(load_schema("scheduler-config")["properties"]) | set(META_FIELDS)
    for name in config:
        if name not in known:
            if layout_name == "fastvideo":
                ctx.findings.error("scheduler", "unknown_field", f"field {name!r} is not a scheduler argument; "
                                   "FastVideo passes every field to the constructor (TypeError)", rel)
            else:
                ctx.findings.warning("scheduler", "unknown_field", f"field {name!r} is not a scheduler argument; "
                                     "diffusers ignores it", rel)
    shift = config.get("shift")
    if isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift != PUBLISHED_SHIFT:
        ctx.findings.info("scheduler", "config_field", f"shift is {shift}; the published LongCat-Video "
                          f"scheduler uses {PUBLISHED_SHIFT}", rel)
    ctx.components.setdefault("scheduler", {})["config"] = {"class_name": config.get("_class_name"),
                                                           "shift": shift}
    return config if not problems else None


def check_vae_config(ctx: Context, path: Path) -> dict | None:
    checked = _read_checked(ctx, "vae", path, "vae-config")
    if checked is None:
        return None
    config, problems = checked
    rel = ctx.rel(path)
    if problems:
        return None
    z_dim = config["z_dim"]
    for name in ("latents_mean", "latents_std"):
        if len(config[name]) != z_dim:
            ctx.findings.error("vae", "config_rule", f"{name} has {len(config[name])} values but z_dim is {z_dim}", rel)
    levels = len(config["dim_mult"]) - 1
    if len(config["temperal_downsample"]) != levels:
        ctx.findings.error("vae", "config_rule", f"temperal_downsample has {len(config['temperal_downsample'])} "
                           f"entries, expected len(dim_mult) - 1 = {levels}", rel)
    spatial, temporal = 2 ** levels, 2 ** sum(config["temperal_downsample"])
    if spatial != VAE_SPATIAL_FACTOR or temporal != VAE_TEMPORAL_FACTOR:
        ctx.findings.error("vae", "config_rule", f"compresses {spatial}x spatially and {temporal}x temporally; "
                           f"the pipeline hard-codes {VAE_SPATIAL_FACTOR}x and {VAE_TEMPORAL_FACTOR}x", rel)
    for name, derived in (("scale_factor_spatial", spatial), ("scale_factor_temporal", temporal)):
        if config.get(name) not in (None, derived):
            ctx.findings.error("vae", "config_rule", f"{name} is {config[name]} but dim_mult and "
                               f"temperal_downsample give {derived}", rel)
    ctx.components.setdefault("vae", {})["config"] = {"class_name": config.get("_class_name"), "z_dim": z_dim,
                                                     "base_dim": config["base_dim"]}
    return config


def check_text_encoder_config(ctx: Context, path: Path) -> dict | None:
    checked = _read_checked(ctx, "text_encoder", path, "text-encoder-config")
    if checked is None:
        return None
    config, problems = checked
    ctx.components.setdefault("text_encoder", {})["config"] = {
        "architectures": config.get("architectures"), "d_model": config.get("d_model"),
        "num_layers": config.get("num_layers"), "vocab_size": config.get("vocab_size")}
    return config if not problems else None


def check_cross_rules(ctx: Context, dit: tuple[dict, str] | None, text_encoder: tuple[dict, str] | None,
                      vae: tuple[dict, str] | None) -> None:
    """Rules that tie component configs together (each tuple is (config, relative path))."""
    if dit is None:
        return
    config, rel = dit
    if text_encoder is not None and config["caption_channels"] != text_encoder[0]["d_model"]:
        ctx.findings.error("dit", "config_rule", f"caption_channels {config['caption_channels']} != text encoder "
                           f"d_model {text_encoder[0]['d_model']} ({text_encoder[1]})", rel)
    if vae is not None:
        z_dim = vae[0]["z_dim"]
        for name in ("in_channels", "out_channels"):
            if config[name] != z_dim:
                ctx.findings.error("dit", "config_rule", f"{name} {config[name]} != VAE z_dim {z_dim} ({vae[1]})", rel)


def check_model_index(ctx: Context, path: Path, form: str) -> dict | None:
    """model_index.json against the key map's form for this layout, and its components against the folders."""
    checked = _read_checked(ctx, "model_index", path, "model-index")
    if checked is None:
        return None
    document, problems = checked
    rel = ctx.rel(path)
    flagged = {p.field for p in problems}
    expected = keymap.model_index_spec(form)
    allowed = FASTVIDEO_PIPELINE_CLASSES if form == "fastvideo" else tuple(expected.get("pipeline_classes",
                                                                                        [expected["_class_name"]]))
    if "_class_name" not in flagged and document.get("_class_name") not in allowed:
        ctx.findings.error("model_index", "model_index", f"_class_name is {document.get('_class_name')!r}, "
                           f"expected {' or '.join(allowed)} for the {form} layout", rel)
    if "workload_type" in expected and document.get("workload_type") not in (None, expected["workload_type"]):
        ctx.findings.warning("model_index", "model_index", f"workload_type is {document['workload_type']!r}, "
                             f"the converter writes {expected['workload_type']!r}", rel)
    for name, pair in expected["components"].items():
        if name in flagged:
            continue
        if name not in document:
            ctx.findings.error("model_index", "model_index", f"has no {name} entry", rel)
        elif list(document[name]) in expected.get("also_accepted", {}).get(name, []):
            continue
        elif list(document[name]) in expected.get("legacy_components", {}).get(name, []):
            ctx.findings.warning("model_index", "model_index", f"{name} is {document[name]!r}, which an older "
                                 f"longcat-convert wrote: diffusers imports it only with that library installed; "
                                 f"{pair!r} loads with this package (reconvert, or edit the entry)", rel)
        elif list(document[name]) != pair:
            ctx.findings.error("model_index", "model_index", f"{name} is {document[name]!r}, expected {pair!r}", rel)
    _check_component_folders(ctx, rel, document, {**expected.get("optional_components", {}),
                                                  **expected["components"]})
    ctx.components["model_index"] = {"path": rel, "class_name": document.get("_class_name"),
                                     "components": sorted(k for k, v in document.items() if isinstance(v, list))}
    return document


def _check_component_folders(ctx: Context, rel: str, document: dict, expected: dict) -> None:
    for name, value in document.items():
        if not isinstance(value, list) or not any(value):
            continue
        if name not in expected:
            ctx.findings.warning("model_index", "model_index", f"lists an extra component {name} {value!r}", rel)
        if not (ctx.root / name).is_dir() and not (ctx.dit_only and name != "transformer"):
            ctx.findings.error("model_index", "model_index", f"lists component {name} but {name}/ does not exist",
                               rel)


def check_tokenizer(ctx: Context, folder: Path, deep: bool = False) -> None:
    """The tokenizer files AutoTokenizer needs, checked without loading them (`deep` parses tokenizer.json)."""
    read_json_reporting(ctx, "tokenizer", folder / "tokenizer_config.json")
    fast, slow = folder / "tokenizer.json", folder / "spiece.model"
    if not fast.is_file() and not slow.is_file():
        ctx.findings.error("tokenizer", "missing_file", "has neither tokenizer.json nor spiece.model", ctx.rel(folder))
    if fast.is_file() and not _looks_like_json_object(fast):
        ctx.findings.error("tokenizer", "unreadable_file", "is empty or truncated (not a JSON object)", ctx.rel(fast))
    elif fast.is_file() and deep:
        read_json_reporting(ctx, "tokenizer", fast)
    if slow.is_file() and slow.stat().st_size == 0:
        ctx.findings.error("tokenizer", "unreadable_file", "is empty (0 bytes)", ctx.rel(slow))
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    ctx.components["tokenizer"] = {"path": ctx.rel(folder), "files": files}


def _looks_like_json_object(path: Path) -> bool:
    """First and last non-blank bytes are braces (a full parse of a 16 MB tokenizer is left to --deep)."""
    size = path.stat().st_size
    if size < 2:
        return False
    with open(path, "rb") as handle:
        head = handle.read(min(size, 4096)).lstrip()
        handle.seek(max(0, size - 4096))
        tail = handle.read().rstrip()
    return head[:1] == b"{" and tail[-1:] == b"}"

