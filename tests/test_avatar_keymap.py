"""The avatar key map at full size, from headers of sparse files (no tensor data), against the key set and shapes
that the LongCat-Video-Avatar spec (shared/specs/avatar.md) §2 and §4 state (written out here, not taken from the map); and the INT8
arithmetic against an independent NumPy formula."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from longcat_convert.core import keymap
from longcat_convert.core.int8 import dequantize_rows, quantize_rows
from longcat_convert.core.io import DirectFiles, TensorEntry, encode_header
from longcat_convert.core.shard_folder import FolderRules, scan_shard_folder

BASE_CONFIG = {"in_channels": 16, "out_channels": 16, "hidden_size": 4096, "depth": 48, "num_heads": 32,
               "caption_channels": 4096, "mlp_ratio": 4, "adaln_tembed_dim": 512, "frequency_embedding_size": 256,
               "patch_size": [1, 2, 2]}
V15 = {**BASE_CONFIG, "_class_name": "LongCatVideoAvatarTransformer3DModel", "audio_window": 5, "audio_block": 5,
       "audio_channel": 1280, "intermediate_dim": 512, "output_dim": 768, "context_tokens": 32, "vae_scale": 4,
       "audio_prenorm": False, "class_range": 24, "class_interval": 4}


def spec_audio_keys(c: dict) -> dict[str, tuple[int, ...]]:
    """avatar.md §2's new keys, with its shape formulas."""
    H, A, d = c["hidden_size"], c["adaln_tembed_dim"], c["hidden_size"] // c["num_heads"]
    W, S, C_a, I_, D_a, K, V = (c[k] for k in ("audio_window", "audio_block", "audio_channel", "intermediate_dim",
                                              "output_dim", "context_tokens", "vae_scale"))
    block = {"audio_adaLN_modulation.1.weight": (3 * H, A), "audio_adaLN_modulation.1.bias": (3 * H,),
             "pre_video_crs_attn_norm.weight": (H,), "pre_video_crs_attn_norm.bias": (H,),
             "audio_cross_attn.q_linear.weight": (H, H), "audio_cross_attn.q_linear.bias": (H,),
             "audio_cross_attn.kv_linear.weight": (2 * H, D_a), "audio_cross_attn.kv_linear.bias": (2 * H,),
             "audio_cross_attn.proj.weight": (H, H), "audio_cross_attn.proj.bias": (H,),
             "audio_cross_attn.q_norm.weight": (d,), "audio_cross_attn.k_norm.weight": (d,)}
    if c["audio_prenorm"]:
        block |= {"pre_audio_crs_attn_norm.weight": (D_a,), "pre_audio_crs_attn_norm.bias": (D_a,)}
    keys = {f"blocks.{i}.{name}": shape for i in range(c["depth"]) for name, shape in block.items()}
    keys |= {"audio_proj.proj1.weight": (I_, W * S * C_a), "audio_proj.proj1.bias": (I_,),
             "audio_proj.proj1_vf.weight": (I_, (W + V - 1) * S * C_a), "audio_proj.proj1_vf.bias": (I_,),
             "audio_proj.proj2.weight": (I_, I_), "audio_proj.proj2.bias": (I_,),
             "audio_proj.proj3.weight": (K * D_a, I_), "audio_proj.proj3.bias": (K * D_a,),
             "audio_proj.norm.weight": (D_a,), "audio_proj.norm.bias": (D_a,)}
    return keys


def write_sparse_shards(folder: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
                        per_shard: int = 400) -> None:
    """Real safetensors headers over holes: full-size files that take no disk space."""
    folder.mkdir(parents=True)
    names = list(shapes)
    groups = [names[n:n + per_shard] for n in range(0, len(names), per_shard)]
    for number, group in enumerate(groups, start=1):
        entries = [TensorEntry(k, dtypes[k], shapes[k]) for k in group]
        path = folder / f"diffusion_pytorch_model-{number:05d}-of-{len(groups):05d}.safetensors"
        header = encode_header(entries)
        with open(path, "wb") as handle:
            handle.write(header)
        os.truncate(path, len(header) + sum(e.nbytes for e in entries))


def found_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    scan = scan_shard_folder(folder, FolderRules("diffusion_pytorch_model", names_matter=False), DirectFiles())
    assert not [p for p in scan.problems if p.severity == "error"], scan.problems
    return {key: info.shape for key, (_, info) in scan.located.items()}


@pytest.mark.parametrize("prenorm, count", [(False, 1608), (True, 1704)])
def test_full_size_avatar_tree_matches_the_map_from_headers(tmp_path: Path, prenorm: bool, count: int) -> None:
    config = {**V15, "audio_prenorm": prenorm}
    base = keymap.expand(BASE_CONFIG).expected_shapes("upstream")
    on_disk = {**base, **spec_audio_keys(config)}
    assert len(on_disk) == count
    write_sparse_shards(tmp_path / "base_model", on_disk, dict.fromkeys(on_disk, "BF16"))
    assert sum(p.stat().st_blocks for p in (tmp_path / "base_model").iterdir()) * 512 < 2**20  # sparse indeed
    expanded = keymap.expand(config)
    assert expanded.family == keymap.AVATAR_FAMILY
    mismatch = keymap.compare_key_sets(found_shapes(tmp_path / "base_model"), expanded.expected_shapes("upstream"))
    assert not mismatch, mismatch.describe()
    assert keymap.implied_size(config) == (count, expanded.num_params)
    if not prenorm:  # avatar.md §2: 15,852,916,800 parameters (base 13,581,071,424 + 48·46,174,464 + 55,471,104)
        assert expanded.num_params == 15_852_916_800 == 13_581_071_424 + 48 * 46_174_464 + 55_471_104


def test_v10_sized_model_parameter_count() -> None:
    """avatar.md §2: a wav2vec2-base-sized model (S=12, C_a=768) has 15,871,660,096 parameters."""
    config = {**V15, "audio_block": 12, "audio_channel": 768}
    shapes = keymap.expand(config).expected_shapes("upstream")
    assert shapes["audio_proj.proj1.weight"] == (512, 46080)
    assert shapes["audio_proj.proj1_vf.weight"] == (512, 73728)
    assert sum(math.prod(s) for s in shapes.values()) == 15_871_660_096


def test_shared_modules_keep_the_base_rules_in_both_namings() -> None:
    base = keymap.expand(BASE_CONFIG)
    avatar = keymap.expand(V15)
    avatar_rules = {rule.upstream: rule for rule in avatar.params}
    for rule in base.params:
        assert avatar_rules[rule.upstream] == rule
    assert avatar.drops == base.drops


def test_fastvideo_names_are_a_bijection_and_split_fused_projections() -> None:
    expanded = keymap.expand({**V15, "audio_prenorm": True, "depth": 2})
    upstream, fastvideo = expanded.expected_shapes("upstream"), expanded.expected_shapes("fastvideo")
    assert len(set(fastvideo)) == len(fastvideo)
    kv = "blocks.1.audio_cross_attn.kv_linear.weight"
    assert fastvideo["blocks.1.audio_cross_attn.to_k.weight"] == fastvideo["blocks.1.audio_cross_attn.to_v.weight"]
    assert fastvideo["blocks.1.audio_cross_attn.to_k.weight"][0] * 2 == upstream[kv][0]
    assert sum(map(math.prod, fastvideo.values())) == sum(map(math.prod, upstream.values()))
    assert "audio_embedder.linear_1_vf.weight" in fastvideo and "blocks.0.norm_audio_tokens.bias" in fastvideo
    config = keymap.convert_config(V15, "upstream", "fastvideo")
    assert config["_class_name"] == keymap.class_name("fastvideo", keymap.AVATAR_FAMILY)
    assert keymap.expand(config, "fastvideo").expected_shapes("fastvideo") == \
        keymap.expand(V15).expected_shapes("fastvideo")


def test_family_detection_and_flag_errors() -> None:
    no_class = {k: v for k, v in V15.items() if k != "_class_name"}
    assert keymap.family_of(no_class) == keymap.AVATAR_FAMILY
    assert keymap.family_of(BASE_CONFIG) == keymap.BASE_FAMILY
    assert keymap.family_of({**BASE_CONFIG, "_class_name": "LongCatVideoTransformer3DModel"}) == keymap.BASE_FAMILY
    with pytest.raises(keymap.LongcatError, match="audio_prenorm"):
        keymap.expand({**V15, "audio_prenorm": "yes"})
    with pytest.raises(keymap.LongcatError, match="audio_window"):
        keymap.expand({**V15, "audio_window": 0})


def test_int8_key_set_at_full_size(tmp_path: Path) -> None:
    """avatar.md §4: 633 quantised Linears (13 per block + 9), 2241 tensors, 15,880,145,024 data bytes."""
    expanded = keymap.expand(V15)
    quantized = keymap.quantized_modules(expanded)
    assert len(quantized) == 48 * 13 + 9 and "final_layer.linear" not in quantized
    expected = keymap.int8_expected(expanded)
    assert len(expected) == 2241
    size = {"int8": 1, "float32": 4, "bfloat16": 2, None: 2}  # unquantised tensors are bf16 as published
    assert sum(math.prod(t.shape) * size[t.dtype] for t in expected.values()) == 15_880_145_024
    assert expected["blocks.3.audio_cross_attn.kv_linear.weight_int8"] == keymap.StoredTensor((8192, 768), "int8")
    assert expected["blocks.3.audio_cross_attn.kv_linear.weight_scale"] == keymap.StoredTensor((8192,), "float32")
    assert expected["final_layer.linear.weight"].dtype is None
    assert "blocks.0.ffn.w1.bias" not in expected


def reference_quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avatar.md §4 in NumPy float32: s = max(max|row|, 1e-8)/127; q = clamp(rint(w/s), -128, 127)."""
    w = weight.astype(np.float32)
    scale = (np.maximum(np.abs(w).max(axis=1), np.float32(1e-8)) / np.float32(127)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -128, 127).astype(np.int8)
    return q, scale


def test_quantize_rows_matches_the_formula_bitwise() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 48, generator=gen) * torch.logspace(-6, 2, 64).unsqueeze(1)
    weight[3] = 0  # all-zero row: the scale floor
    weight[4, :6] = torch.tensor([1.0, -1.0, 0.5 / 127, 1.5 / 127, -2.5 / 127, 126.5 / 127])  # ties: half to even
    for dtype in (torch.float32, torch.bfloat16):
        q, scale = quantize_rows(weight.to(dtype))
        q_ref, scale_ref = reference_quantize(weight.to(dtype).float().numpy())
        assert q.dtype == torch.int8 and scale.dtype == torch.float32
        assert np.array_equal(q.numpy(), q_ref) and np.array_equal(scale.numpy().view(np.uint32),
                                                                   scale_ref.view(np.uint32))
        assert not (q == -128).any() and bool((scale > 0).all())


def test_dequantize_rounds_like_the_input_dtype() -> None:
    q, scale = quantize_rows(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))
    exact = q.double() * scale.double().unsqueeze(1)  # q·s of two fp32 values is exact in float64
    assert torch.equal(dequantize_rows(q, scale, torch.float32), exact.float())
    # bf16: both factors rounded to bf16 (q ≤ 127 is exact), their product rounded to bf16
    bf16_ref = (q.double() * scale.bfloat16().double().unsqueeze(1)).bfloat16()
    assert torch.equal(dequantize_rows(q, scale, torch.bfloat16), bf16_ref)
