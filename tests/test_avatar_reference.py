"""The reference avatar DiT (longcat_reference.avatar) on tiny random weights: properties that follow from the
math of the model, checked against independent computations written here (no upstream code needed).
Agreement with upstream itself is scripts/check_avatar_upstream.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from longcat_reference.avatar import (
    AVATAR_CASES,
    LongcatAvatarDiT,
    avatar_forward_parity,
    load_avatar_dit,
    load_avatar_int8,
    upstream_slots,
)
from longcat_reference.avatar.audio_attention import reference_attention_map, speaker_positions
from longcat_reference.avatar.audio_proj import audio_tokens, later_frame_windows
from longcat_reference.avatar.config import AvatarConfig
from longcat_reference.avatar.int8 import dequantize
from longcat_reference.avatar.self_attention import Reference
from longcat_reference.dit import LongcatDiT
from safetensors.torch import load_file, save_file

from longcat_convert.core.errors import LongcatError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = dict(in_channels=16, out_channels=16, hidden_size=32, depth=2, num_heads=4, caption_channels=16,
              mlp_ratio=4, adaln_tembed_dim=16, frequency_embedding_size=32, patch_size=[1, 2, 2],
              text_tokens_zero_pad=True, audio_window=5, audio_block=2, audio_channel=6, intermediate_dim=12,
              output_dim=10, context_tokens=3, vae_scale=4, audio_prenorm=True, class_range=24, class_interval=4)
FRAME = (6, 6)  # latent h, w: 3 x 3 tokens per frame


def random_model(config: dict = CONFIG, seed: int = 0) -> LongcatAvatarDiT:
    model = LongcatAvatarDiT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 1 else 0.15) + unit)
    return model


def inputs(frames: int = 3, batch: int = 1, speakers: int | None = None, seed: int = 1, audio_frames: int | None = None
           ) -> dict:
    gen = torch.Generator().manual_seed(seed)
    audio_frames = audio_frames or frames
    return dict(
        hidden_states=torch.randn(batch, 16, frames, *FRAME, generator=gen),
        timestep=torch.full((batch,), 600.0),
        encoder_hidden_states=torch.randn(batch, 1, 5, 16, generator=gen),
        audio_embs=torch.randn(speakers or batch, 1 + 4 * (audio_frames - 1), 5, 2, 6, generator=gen))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- the audio path reduces to the base DiT -------------------------------------------------------------


@pytest.mark.parametrize("num_cond_latents", [0, 1])
def test_zero_audio_gate_is_the_base_dit(num_cond_latents: int):
    # audio_adaLN_modulation.1 = 0 makes (shift_a, scale_a, gate_a) = 0, so the audio update gate·(…) is exactly 0
    # and every block is the base block (nc <= 1: the avatar's self-attention modes equal the base's there).
    model = random_model()
    with torch.no_grad():
        for index in range(CONFIG["depth"]):
            model.get_submodule(f"blocks.{index}.audio_adaLN_modulation.1").weight.zero_()
            model.get_submodule(f"blocks.{index}.audio_adaLN_modulation.1").bias.zero_()
    base = LongcatDiT(CONFIG)
    base.load_state_dict({key: value for key, value in model.state_dict().items() if key in base.state_dict()})
    x = inputs()
    timestep = torch.tensor([[0.0, 600.0, 600.0]]) if num_cond_latents else x["timestep"]
    ours = model(x["hidden_states"], timestep, x["encoder_hidden_states"], num_cond_latents=num_cond_latents,
                 audio_embs=x["audio_embs"])
    theirs = base(x["hidden_states"], timestep, x["encoder_hidden_states"], num_cond_latents=num_cond_latents)
    assert torch.equal(ours, theirs)
    # and the audio does matter once the gate is open
    assert rel(random_model()(x["hidden_states"], timestep, x["encoder_hidden_states"],
                              num_cond_latents=num_cond_latents, audio_embs=x["audio_embs"]), theirs) > 1e-3


def test_zero_audio_output_projection_makes_the_output_independent_of_the_audio():
    # proj = 0 gives y_a = 0, LN(0) = 0, so the update is gate·shift: a function of the timestep only
    model = random_model()
    with torch.no_grad():
        for index in range(CONFIG["depth"]):
            model.get_submodule(f"blocks.{index}.audio_cross_attn.proj").weight.zero_()
            model.get_submodule(f"blocks.{index}.audio_cross_attn.proj").bias.zero_()
    x = inputs()
    first = model(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"])
    second = model(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"] * 3 + 1)
    assert torch.equal(first, second)


@pytest.mark.parametrize("tensor", ["audio_proj.proj1_vf.weight", "audio_proj.norm.bias",
                                    "blocks.1.audio_cross_attn.k_norm.weight", "blocks.0.pre_audio_crs_attn_norm.bias",
                                    "blocks.1.pre_video_crs_attn_norm.weight", "blocks.0.audio_adaLN_modulation.1.bias"])
def test_a_corrupted_audio_tensor_changes_the_output(tensor: str):
    model = random_model()
    x = inputs()
    before = model(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"])
    with torch.no_grad():  # a non-uniform change: a constant one would vanish in the LayerNorms after some tensors
        parameter = model.get_parameter(tensor)
        parameter.add_(0.2 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(9)))
    after = model(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"])
    assert rel(after, before) > 1e-4


# ---- audio features -> tokens ----------------------------------------------------------------------------


def test_later_frame_windows_follow_the_pixel_frames_of_each_latent_frame():
    config = AvatarConfig.from_dict(CONFIG)
    embs = torch.randn(2, 1 + 4 * 3, 5, 2, 6)
    got = later_frame_windows(embs, config)
    assert got.shape == (2, 3, 8, 2, 6)
    for b in range(2):
        for latent in range(3):
            pixel_frames = [1 + 4 * latent + k for k in range(4)]  # the 4 pixel frames of latent frame latent+1
            rows = [embs[b, pixel_frames[0], entry] for entry in range(0, 3)]  # first frame: entries 0..W//2
            rows += [embs[b, frame, 2] for frame in pixel_frames[1:3]]  # middle frames: the centre entry
            rows += [embs[b, pixel_frames[3], entry] for entry in range(2, 5)]  # last frame: entries W//2..W-1
            assert torch.equal(got[b, latent], torch.stack(rows))


def test_audio_tokens_against_a_per_frame_loop():
    model = random_model()
    config = model.avatar
    embs = torch.randn(1, 9, 5, 2, 6)
    got = audio_tokens(model, embs, config)
    p = {name: model.get_parameter(f"audio_proj.{name}") for name in
         ("proj1.weight", "proj1.bias", "proj1_vf.weight", "proj1_vf.bias", "proj2.weight", "proj2.bias",
          "proj3.weight", "proj3.bias", "norm.weight", "norm.bias")}
    for latent in range(3):
        if latent == 0:
            h = torch.relu(p["proj1.weight"] @ embs[0, 0].flatten() + p["proj1.bias"])
        else:
            frames = range(1 + 4 * (latent - 1), 1 + 4 * latent)
            window = torch.cat([embs[0, f, [0, 1, 2] if k == 0 else [2, 3, 4] if k == 3 else [2]]
                                for k, f in enumerate(frames)])
            h = torch.relu(p["proj1_vf.weight"] @ window.flatten() + p["proj1_vf.bias"])
        h = torch.relu(p["proj2.weight"] @ h + p["proj2.bias"])
        tokens = (p["proj3.weight"] @ h + p["proj3.bias"]).view(3, 10)
        mean, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
        want = (tokens - mean) / torch.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"]
        torch.testing.assert_close(got[0, latent], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [8, 5])  # 8 is not 1 + 4n; 5 covers 2 latent frames of 3
def test_audio_frame_count_must_be_one_plus_vae_scale_times_n(frames: int):
    model = random_model()
    x = inputs()
    with pytest.raises(LongcatError, match="1 \\+ 4·n|covers"):
        model(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"][:, :frames])


# ---- multi-speaker positions -----------------------------------------------------------------------------


def test_speaker_positions_by_hand():
    attention_map = torch.tensor([[0.2, 0.6, 0.1, 1.0],  # speaker 1
                                  [0.4, 0.1, 0.3, 0.0],  # speaker 2
                                  [0.1, 0.0, 0.5, 0.0]])  # background
    got = speaker_positions(attention_map, key_tokens=6, streams=2, class_range=24, class_interval=4)
    # token 0: argmax speaker 2 -> 20 + 4·(0.4 − 0)/0.4; token 1: speaker 1 -> 4·(0.6 − 0.1)/0.9;
    # token 2: background -> 24 // 2; token 3: speaker 1 at its maximum -> 4
    want = torch.tensor([24.0, 4 * 0.5 / 0.9, 12.0, 4.0])
    torch.testing.assert_close(got.queries, want, rtol=1e-6, atol=1e-6)
    assert got.keys.tolist() == [2.0, 2.0, 2.0, 22.0, 22.0, 22.0]
    crowded = torch.cat([attention_map, torch.tensor([[0.0, 0.0, 0.9, 0.0]])])  # a 4th class wins token 2
    got = speaker_positions(crowded, key_tokens=9, streams=3, class_range=24, class_interval=4)
    assert got.queries[2] == 100.0  # more than 3 classes: the background moves to 100
    assert got.keys.tolist() == [2.0] * 3 + [22.0] * 3 + [100.0] * 3


def test_reference_attention_map_against_a_per_head_loop():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 7, 8, generator=gen), torch.randn(1, 4, 5, 8, generator=gen)
    masks = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.float32)
    got = reference_attention_map(q, k, masks)
    want = torch.zeros(3, 7)
    for head in range(4):
        probs = torch.softmax(q[0, head] @ k[0, head].T / 8 ** 0.5, dim=-1)
        for cls in range(3):
            want[cls] += (probs * masks[cls]).sum(-1) / masks[cls].sum() / 4  # 2 groups of 2: the mean of 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_speaker_rope_moves_with_the_speaker_masks():
    model = random_model()
    x = inputs(speakers=2)
    masks = torch.zeros(3, 6, 6)
    masks[0, :, :3], masks[1, :, 3:] = 1, 1
    masks[2, :2] = 1
    call = dict(num_cond_latents=1, audio_embs=x["audio_embs"])
    timestep = torch.tensor([[0.0, 600.0, 600.0]])
    one = model(x["hidden_states"], timestep, x["encoder_hidden_states"], ref_target_masks=masks, **call)
    swapped = model(x["hidden_states"], timestep, x["encoder_hidden_states"], ref_target_masks=masks[[1, 0, 2]], **call)
    assert rel(one, swapped) > 1e-4
    with pytest.raises(LongcatError, match="num_cond_latents > 0"):
        model(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"],
              ref_target_masks=masks)


# ---- continuation with a reference latent ----------------------------------------------------------------


def test_masked_frame_range_matches_the_published_defaults():
    # ref_img_index 10, mask_frame_range 3, 5 conditioning latents (reference included), 20 noise latents:
    # the noise frames at RoPE positions 7..13 (noise frame i sits at 4 + i) lose the reference
    assert Reference(1, 10, 3).masked_noise_frames(5, 20) == (3, 10)
    assert Reference(1, 10, 0).masked_noise_frames(5, 20) is None
    assert Reference(1, 10, 3).masked_noise_frames(5, 9) is None  # out of range: no masking, as upstream
    with pytest.raises(LongcatError):
        Reference(None, None, 3).masked_noise_frames(5, 20)


def test_masked_noise_frames_do_not_see_the_reference_latent():
    # one block: a masked noise frame's tokens attend conditioning and noise keys only, and every other step acts
    # per token, so changing the reference latent leaves exactly those frames unchanged
    model = random_model(dict(CONFIG, depth=1))
    x = inputs(frames=7, audio_frames=6)
    timestep = torch.tensor([[0.0, 0.0, 0.0, 600.0, 600.0, 600.0, 600.0]])
    call = dict(num_cond_latents=3, num_ref_latents=1, ref_img_index=3, mask_frame_range=1,
                audio_embs=x["audio_embs"])
    assert Reference(1, 3, 1).masked_noise_frames(3, 4) == (0, 3)
    moved = x["hidden_states"].clone()
    moved[:, :, 0] += 1.0
    before = model(x["hidden_states"], timestep, x["encoder_hidden_states"], **call)
    after = model(moved, timestep, x["encoder_hidden_states"], **call)
    assert torch.equal(before[:, :, 3:6], after[:, :, 3:6])  # masked noise frames 0..2
    assert rel(after[:, :, 6], before[:, :, 6]) > 1e-4  # noise frame 3 still sees the reference


def test_kv_cache_equals_the_uncached_call_on_the_noise_frames():
    model = random_model()
    x = inputs(frames=7, audio_frames=6)
    call = dict(num_ref_latents=1, ref_img_index=3, mask_frame_range=1, audio_embs=x["audio_embs"])
    full = model(x["hidden_states"], torch.tensor([[0.0, 0.0, 0.0, 600.0, 600.0, 600.0, 600.0]]),
                 x["encoder_hidden_states"], num_cond_latents=3, **call)
    cache = model.build_kv_cache(x["hidden_states"][:, :, :3], 1, 3)
    cached = model(x["hidden_states"][:, :, 3:], x["timestep"], x["encoder_hidden_states"], kv_cache=cache, **call)
    assert rel(cached, full[:, :, 3:]) < 1e-5


# ---- INT8 --------------------------------------------------------------------------------------------------


def test_bf16_dequantisation_is_the_product_rounded_in_bf16():
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (6, 9), generator=gen, dtype=torch.int8)
    s = torch.rand(6, generator=gen) * 0.01
    # exact in float64 (8-bit × 8-bit significands), then one rounding to bf16
    want = (q.double() * s.to(torch.bfloat16).double()[:, None]).to(torch.bfloat16)
    assert torch.equal(dequantize(q, s, torch.bfloat16), want)
    assert torch.equal(dequantize(q, s, torch.float32), (q.double() * s.double()[:, None]).float())


def write_int8_folder(model: LongcatAvatarDiT, folder: Path) -> dict[str, torch.Tensor]:
    """Quantise every Linear but final_layer.linear (per-row symmetric, here in float64), write the INT8 folder, and
    return the float state the INT8 model must compute with: dequantised weights, bf16-rounded everything else."""
    state, effective = {}, {}
    linears = {role for role, slot in model.slots.items() if slot.kind == "linear"}
    for key, value in model.state_dict().items():
        module, part = key.rsplit(".", 1)
        if module in linears and module != "final_layer.linear":
            if part == "weight":
                w = value.double()
                scale = w.abs().amax(1) / 127
                q = torch.round(w / scale[:, None]).to(torch.int8)
                state[f"{module}.weight_int8"], state[f"{module}.weight_scale"] = q, scale.float()
                effective[key] = (q.double() * scale.float().double()[:, None]).float()
            else:
                state[key] = value.to(torch.bfloat16)
                effective[key] = state[key].float()
        else:
            state[key] = value.clone()
            effective[key] = value.to(torch.bfloat16).float()
    folder.mkdir()
    save_file(state, folder / "quantized_model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return effective


def test_int8_folder_computes_with_its_dequantised_weights(tmp_path: Path):
    model = random_model()
    effective = write_int8_folder(model, tmp_path / "int8")
    int8 = load_avatar_int8(tmp_path / "int8", torch.float32)
    assert "final_layer.linear" not in int8.int8_roles and "audio_proj.proj1" in int8.int8_roles
    assert len(int8.int8_roles) == 13 * CONFIG["depth"] + 9  # every Linear but final_layer.linear
    reference = LongcatAvatarDiT(CONFIG)
    reference.load_state_dict(effective)
    x = inputs()
    ours = int8(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"])
    want = reference(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"])
    assert rel(ours, want) < 1e-6
    bf16 = load_avatar_int8(tmp_path / "int8")
    assert bf16.dtype == torch.bfloat16
    out = bf16(x["hidden_states"], x["timestep"], x["encoder_hidden_states"], audio_embs=x["audio_embs"])
    assert rel(out, want) < 5e-2


def test_int8_folder_with_float_weights_is_refused(tmp_path: Path):
    model = random_model()
    write_int8_folder(model, tmp_path / "int8")
    state = load_file(tmp_path / "int8" / "quantized_model.safetensors")
    state["blocks.0.attn.qkv.weight_int8"] = state["blocks.0.attn.qkv.weight_int8"].float()
    save_file(state, tmp_path / "int8" / "quantized_model.safetensors")
    with pytest.raises(LongcatError, match="weight_int8 is F32"):
        load_avatar_int8(tmp_path / "int8")


# ---- loading a raw folder -------------------------------------------------------------------------------------


def test_raw_folder_round_trip_and_key_set_errors(tmp_path: Path):
    model = random_model()
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    loaded = load_avatar_dit(folder)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in state.items())
    del state["blocks.1.audio_cross_attn.kv_linear.bias"]
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(LongcatError, match="audio_cross_attn.kv_linear.bias"):
        load_avatar_dit(folder)
    (folder / "config.json").write_text(json.dumps(dict(CONFIG, audio_prenorm=False)))
    with pytest.raises(LongcatError, match="pre_audio_crs_attn_norm"):  # a prenorm checkpoint, a config without
        load_avatar_dit(folder)


# ---- forward parity through a name map ---------------------------------------------------------------------


def renamed_slots(config: dict, where: str = "config.json"):
    """A toy naming: audio_proj.* lives under audio_projection.*, every block's audio_cross_attn kv_linear is split
    into k and v row halves (the shape a FastVideo-style map gives fused projections)."""
    from dataclasses import replace

    slots = upstream_slots(config, where)
    for role, slot in slots.items():
        if role.startswith("audio_proj."):
            slots[role] = replace(slot, paths=("audio_projection." + role.split(".", 1)[1],))
        elif role.endswith("audio_cross_attn.kv_linear"):
            slots[role] = replace(slot, paths=(role[:-9] + "to_k", role[:-9] + "to_v"))
    return slots


def write_folder(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_forward_parity_through_a_name_map(tmp_path: Path):
    model = random_model()
    raw = write_folder(tmp_path / "raw", {k: v.clone() for k, v in model.state_dict().items()})
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith("audio_proj."):
            renamed["audio_projection." + key.split(".", 1)[1]] = value.clone()
        elif ".audio_cross_attn.kv_linear." in key:
            k, v = value.chunk(2)
            renamed[key.replace("kv_linear", "to_k")], renamed[key.replace("kv_linear", "to_v")] = k.clone(), v.clone()
        else:
            renamed[key] = value.clone()
    good = write_folder(tmp_path / "good", renamed)
    report = avatar_forward_parity(raw, good, renamed_slots)
    assert report["passed"] and [case["name"] for case in report["cases"]] == list(AVATAR_CASES)
    assert all(case["rel_l2"] == 0.0 for case in report["cases"])
    # k and v swapped: what a converter that splits the rows the wrong way round would write
    for key in [k for k in renamed if ".audio_cross_attn.to_k." in k]:
        other = key.replace("to_k", "to_v")
        renamed[key], renamed[other] = renamed[other], renamed[key]
    bad = write_folder(tmp_path / "bad", renamed)
    report = avatar_forward_parity(raw, bad, renamed_slots, cases=["at2v"])
    assert not report["passed"] and report["cases"][0]["rel_l2"] > 1e-3
    report = avatar_forward_parity(raw, raw, renamed_slots, cases=["at2v"])  # names that the folder does not hold
    assert not report["passed"] and "audio_projection" in report["cases"][0]["error"]


# ---- published sizes ---------------------------------------------------------------------------------------------


def published_v15_config(prenorm: bool) -> dict:
    return dict(in_channels=16, out_channels=16, hidden_size=4096, depth=48, num_heads=32, caption_channels=4096,
                mlp_ratio=4, adaln_tembed_dim=512, frequency_embedding_size=256, patch_size=[1, 2, 2],
                audio_window=5, audio_block=5, audio_channel=1280, intermediate_dim=512, output_dim=768,
                context_tokens=32, vae_scale=4, audio_prenorm=prenorm, class_range=24, class_interval=4)


def test_published_v15_key_set_and_sizes():
    # figures of the spec (specs/avatar.md §2, §4: upstream's own model counted on the meta device)
    from math import prod

    from longcat_reference.avatar import expected_shapes
    from longcat_reference.avatar.int8 import quantized_roles

    slots = upstream_slots(published_v15_config(False))
    shapes = expected_shapes(slots)
    assert len(shapes) == 1608 and sum(prod(shape) for shape in shapes.values()) == 15_852_916_800
    assert shapes["audio_proj.proj1.weight"] == (512, 32000) and shapes["audio_proj.proj1_vf.weight"] == (512, 51200)
    assert shapes["audio_proj.proj3.weight"] == (24576, 512)
    assert shapes["blocks.47.audio_cross_attn.kv_linear.weight"] == (8192, 768)
    assert len(quantized_roles(slots)) == 633
    assert len(expected_shapes(upstream_slots(published_v15_config(True)))) == 1704


@pytest.mark.parametrize("change", [dict(depth=100_000), dict(hidden_size=2**20, num_heads=2**10),
                                    dict(audio_channel=2**40), dict(context_tokens=0), dict(audio_prenorm="yes")])
def test_absurd_configs_are_refused_before_allocating(tmp_path: Path, change: dict):
    folder = write_folder(tmp_path / "dit", {k: v.clone() for k, v in random_model().state_dict().items()})
    (folder / "config.json").write_text(json.dumps(dict(CONFIG, **change)))
    with pytest.raises(LongcatError) as error:
        load_avatar_dit(folder)
    assert "config.json" in str(error.value.path) or "dit" in str(error.value.path)
