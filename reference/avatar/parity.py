"""Forward-level parity for avatar DiT folders: the same seeded inputs through the model of the raw folder
(upstream names) and the model of a converted folder (any naming, given as a `SlotsFor`), compared per case
with the one output comparison (`metrics.compare_outputs`) and the base forward parity's thresholds.

Cases (every task the avatar DiT runs): `at2v` (batch of 2 with padded text, no conditioning), `ai2v` (first
latent frame conditioning), `multi` (two speakers + background masks, ai2v), `vc` (continuation: reference latent
placed at ref_img_index, conditioning latents, mask_frame_range masking part of the noise frames) and `vc-kv` (the
same through a KV cache). A folder holding `quantized_model*.safetensors` is loaded as INT8.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from longcat_convert.core import jsonschemas, progress
from longcat_convert.core.errors import LongcatError

from ..forward_parity import DEFAULT_THRESHOLDS, _case_result, _resolve_dtype
from .dit import LongcatAvatarDiT
from .loading import INT8_PREFIX, load_avatar_dit, load_avatar_int8
from .params import SlotsFor, upstream_slots

AVATAR_CASES = ("at2v", "ai2v", "multi", "vc", "vc-kv")
REF_INDEX, MASK_RANGE = 3, 1  # reference at RoPE position 3: noise frames 0..2 of 4 do not see it
COND, NOISE = 3, 4  # continuation: reference + 2 conditioning latents, 4 noise latents


def load_avatar_folder(folder: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu",
                       slots_for: SlotsFor = upstream_slots, naming: str = "upstream") -> LongcatAvatarDiT:
    """The INT8 loader for a folder of `quantized_model*.safetensors`, else the bf16/fp32 one."""
    folder = Path(folder)
    int8 = folder.is_dir() and any(folder.glob(f"{INT8_PREFIX}*.safetensors"))
    loader = load_avatar_int8 if int8 else load_avatar_dit
    return loader(folder, dtype, device, slots_for, naming)


def make_avatar_inputs(model: LongcatAvatarDiT, seed: int = 0) -> dict[str, dict]:
    """Seeded inputs of every case, shaped by the model's config (2 x 3 tokens per latent frame)."""
    config, avatar = model.arch, model.avatar
    gen = torch.Generator().manual_seed(seed)
    _, ph, pw = config.patch_size
    features = (avatar.audio_window, avatar.audio_block, avatar.audio_channel)

    def latents(batch: int, frames: int) -> torch.Tensor:
        return torch.randn(batch, config.in_channels, frames, 2 * ph, 3 * pw, generator=gen)

    def audio(speakers: int, latent_frames: int) -> torch.Tensor:
        return torch.randn(speakers, 1 + avatar.vae_scale * (latent_frames - 1), *features, generator=gen)

    text = torch.randn(2, 1, 8, config.caption_channels, generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    speakers = torch.zeros(3, 32, 48)  # pixel masks, nearest-resized to the 2 x 3 token grid by the DiT
    speakers[0, :, :24], speakers[1, :, 24:] = 1, 1
    speakers[2, :16] = 1
    one = dict(encoder_hidden_states=text[:1], encoder_attention_mask=mask[:1])
    ai2v_t = torch.tensor([[0.0, 450.0, 450.0]])
    vc_t = torch.tensor([[0.0] * COND + [600.0] * NOISE])
    continuation = dict(num_ref_latents=1, ref_img_index=REF_INDEX, mask_frame_range=MASK_RANGE)
    return {
        "at2v": dict(hidden_states=latents(2, 3), timestep=torch.tensor([700.0, 300.0]), encoder_hidden_states=text,
                     encoder_attention_mask=mask, audio_embs=audio(2, 3)),
        "ai2v": dict(hidden_states=latents(1, 3), timestep=ai2v_t, num_cond_latents=1, audio_embs=audio(1, 3), **one),
        "multi": dict(hidden_states=latents(1, 3), timestep=ai2v_t, num_cond_latents=1, audio_embs=audio(2, 3),
                      ref_target_masks=speakers, **one),
        "vc": dict(hidden_states=latents(1, COND + NOISE), timestep=vc_t, num_cond_latents=COND,
                   audio_embs=audio(1, COND + NOISE - 1), **continuation, **one),
        "vc-kv": dict(hidden_states=latents(1, COND + NOISE), timestep=torch.tensor([600.0]), kv_cache=COND,
                      audio_embs=audio(1, COND + NOISE - 1), **continuation, **one),
    }


def run_avatar_case(model: LongcatAvatarDiT, case: dict) -> torch.Tensor:
    """One case's output (a `kv_cache` entry n: build the cache from the first n latent frames, then run the rest)."""
    call = dict(case)
    cond_frames = call.pop("kv_cache", None)
    latents, timestep, text = call.pop("hidden_states"), call.pop("timestep"), call.pop("encoder_hidden_states")
    if cond_frames is None:
        return model(latents, timestep, text, **call)
    cache = model.build_kv_cache(latents[:, :, :cond_frames], call.get("num_ref_latents"), call.get("ref_img_index"))
    return model(latents[:, :, cond_frames:], timestep, text, kv_cache=cache, **call)


def avatar_forward_parity(raw_folder: str | Path, converted_folder: str | Path,
                          converted_slots_for: SlotsFor = upstream_slots, converted_naming: str = "upstream",
                          cases: Iterable[str] | None = None, dtype: str | torch.dtype = "float32",
                          thresholds: dict[str, float] | None = None, seed: int = 0,
                          device: str | torch.device = "cpu") -> dict:
    """A parity report (`level` forward) over `cases` (default: all of AVATAR_CASES).

    Problems with the raw folder or the arguments raise LongcatError; a converted folder that cannot be loaded
    fails every case with the reason."""
    torch_dtype, dtype_name = _resolve_dtype(dtype)
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    if dtype_name not in limits:
        raise LongcatError(f"no threshold for dtype {dtype_name}; pass thresholds={{'{dtype_name}': ...}}")
    names = list(cases) if cases is not None else list(AVATAR_CASES)
    unknown = [name for name in names if name not in AVATAR_CASES]
    if unknown:
        raise LongcatError(f"unknown avatar forward case {unknown[0]!r}; use {', '.join(AVATAR_CASES)}")
    with progress.scope("raw folder"):
        raw = load_avatar_folder(raw_folder, torch_dtype, device)
        inputs = make_avatar_inputs(raw, seed)
        reference = _run(raw, names, inputs)
    del raw
    try:
        with progress.scope("converted folder"):
            converted = load_avatar_folder(converted_folder, torch_dtype, device, converted_slots_for, converted_naming)
            _check_same_architecture(converted, inputs, converted_folder)
            outputs: dict[str, torch.Tensor | str] = dict(_run(converted, names, inputs))
    except LongcatError as exc:
        outputs = dict.fromkeys(names, f"cannot load the converted DiT: {exc.one_line()}")
    threshold = limits[dtype_name]
    results = [{"name": name, **_case_result(outputs[name], reference[name], threshold), "tolerance": threshold,
                "dtype": dtype_name} for name in names]
    return jsonschemas.checked_report("parity-report", {
        "level": "forward", "model": "avatar", "raw": {"path": str(raw_folder), "naming": "upstream"},
        "converted": {"path": str(converted_folder), "naming": converted_naming}, "dtype": dtype_name,
        "threshold": threshold, "seed": seed, "cases": results, "passed": all(r["passed"] for r in results)})


def _run(model: LongcatAvatarDiT, names: list[str], inputs: dict[str, dict]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: run_avatar_case(model, inputs[name]).cpu()
                for name in progress.steps(names, len(names), "forward cases")}


def _check_same_architecture(converted: LongcatAvatarDiT, inputs: dict[str, dict], where: str | Path) -> None:
    """The seeded inputs were shaped by the raw config: a converted config of another shape cannot run them."""
    audio = inputs["at2v"]["audio_embs"].shape[2:]
    want = (converted.avatar.audio_window, converted.avatar.audio_block, converted.avatar.audio_channel)
    if tuple(audio) != want or inputs["at2v"]["hidden_states"].shape[1] != converted.arch.in_channels:
        raise LongcatError(f"config describes another architecture (audio {list(want)}, in_channels "
                           f"{converted.arch.in_channels}) than the raw one", Path(where) / "config.json")

