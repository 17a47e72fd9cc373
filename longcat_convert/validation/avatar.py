"""Validate a LongCat-Video-Avatar tree as published (1.0: avatar_single/, avatar_multi/; 1.5: base_model/,
base_model_int8/), with the base LongCat-Video tree its demos read beside it (`<tree>/../LongCat-Video`).

Checks, header-only: every DiT folder against the avatar key map (config schema with the tolerated
non-constructor fields); the INT8 folder against the map's quantized key set and dtypes, its skip list, and
every `weight_scale` read and checked finite and > 0 (they are small); the audio encoder folder (config against
the DiT's audio_block/audio_channel, weights from safetensors only, pickles never opened); the 1.5 scheduler and
dmd LoRA (coverage against the DiT's Linears); the vocal separator's presence (information); the sibling base
tree's tokenizer, text encoder, VAE (and, for 1.0, scheduler) with the rule tying the text encoder to the DiT.
"""

from __future__ import annotations

from pathlib import Path

from ..core import keymap
from ..core.dtypes import FLOATING, friendly
from ..core.errors import LongcatError
from ..core.io import read_tensor
from ..core.layout_detect import avatar_variant
from ..core.shard_folder import FolderRules
from ..core.tree import list_files
from .adapters import check_lora_folder
from .configs import check_cross_rules, check_dit_config, check_scheduler_config, check_tokenizer
from .context import Context, read_json_reporting
from .folders import check_dit, check_text_encoder, check_vae, component_folder
from .weights import DtypeExpectations, check_dtypes, scan_weight_folder, weights_summary

INT8_FOLDER = "base_model_int8"
VOCAL_SEPARATOR = "vocal_separator/Kim_Vocal_2.onnx"
SIBLING = keymap.avatar_spec()["sibling"]
WHISPER_ENCODER_LAYERS = 32  # upstream averages hidden states 0-31 in groups of 8 and takes state 32
WHISPER_AUDIO_BLOCKS = 5
UPSTREAM_LAYOUT = {"naming": "upstream", "lora_dir": "lora", "lora_format": "upstream", "lora_subdirs": {},
                   "model_index": None}
SIBLING_FIX = "put the LongCat-Video tree next to this one under that exact name (upstream's demos read it there)"


def variant_spec(variant: str) -> dict:
    return keymap.avatar_spec()["variants"][variant]


def check_converted_avatar(ctx: Context, variant: str | None, dit_config: dict | None, dit_rel: str,
                           policy: DtypeExpectations) -> None:
    """What a converted avatar tree holds beyond a base tree: the audio encoder folder, the INT8 folder if kept."""
    component = keymap.avatar_spec()["audio_component"]
    if variant is None:
        ctx.findings.error("audio_encoder", "missing_component", f"{component}/config.json is missing or names no "
                           "known audio encoder (wav2vec2, whisper)", f"{component}/")
        return
    if dit_config is not None:
        check_audio_encoder(ctx, variant, dit_config, dit_rel, component)
    int8 = variant_spec(variant).get("int8_dir")
    if int8 and (ctx.root / int8).is_dir():
        check_int8_folder(ctx, ctx.root / int8)


def check_avatar_tree(ctx: Context, variant: str, policy: DtypeExpectations, follow_symlinks: bool,
                      deep: bool) -> None:
    configs = []
    for folder in variant_spec(variant)["dit_dirs"]:
        if variant == "avatar-v1.5" and not (ctx.root / folder).is_dir() and (ctx.root / INT8_FOLDER).is_dir():
            ctx.findings.info(folder, "missing_component", "absent: only the INT8 DiT is present", f"{folder}/")
            continue
        layout = {**UPSTREAM_LAYOUT, "dit_dir": folder}
        result = check_dit(ctx, layout, policy, component=folder, family=keymap.AVATAR_FAMILY)
        if result.config is not None and result.expanded is not None:
            configs.append((result.config, result.config_rel, result.expanded))
    if (ctx.root / INT8_FOLDER).is_dir():
        int8_config = check_int8_folder(ctx, ctx.root / INT8_FOLDER)
        if int8_config is not None:
            configs.append(int8_config)
    if not configs:
        return
    config, config_rel, expanded = configs[0]
    _check_same_architecture(ctx, configs)
    check_audio_encoder(ctx, variant, config, config_rel, variant_spec(variant)["audio_dir"])
    if variant == "avatar-v1.5":
        check_lora_folder(ctx, UPSTREAM_LAYOUT, expanded, policy)
        check_scheduler_config(ctx, ctx.root / "scheduler" / "scheduler_config.json", "raw")
    _check_vocal_separator(ctx)
    check_sibling(ctx, variant, config, config_rel, follow_symlinks, deep)


def _check_same_architecture(ctx: Context, configs: list[tuple[dict, str, keymap.ExpandedMap]]) -> None:
    first_config, first_rel, first = configs[0]
    for _, rel, expanded in configs[1:]:
        if expanded.config_symbols != first.config_symbols:
            ctx.findings.error("tree", "config_rule", f"describes another architecture than {first_rel}", rel)


def check_int8_folder(ctx: Context, folder: Path) -> tuple[dict, str, keymap.ExpandedMap] | None:
    """base_model_int8/: the avatar config, the map's INT8 key set and dtypes, scales finite and > 0."""
    component = INT8_FOLDER
    rel = ctx.rel(folder)
    config = check_dit_config(ctx, component, folder / "config.json", "upstream", keymap.AVATAR_FAMILY)
    spec = keymap.quantization_spec(keymap.AVATAR_FAMILY)
    weights = scan_weight_folder(ctx, component, folder, FolderRules(spec["shard_prefix"], names_matter=True))
    ctx.components.setdefault(component, {}).update(weights_summary(ctx, weights), naming="upstream-int8")
    _check_quantization_config(ctx, folder, spec)
    if config is None:
        return None
    try:
        expanded = keymap.expand(config, "upstream", f"{rel}/config.json")
    except LongcatError as exc:
        ctx.findings.error(component, "config_rule", exc.message, f"{rel}/config.json")
        return None
    expected = keymap.int8_expected(expanded)
    located = weights.located
    mismatch = keymap.compare_key_sets({k: info.shape for k, (_, info) in located.items()},
                                       {k: t.shape for k, t in expected.items()})
    for key in mismatch.missing:
        ctx.findings.error(component, "missing_key", f"{key} {list(expected[key].shape)} is missing", rel, key)
    for key in mismatch.unexpected:
        what = (f"{key}: a float weight where the INT8 format stores weight_int8 + weight_scale"
                if key.endswith(".weight") and key[:-7] in keymap.quantized_modules(expanded) else
                f"{key}, which is not a tensor of the INT8 model described by {rel}/config.json")
        ctx.findings.error(component, "unexpected_key", f"holds {what}", ctx.rel(folder / located[key][0]), key)
    for key in mismatch.misshaped:
        ctx.findings.error(component, "shape_mismatch", f"{key} has shape {list(located[key][1].shape)}, expected "
                           f"{list(expected[key].shape)}", ctx.rel(folder / located[key][0]), key)
    _check_int8_dtypes(ctx, folder, located, expected)
    _check_scales(ctx, folder, weights, expected, spec["scale"])
    ctx.components[component].update(expected_tensors=len(expected),
                                     quantized_linears=len(keymap.quantized_modules(expanded)))
    return config, f"{rel}/config.json", expanded


def _check_quantization_config(ctx: Context, folder: Path, spec: dict) -> None:
    path = folder / "quantization_config.json"
    document = read_json_reporting(ctx, INT8_FOLDER, path, required=False)
    if document is None:
        ctx.findings.info(INT8_FOLDER, "missing_file", "quantization_config.json is absent (informational only: "
                          "upstream's loader never reads it)", ctx.rel(folder))
        return
    if document.get("quantization_method") != spec["method"] or \
            sorted(document.get("skip_patterns") or []) != sorted(spec["skip_substrings"]):
        ctx.findings.warning(INT8_FOLDER, "config_field", f"says {document.get('quantization_method')!r} skipping "
                             f"{document.get('skip_patterns')!r}; upstream's loader ignores this file and always "
                             f"uses {spec['method']} skipping {spec['skip_substrings']}", ctx.rel(path))


def _check_int8_dtypes(ctx: Context, folder: Path, located: dict, expected: dict[str, keymap.StoredTensor]) -> None:
    names = {"int8": "I8", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    for key, (name, info) in located.items():
        want = expected.get(key)
        if want is None:
            continue
        if want.dtype is not None and info.dtype != names[want.dtype]:
            ctx.findings.error(INT8_FOLDER, "dtype_mismatch", f"{key} is {friendly(info.dtype)}, the INT8 format "
                               f"stores {want.dtype}", ctx.rel(folder / name), key)
        elif want.dtype is None and info.dtype not in FLOATING:
            ctx.findings.error(INT8_FOLDER, "dtype_mismatch", f"{key} is {friendly(info.dtype)}; this tensor is not "
                               "quantised and must be floating point", ctx.rel(folder / name), key)


def _check_scales(ctx: Context, folder: Path, weights, expected: dict[str, keymap.StoredTensor], scale: str) -> None:
    import torch

    for key, (name, info) in weights.located.items():
        if not key.endswith("." + scale) or key not in expected or info.dtype != "F32" or \
                info.shape != expected[key].shape:
            continue
        values = read_tensor(weights.headers[name], key)
        rel = ctx.rel(folder / name)
        if not bool(torch.isfinite(values).all()):
            ctx.findings.error(INT8_FOLDER, "nan_inf", f"{key} holds NaN or Inf scales", rel, key)
        elif not bool((values > 0).all()):
            ctx.findings.error(INT8_FOLDER, "int8_scale", f"{key} holds {int((values <= 0).sum())} scale(s) <= 0 "
                               "(the quantizer's scales are at least 1e-8/127)", rel, key)


def check_audio_encoder(ctx: Context, variant: str, dit: dict, dit_rel: str, name: str) -> None:
    """The encoder's width and layer count must give the DiT's audio_channel and audio_block."""
    folder = component_folder(ctx, "audio_encoder", name)
    if folder is None:
        return
    config = read_json_reporting(ctx, "audio_encoder", folder / "config.json")
    weights = scan_weight_folder(ctx, "audio_encoder", folder, FolderRules("model", names_matter=True))
    ctx.components["audio_encoder"] = {**weights_summary(ctx, weights), "variant": variant}
    check_dtypes(ctx, "audio_encoder", folder, weights.located, DtypeExpectations(allow_mixed=True))
    if config is None:
        return
    rel = ctx.rel(folder / "config.json")
    if variant == "avatar-v1.0":
        rules = {"model_type": ("wav2vec2", None), "hidden_size": (dit["audio_channel"], "audio_channel"),
                 "num_hidden_layers": (dit["audio_block"], "audio_block")}
        layer_key, layers_field = "encoder.layers.", "num_hidden_layers"
    else:
        rules = {"model_type": ("whisper", None), "d_model": (dit["audio_channel"], "audio_channel"),
                 "encoder_layers": (WHISPER_ENCODER_LAYERS, None)}
        layer_key, layers_field = "encoder.layers.", "encoder_layers"
        if dit["audio_block"] != WHISPER_AUDIO_BLOCKS:
            ctx.findings.error("audio_encoder", "config_rule", f"audio_block is {dit['audio_block']}; upstream's "
                               f"whisper features are {WHISPER_AUDIO_BLOCKS} layer groups", dit_rel)
        _check_whisper_extractor(ctx, folder, config)
    for field, (want, dit_field) in rules.items():
        if config.get(field) != want:
            source = f" ({dit_field} of {dit_rel})" if dit_field else ""
            ctx.findings.error("audio_encoder", "config_rule", f"{field} is {config.get(field)!r}, expected "
                               f"{want!r}{source}", rel)
    layers = {key.removeprefix("wav2vec2.")[len(layer_key):].split(".", 1)[0] for key in weights.located
              if key.removeprefix("wav2vec2.").startswith(layer_key)}
    if weights.located and len(layers) != config.get(layers_field):
        ctx.findings.error("audio_encoder", "missing_key", f"holds {len(layers)} encoder layers, but "
                           f"{layers_field} is {config.get(layers_field)!r}", ctx.rel(folder))


def _check_whisper_extractor(ctx: Context, folder: Path, config: dict) -> None:
    extractor = read_json_reporting(ctx, "audio_encoder", folder / "preprocessor_config.json")
    if extractor is not None and extractor.get("feature_size") != config.get("num_mel_bins"):
        ctx.findings.error("audio_encoder", "config_rule", f"feature_size {extractor.get('feature_size')!r} != "
                           f"num_mel_bins {config.get('num_mel_bins')!r} of config.json",
                           ctx.rel(folder / "preprocessor_config.json"))


def _check_vocal_separator(ctx: Context) -> None:
    path = ctx.root / VOCAL_SEPARATOR
    if path.is_file():
        ctx.findings.info("vocal_separator", "config_field", "present (an ONNX model; not inspected)", VOCAL_SEPARATOR)
    else:
        ctx.findings.info("vocal_separator", "missing_component", "absent: upstream's demos separate vocals with it "
                          "before encoding audio; weights-only uses do not need it", VOCAL_SEPARATOR)


def check_sibling(ctx: Context, variant: str, dit: dict, dit_rel: str, follow_symlinks: bool, deep: bool) -> None:
    """tokenizer/, text_encoder/, vae/ (and scheduler/ for 1.0) of `<root>/../LongCat-Video`."""
    if all((ctx.root / name).is_dir() for name in variant_spec(variant)["sibling_components"]):
        sibling = ctx.root  # a converted-and-reversed tree carries them itself
    else:
        sibling = (ctx.root.parent / SIBLING).resolve()
    if not sibling.is_dir():
        ctx.findings.error("sibling", "missing_component", f"{sibling} is missing: the avatar demos read tokenizer, "
                           "text encoder and VAE from ../LongCat-Video", "../" + SIBLING, )
        return
    listing = list_files(sibling, follow_symlinks)  # symlink loops and escapes refused before anything is read
    for problem in listing.problems:
        ctx.findings.error("sibling", problem.kind, problem.message, str(problem.path))
    inner = Context(sibling, ctx.findings, files=ctx.files)
    copied = DtypeExpectations(None, True)
    text_encoder = check_text_encoder(inner, copied)
    if (sibling / "tokenizer").is_dir():
        check_tokenizer(inner, sibling / "tokenizer", deep)
    else:
        ctx.findings.error("tokenizer", "missing_component", f"{sibling}/tokenizer/ is missing", "../" + SIBLING)
    vae = check_vae(inner, copied)
    if "scheduler" in variant_spec(variant)["sibling_components"]:
        check_scheduler_config(inner, sibling / "scheduler" / "scheduler_config.json", "raw")
    check_cross_rules(inner, (dit, dit_rel), (text_encoder, "../LongCat-Video/text_encoder/config.json")
                      if text_encoder else None, (vae, "../LongCat-Video/vae/config.json") if vae else None)
    for name in ("text_encoder", "tokenizer", "vae", "scheduler"):
        if name in inner.components:
            ctx.components[f"sibling_{name}"] = inner.components[name]


__all__ = ["SIBLING_FIX", "avatar_variant", "check_avatar_tree", "check_converted_avatar"]
