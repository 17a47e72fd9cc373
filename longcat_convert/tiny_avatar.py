"""Write small but complete LongCat-Video-Avatar trees (1.0 and 1.5), laid out as published, with the base
LongCat-Video tree beside them (upstream's demos read tokenizer, text encoder, VAE and, for 1.0, the scheduler
from `<avatar tree>/../LongCat-Video`).

    DST/LongCat-Video/               the tiny base tree (`longcat-convert tiny`)
    DST/LongCat-Video-Avatar/        avatar-v1.0: avatar_single/, avatar_multi/, chinese-wav2vec2-base/
    DST/LongCat-Video-Avatar-1.5/    avatar-v1.5: base_model/, base_model_int8/, lora/dmd_lora.safetensors,
                                     scheduler/ (shift 7), whisper-large-v3/, config.json

DiT keys and shapes come from the avatar key map; configs carry upstream's constructor fields plus the
non-constructor ones the published configs hold. The audio encoders are transformers' own classes at tiny
size. The wav2vec2 folder holds `model.safetensors` (what this project reads) and `pytorch_model.bin` with the
same tensors under upstream's `wav2vec2.` prefix (what upstream's `Wav2Vec2ModelWrapper` reads; written with
torch.save, never read back here). The vocal separator (an ONNX MDX-Net model) is not written: there is no
tiny one; `validate` reports its absence as information.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .core import keymap
from .core.dtypes import SAFETENSORS_NAME, torch_dtype
from .core.errors import LongcatError
from .core.int8 import quantize_rows
from .core.io import ShardWriter, TensorEntry, tensor_bytes
from .tiny_tree import (
    CFG_STEP_SUFFIXES,
    DIFFUSERS_VERSION,
    LORA_TARGET_SETS,
    TINY_DTYPES,
    TinySpec,
    _dit_tensor,
    _tiny_scale,
    _write_shards,
    dit_config,
    lora_state,
    write_dit,
    write_loras,
)

if TYPE_CHECKING:
    import torch

AVATAR_VARIANTS = ("avatar-v1.0", "avatar-v1.5")
BASE_REPO = "LongCat-Video"
AVATAR_REPOS = {"avatar-v1.0": "LongCat-Video-Avatar", "avatar-v1.5": "LongCat-Video-Avatar-1.5"}
DIT_FOLDERS = {"avatar-v1.0": ("avatar_single", "avatar_multi"), "avatar-v1.5": ("base_model",)}
AUDIO_FOLDERS = {"avatar-v1.0": "chinese-wav2vec2-base", "avatar-v1.5": "whisper-large-v3"}
INT8_FOLDER = "base_model_int8"
DMD_LORA = ("lora", "dmd_lora.safetensors")
DMD_RANK, DMD_ALPHA = 128, 64.0  # upstream's demo loads the dmd adapter with these (a strict load: rank must match)
AVATAR_SCHEDULER_SHIFT = 7.0
WAV2VEC2_PREFIX = "wav2vec2."
AUDIO_WIDTH = 32  # C_a of both tiny encoders
WHISPER_LAYERS = 32  # upstream's whisper features index hidden states 0..32: the encoder must have 32 layers
WAV2VEC2_LAYERS = 12  # S of avatar 1.0: hidden_states[1:] of the encoder, one per layer


@dataclass(frozen=True)
class AvatarSizes:
    """The avatar constructor fields (upstream names) at tiny size."""

    audio_window: int = 5
    audio_block: int = 5
    audio_channel: int = AUDIO_WIDTH
    intermediate_dim: int = 32
    output_dim: int = 32
    context_tokens: int = 4
    vae_scale: int = 4
    audio_prenorm: bool = False
    class_range: int = 24
    class_interval: int = 4


def avatar_sizes(variant: str, audio_prenorm: bool = False) -> AvatarSizes:
    blocks = WAV2VEC2_LAYERS if variant == "avatar-v1.0" else 5
    return AvatarSizes(audio_block=blocks, audio_prenorm=audio_prenorm)


def avatar_dit_config(spec: TinySpec, sizes: AvatarSizes) -> dict:
    """Upstream's constructor fields of LongCatVideoAvatarTransformer3DModel plus the published 1.5 config's other
    fields (`architectures`, `model_max_length`), at tiny sizes."""
    config = dit_config(spec)
    config.update({
        "_class_name": keymap.class_name("upstream", keymap.AVATAR_FAMILY),
        "architectures": [keymap.class_name("upstream", keymap.AVATAR_FAMILY)],
        "model_max_length": 512,
        "bsa_params": None,
        **{field: getattr(sizes, field) for field in AvatarSizes.__dataclass_fields__},
    })
    return config


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def avatar_tensors(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import torch

    expanded = keymap.expand(config, "upstream")
    gen = torch.Generator().manual_seed(seed)
    return {r.upstream: _dit_tensor(r.upstream, r.shape, gen, _tiny_scale).to(dtype) for r in expanded.params}


def write_avatar_dit(folder: Path, config: dict, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    folder.mkdir(parents=True)
    _write_shards(folder, keymap.load_map_document(keymap.AVATAR_FAMILY)["shard_prefix"], tensors, max_bytes)
    _write_json(folder / "config.json", config)


def int8_tensors(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors upstream's quantizer saves for this model: quantised Linears as int8 + float32 scale + bf16 bias,
    everything else bf16 (upstream's loader casts them to bf16 anyway), in the key map's order."""
    import torch

    expanded = keymap.expand(config, "upstream")
    spec = keymap.quantization_spec(expanded.family)
    quantized = set(keymap.quantized_modules(expanded))
    result: dict[str, torch.Tensor] = {}
    for rule in expanded.params:
        value = tensors[rule.upstream]
        if rule.module in quantized and rule.param == "weight":
            q, scale = quantize_rows(value)
            result[f"{rule.module}.{spec['weight']}"] = q
            result[f"{rule.module}.{spec['scale']}"] = scale
        else:
            result[rule.upstream] = value.to(getattr(torch, spec["bias_dtype"]) if rule.module in quantized
                                              else torch.bfloat16)
    return result


def write_int8_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    from .core.io import shard_name, write_index

    spec = keymap.quantization_spec(keymap.AVATAR_FAMILY)
    stored = int8_tensors(config, tensors)
    folder.mkdir(parents=True)
    _write_shards(folder, spec["shard_prefix"], stored, max_bytes)
    if not (folder / spec["index"]).exists():  # upstream writes an index for a single shard too
        write_index(folder / spec["index"], dict.fromkeys(stored, shard_name(spec["shard_prefix"], 1, 1)),
                    sum(t.numel() * t.element_size() for t in stored.values()))
    _write_json(folder / "config.json", config)
    _write_json(folder / "quantization_config.json", {
        "quantization_method": spec["method"], "skip_patterns": list(spec["skip_substrings"]),
        "description": "Weight-only INT8 quantization with per-channel symmetric scaling"})


def dmd_targets(expanded: keymap.ExpandedMap, which: str) -> list[str]:
    """published: the cfg_step module set (what the published dmd_lora's size implies); extended: also the audio
    cross-attention; all: every Linear."""
    if which not in LORA_TARGET_SETS:
        raise LongcatError(f"--lora-targets must be one of {', '.join(LORA_TARGET_SETS)}, not {which!r}")
    chosen = []
    for module in expanded.linears:
        suffix = module.split(".", 2)[2] if module.startswith("blocks.") else None
        if (suffix in CFG_STEP_SUFFIXES or which == "all"
                or (which == "extended" and suffix is not None and suffix.startswith("audio_cross_attn."))):
            chosen.append(module)
    return chosen


def write_dmd_lora(path: Path, config: dict, spec: TinySpec) -> None:
    import torch

    expanded = keymap.expand(config, "upstream")
    gen = torch.Generator().manual_seed(spec.seed + 11)
    state = lora_state(expanded, dmd_targets(expanded, spec.lora_targets), DMD_RANK, DMD_ALPHA, gen,
                       torch_dtype(spec.dtype, TINY_DTYPES))
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [TensorEntry(k, SAFETENSORS_NAME[v.dtype], tuple(v.shape)) for k, v in state.items()]
    with ShardWriter(path, entries, {"format": "pt"}) as writer:
        for key, value in state.items():
            writer.write_tensor(key, [tensor_bytes(value)])


def _seed_audio_model(model: torch.nn.Module, gen: torch.Generator) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            values = torch.randn(param.shape, generator=gen)
            if name.endswith(("layer_norm.weight", "norm.weight")):
                param.copy_(1.0 + 0.1 * values)  # norm scales near 1; no tensor all zeros (validate --deep warns)
            else:
                param.copy_(values * (0.02 if name.endswith("bias") else 0.05))


def write_wav2vec2(folder: Path, seed: int) -> None:
    """A 12-layer Wav2Vec2Model of width 32 (upstream reads config.json + pytorch_model.bin; the feature extractor
    ignores preprocessor_config.json but the published folder has one)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from .core.quiet import quiet_libraries

    with quiet_libraries(), torch.random.fork_rng(devices=[]):
        config = Wav2Vec2Config(hidden_size=AUDIO_WIDTH, num_hidden_layers=WAV2VEC2_LAYERS, num_attention_heads=2,
                                intermediate_size=64, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                num_conv_pos_embedding_groups=4, vocab_size=32,
                                architectures=["Wav2Vec2ForPreTraining"])
        model = Wav2Vec2Model(config).eval()
        _seed_audio_model(model, torch.Generator().manual_seed(seed))
        model.save_pretrained(folder, safe_serialization=True)
        state = {WAV2VEC2_PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, folder / "pytorch_model.bin")
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=False).save_pretrained(folder)


def write_whisper(folder: Path, seed: int) -> None:
    """A WhisperModel with a 32-layer encoder of width 32 (upstream's feature code needs 33 hidden states) and
    the 128-mel feature extractor of whisper-large-v3, saved as config.json + model.safetensors +
    preprocessor_config.json."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from .core.quiet import quiet_libraries

    with quiet_libraries(), torch.random.fork_rng(devices=[]):
        config = WhisperConfig(vocab_size=64, num_mel_bins=128, d_model=AUDIO_WIDTH, encoder_layers=WHISPER_LAYERS,
                               encoder_attention_heads=2, decoder_layers=1, decoder_attention_heads=2,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
                               max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
        model = WhisperModel(config).eval()
        _seed_audio_model(model, torch.Generator().manual_seed(seed))
        model.save_pretrained(folder, safe_serialization=True)
        WhisperFeatureExtractor(feature_size=128).save_pretrained(folder)


def write_base_tree(root: Path, spec: TinySpec) -> None:
    from .tiny_components import write_components

    config = write_dit(root / "dit", spec)
    write_loras(root / "lora", config, spec)
    write_components(root, config["caption_channels"], spec.seed, torch_dtype(spec.dtype, TINY_DTYPES))


def write_avatar_tree(root: Path, variant: str, spec: TinySpec, audio_prenorm: bool) -> None:
    from .tiny_components import write_scheduler

    config = avatar_dit_config(spec, avatar_sizes(variant, audio_prenorm))
    config["_diffusers_version"] = DIFFUSERS_VERSION
    dtype = torch_dtype(spec.dtype, TINY_DTYPES)
    root.mkdir(parents=True)
    base_tensors = None
    for number, folder in enumerate(DIT_FOLDERS[variant]):
        tensors = avatar_tensors(config, spec.seed + 100 + number, dtype)
        base_tensors = base_tensors or tensors
        write_avatar_dit(root / folder, config, tensors, spec.max_shard_bytes)
    if variant == "avatar-v1.0":
        write_wav2vec2(root / AUDIO_FOLDERS[variant], spec.seed + 200)
        return
    write_whisper(root / AUDIO_FOLDERS[variant], spec.seed + 200)
    write_int8_folder(root / INT8_FOLDER, config, base_tensors, spec.max_shard_bytes)
    write_dmd_lora(root.joinpath(*DMD_LORA), config, spec)
    write_scheduler(root / "scheduler", shift=AVATAR_SCHEDULER_SHIFT)
    _write_json(root / "config.json", {"model_name": AVATAR_REPOS[variant]})


def build_tiny_avatar(dst: Path, variant: str, *, seed: int = 0, dtype: str = "float32", depth: int = 2,
                      hidden: int = 128, lora_targets: str = "published", audio_prenorm: bool = False,
                      overwrite: bool = False) -> Path:
    """Write DST/LongCat-Video and DST/<avatar repo> atomically; returns the avatar tree's path."""
    from .atomic import AtomicDirectory

    if variant not in AVATAR_VARIANTS:
        raise LongcatError(f"unknown avatar variant {variant!r}; choose one of {', '.join(AVATAR_VARIANTS)}")
    if dtype not in TINY_DTYPES:
        raise LongcatError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
    if hidden % 64 or hidden <= 0 or depth <= 0:
        raise LongcatError(f"--hidden must be a positive multiple of 64 and --depth positive, not {hidden}, {depth}")
    spec = TinySpec(seed=seed, dtype=dtype, depth=depth, hidden=hidden, lora_targets=lora_targets)
    with AtomicDirectory(Path(dst), overwrite=overwrite) as work:
        write_base_tree(work / BASE_REPO, spec)
        write_avatar_tree(work / AVATAR_REPOS[variant], variant, spec, audio_prenorm)
    return Path(dst) / AVATAR_REPOS[variant]
