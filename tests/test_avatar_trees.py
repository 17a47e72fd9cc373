"""Tiny LongCat-Video-Avatar trees (`tiny --variant avatar-v1.0|avatar-v1.5`) and `validate` on them: what the
published trees hold (avatar.md §1), upstream's constructor fields, the INT8 folder against an independent
formula, and the findings for damaged trees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_convert.core import keymap
from longcat_convert.core.io import read_header
from longcat_convert.core.io.pickles import sniff_pickle
from longcat_convert.core.lora_format import parse
from longcat_convert.tiny_avatar import build_tiny_avatar
from longcat_convert.validation.run import validate_tree
from tests.helpers import bitwise_equal, load_folder, run_cli
from tests.test_avatar_keymap import reference_quantize

# upstream LongCatVideoAvatarTransformer3DModel.__init__ arguments (avatar.md §2 and weights.md §3.2)
CONSTRUCTOR = {"in_channels", "out_channels", "hidden_size", "depth", "num_heads", "caption_channels", "mlp_ratio",
               "adaln_tembed_dim", "frequency_embedding_size", "patch_size", "enable_flashattn3", "enable_flashattn2",
               "enable_xformers", "enable_bsa", "bsa_params", "cp_split_hw", "text_tokens_zero_pad", "audio_window",
               "audio_block", "audio_channel", "intermediate_dim", "output_dim", "context_tokens", "vae_scale",
               "audio_prenorm", "class_range", "class_interval"}
PUBLISHED_EXTRA = {"_class_name", "_diffusers_version", "architectures", "model_max_length"}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("avatar")
    return {variant: build_tiny_avatar(root / variant, variant, seed=3) for variant in ("avatar-v1.0", "avatar-v1.5")}


def errors(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["severity"] == "error"]


def test_tiny_v15_tree_holds_what_the_published_one_does(trees: dict[str, Path]) -> None:
    tree = trees["avatar-v1.5"]
    assert sorted(p.name for p in tree.iterdir()) == ["base_model", "base_model_int8", "config.json", "lora",
                                                      "scheduler", "whisper-large-v3"]
    assert {p.name for p in (tree.parent / "LongCat-Video").iterdir()} >= {"tokenizer", "text_encoder", "vae", "dit"}
    config = json.loads((tree / "base_model" / "config.json").read_text())
    assert set(config) == CONSTRUCTOR | PUBLISHED_EXTRA
    assert config["_class_name"] == "LongCatVideoAvatarTransformer3DModel" and config["audio_block"] == 5
    assert json.loads((tree / "base_model_int8" / "config.json").read_text()) == config
    assert json.loads((tree / "scheduler" / "scheduler_config.json").read_text())["shift"] == 7.0
    whisper = json.loads((tree / "whisper-large-v3" / "config.json").read_text())
    assert whisper["encoder_layers"] == 32 and whisper["d_model"] == config["audio_channel"]
    assert json.loads((tree / "whisper-large-v3" / "preprocessor_config.json").read_text())["feature_size"] == 128
    lora = parse(read_header(tree / "lora" / "dmd_lora.safetensors"))
    assert lora.format == "upstream" and not lora.problems
    assert {m.rank for m in lora.modules.values()} == {128} and set(lora.alphas.values()) == {0.5}
    assert set(lora.modules) <= set(keymap.expand(config).linears)
    report = validate_tree(tree)
    assert report["valid"] and report["layout"]["name"] == "avatar-v1.5", errors(report)


def test_tiny_int8_folder_is_the_quantized_base_model(trees: dict[str, Path]) -> None:
    tree = trees["avatar-v1.5"]
    base, stored = load_folder(tree / "base_model"), load_folder(tree / "base_model_int8")
    assert json.loads((tree / "base_model_int8" / "quantized_model.safetensors.index.json").read_text())["weight_map"]
    quantized = {key.removesuffix(".weight_int8") for key in stored if key.endswith(".weight_int8")}
    assert "final_layer.linear" not in quantized and "final_layer.linear.weight" in stored
    assert len(stored) == len(base) + len(quantized)
    for module in quantized:
        q, scale = reference_quantize(base[f"{module}.weight"].numpy())
        assert np.array_equal(stored[f"{module}.weight_int8"].numpy(), q)
        assert np.array_equal(stored[f"{module}.weight_scale"].numpy().view(np.uint32), scale.view(np.uint32))
        if f"{module}.bias" in base:
            assert torch.equal(stored[f"{module}.bias"], base[f"{module}.bias"].bfloat16())
    others = [k for k in stored if not k.endswith(("weight_int8", "weight_scale")) and k.rsplit(".", 1)[0]
              not in quantized]
    assert all(torch.equal(stored[k], base[k].bfloat16()) for k in others)


def test_tiny_v10_tree_and_its_audio_encoder(trees: dict[str, Path]) -> None:
    tree = trees["avatar-v1.0"]
    assert sorted(p.name for p in tree.iterdir()) == ["avatar_multi", "avatar_single", "chinese-wav2vec2-base"]
    single, multi = load_folder(tree / "avatar_single"), load_folder(tree / "avatar_multi")
    assert single.keys() == multi.keys() and not torch.equal(single["audio_proj.proj1.weight"],
                                                              multi["audio_proj.proj1.weight"])
    config = json.loads((tree / "avatar_single" / "config.json").read_text())
    encoder = json.loads((tree / "chinese-wav2vec2-base" / "config.json").read_text())
    assert encoder["num_hidden_layers"] == config["audio_block"] == 12
    assert encoder["hidden_size"] == config["audio_channel"]
    assert sniff_pickle(tree / "chinese-wav2vec2-base" / "pytorch_model.bin") is not None  # never unpickled here
    assert "encoder.layers.11.attention.q_proj.weight" in load_file(tree / "chinese-wav2vec2-base" / "model.safetensors")
    report = validate_tree(tree)
    assert report["valid"] and report["layout"]["name"] == "avatar-v1.0", errors(report)
    assert [f["kind"] for f in report["findings"] if f["severity"] == "warning"] == ["pickle_file"]


@pytest.fixture
def v15_copy(trees: dict[str, Path], tmp_path: Path) -> Path:
    shutil.copytree(trees["avatar-v1.5"].parent, tmp_path / "t")
    return tmp_path / "t" / trees["avatar-v1.5"].name


def _shard_of(folder: Path, key: str) -> Path:
    index = next(folder.glob("*.index.json"))
    return folder / json.loads(index.read_text())["weight_map"][key]


def _rewrite_shard(folder: Path, key: str, change) -> None:
    """Load the shard holding `key`, let `change` edit its dict, save it and re-point the index."""
    shard = _shard_of(folder, key)
    state = load_file(shard)
    change(state)
    save_file(state, shard)
    index_path = next(folder.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in state or v != shard.name}
    index["weight_map"].update(dict.fromkeys(state, shard.name))
    index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in load_folder(folder).values())
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("value, kind", [(0.0, "int8_scale"), (-1.0, "int8_scale"), (float("nan"), "nan_inf"),
                                         (float("inf"), "nan_inf")])
def test_validate_rejects_bad_int8_scales(v15_copy: Path, value: float, kind: str) -> None:
    key = "blocks.1.attn.qkv.weight_scale"

    def poison(state: dict) -> None:
        state[key] = state[key].clone()
        state[key][3] = value

    _rewrite_shard(v15_copy / "base_model_int8", key, poison)
    found = [(f["kind"], f.get("key")) for f in errors(validate_tree(v15_copy))]
    assert found == [(kind, key)]


def test_validate_rejects_a_float_weight_where_int8_is_expected(v15_copy: Path) -> None:
    module = "blocks.0.audio_cross_attn.kv_linear"

    def dequantized(state: dict) -> None:
        q, scale = state.pop(f"{module}.weight_int8"), state.pop(f"{module}.weight_scale")
        state[f"{module}.weight"] = (q.float() * scale.unsqueeze(1)).bfloat16()

    _rewrite_shard(v15_copy / "base_model_int8", f"{module}.weight_int8", dequantized)
    report = validate_tree(v15_copy)
    kinds = sorted((f["kind"], f.get("key")) for f in errors(report))
    assert kinds == [("missing_key", f"{module}.weight_int8"), ("missing_key", f"{module}.weight_scale"),
                     ("unexpected_key", f"{module}.weight")]
    assert "a float weight where the INT8 format stores" in next(f["message"] for f in errors(report)
                                                                 if f["kind"] == "unexpected_key")


def test_validate_rejects_int8_dtypes_and_a_quantized_final_linear(v15_copy: Path) -> None:
    def retype(state: dict) -> None:
        state["blocks.1.ffn.w2.weight_int8"] = state["blocks.1.ffn.w2.weight_int8"].to(torch.int16)
    _rewrite_shard(v15_copy / "base_model_int8", "blocks.1.ffn.w2.weight_int8", retype)

    def quantize_final(state: dict) -> None:
        weight = state.pop("final_layer.linear.weight").float()
        state["final_layer.linear.weight_int8"] = torch.zeros(weight.shape, dtype=torch.int8)
        state["final_layer.linear.weight_scale"] = torch.ones(weight.shape[0])
    _rewrite_shard(v15_copy / "base_model_int8", "final_layer.linear.weight", quantize_final)
    found = sorted((f["kind"], f.get("key")) for f in errors(validate_tree(v15_copy)))
    assert found == [("dtype_mismatch", "blocks.1.ffn.w2.weight_int8"),
                     ("missing_key", "final_layer.linear.weight"),
                     ("unexpected_key", "final_layer.linear.weight_int8"),
                     ("unexpected_key", "final_layer.linear.weight_scale")]


def test_validate_checks_audio_encoder_prenorm_and_sibling(v15_copy: Path) -> None:
    whisper = v15_copy / "whisper-large-v3" / "config.json"
    document = json.loads(whisper.read_text())
    whisper.write_text(json.dumps({**document, "d_model": 64, "encoder_layers": 24}))
    for folder in ("base_model", "base_model_int8"):
        path = v15_copy / folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "audio_prenorm": True}))
    shutil.rmtree(v15_copy.parent / "LongCat-Video")
    report = validate_tree(v15_copy)
    by_component = {(f["component"], f["kind"]) for f in errors(report)}
    assert ("audio_encoder", "config_rule") in by_component  # d_model vs audio_channel, 24 != 32 layers
    messages = [f["message"] for f in errors(report) if f["component"] == "audio_encoder"]
    assert sorted(messages) == ["d_model is 64, expected 32 (audio_channel of base_model/config.json)",
                                "encoder_layers is 24, expected 32",
                                "holds 32 encoder layers, but encoder_layers is 24"]
    prenorm = [f for f in errors(report) if f["kind"] == "missing_key" and "pre_audio_crs_attn_norm" in f.get("key", "")]
    assert len(prenorm) == 2 * 2 * 2  # 2 blocks × weight/bias × both DiT folders
    assert ("sibling", "missing_component") in by_component


def convert(src: Path, dst: Path, *options: str) -> Path:
    result = run_cli("convert", src, dst, "-q", *options)
    assert result.exit_code == 0, result.output
    return dst


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)


def files_below(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_v15_converts_to_a_standalone_diffusers_tree_and_back(trees: dict[str, Path], tmp_path: Path) -> None:
    src = trees["avatar-v1.5"]
    dif = convert(src, tmp_path / "dif", "--to", "diffusers")
    index = json.loads((dif / "model_index.json").read_text())
    assert index["_class_name"] == "LongCatVideoAvatarPipeline"
    assert index["transformer"] == ["longcat_video", "LongCatVideoAvatarTransformer3DModel"]
    assert all((dif / name).is_dir() for name, value in index.items() if isinstance(value, list))
    for name in ("tokenizer", "text_encoder", "vae"):  # from ../LongCat-Video, byte for byte
        assert files_below(dif / name) == files_below(src.parent / "LongCat-Video" / name)
    assert files_below(dif / "audio_encoder") == files_below(src / "whisper-large-v3")
    assert files_below(dif / "scheduler") == files_below(src / "scheduler")  # 1.5's own, shift 7
    assert same_tensors(load_folder(dif / "transformer"), load_folder(src / "base_model"))
    assert (dif / "lora" / "dmd_lora.safetensors").read_bytes() == (src / "lora" / "dmd_lora.safetensors").read_bytes()
    alone = Path(shutil.move(dif, tmp_path / "elsewhere" / "x"))  # no ../LongCat-Video next to it any more
    report = validate_tree(alone)
    assert report["valid"] and report["layout"]["name"] == "avatar-diffusers", errors(report)
    back = convert(alone, tmp_path / "back", "--to", "raw")
    assert validate_tree(back)["valid"]
    assert same_tensors(load_folder(back / "base_model"), load_folder(src / "base_model"))
    assert files_below(back / "whisper-large-v3") == files_below(src / "whisper-large-v3")
    assert files_below(back / "base_model_int8") == files_below(src / "base_model_int8")


def test_v15_fastvideo_round_trip_is_bit_exact(trees: dict[str, Path], tmp_path: Path) -> None:
    src = trees["avatar-v1.5"]
    fv = convert(src, tmp_path / "fv", "--to", "fastvideo")
    assert json.loads((fv / "model_index.json").read_text())["_class_name"] == "LongCatAvatarPipeline"
    config = json.loads((fv / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "LongCatAvatarTransformer3DModel" and "num_attention_heads" in config
    weights, base = load_folder(fv / "transformer"), load_folder(src / "base_model")
    kv = base["blocks.1.audio_cross_attn.kv_linear.weight"]
    assert torch.equal(torch.cat([weights["blocks.1.audio_cross_attn.to_k.weight"],
                                  weights["blocks.1.audio_cross_attn.to_v.weight"]]), kv)
    assert torch.equal(weights["audio_embedder.linear_1_vf.weight"], base["audio_proj.proj1_vf.weight"])
    assert (fv / "lora" / "distilled" / "dmd_lora.safetensors").is_file()
    assert validate_tree(fv)["valid"]
    back = convert(fv, tmp_path / "back", "--to", "raw")
    assert same_tensors(load_folder(back / "base_model"), base)
    assert same_tensors(load_folder(back / "lora"), load_folder(src / "lora"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_from_int8_dequantizes_as_upstream_computes(trees: dict[str, Path], tmp_path: Path, dtype: str) -> None:
    src = trees["avatar-v1.5"]
    out = convert(src, tmp_path / "d", "--to", "diffusers", "--from-int8", "--dtype", dtype)
    written, stored = load_folder(out / "transformer"), load_folder(src / "base_model_int8")
    assert not (out / "base_model").exists() and validate_tree(out)["valid"]
    target = getattr(torch, dtype)
    for key, value in written.items():
        module = key.removesuffix(".weight")
        if f"{module}.weight_int8" in stored:  # τ(q)·τ(s), rounded to τ: exact in float64 first
            q, scale = stored[f"{module}.weight_int8"], stored[f"{module}.weight_scale"]
            expected = (q.double() * scale.to(target).double().unsqueeze(1)).to(target)
        else:
            expected = stored[key].to(target)
        assert bitwise_equal(value, expected), key
    refused = run_cli("convert", src, tmp_path / "x", "--to", "diffusers", "--from-int8")
    assert refused.exit_code == 2 and "--dtype float32 or --dtype bfloat16" in refused.output


def test_to_int8_writes_what_upstreams_quantizer_writes(trees: dict[str, Path], tmp_path: Path) -> None:
    src = trees["avatar-v1.5"]
    out = convert(src, tmp_path / "q", "--to", "raw", "--to-int8")
    written, tiny = load_folder(out / "base_model_int8"), load_folder(src / "base_model_int8")
    assert written.keys() == tiny.keys() and not (out / "base_model").exists()
    quantized = {k.removesuffix(".weight_int8") for k in tiny if k.endswith(".weight_int8")}
    int8_keys = [k for k in tiny if k.endswith((".weight_int8", ".weight_scale")) or k.removesuffix(".bias") in quantized]
    assert all(bitwise_equal(written[k], tiny[k]) for k in int8_keys)  # the tiny writer, checked against upstream
    assert json.loads((out / "base_model_int8" / "quantized_model.safetensors.index.json").read_text())["weight_map"]
    assert validate_tree(out)["valid"]
    fv = convert(src, tmp_path / "fv", "--to", "fastvideo")
    from_bf16 = load_folder(convert(fv, tmp_path / "q16", "--to", "raw", "--to-int8", "--dtype", "bfloat16")
                            / "base_model_int8")
    base = load_folder(src / "base_model")
    for module in quantized:
        q, scale = reference_quantize(base[f"{module}.weight"].bfloat16().float().numpy())
        assert np.array_equal(from_bf16[f"{module}.weight_int8"].numpy(), q)
        assert np.array_equal(from_bf16[f"{module}.weight_scale"].numpy().view(np.uint32), scale.view(np.uint32))
    assert from_bf16["final_layer.linear.weight"].dtype == torch.bfloat16
    refused = run_cli("convert", src, tmp_path / "x", "--to", "diffusers", "--to-int8")
    assert refused.exit_code == 2 and not (tmp_path / "x").exists()


def test_tiny_help_lists_the_avatar_variants() -> None:
    result = run_cli("tiny", "--help")
    assert result.exit_code == 0 and "avatar-v1.0" in result.output and "avatar-v1.5" in result.output


def test_v10_converts_both_dits_and_back_without_the_pickle(trees: dict[str, Path], tmp_path: Path) -> None:
    src = trees["avatar-v1.0"]
    fv = convert(src, tmp_path / "fv", "--to", "fastvideo")
    index = json.loads((fv / "model_index.json").read_text())
    assert index["transformer_multi"] == ["diffusers", "LongCatAvatarTransformer3DModel"]
    assert not (fv / "audio_encoder" / "pytorch_model.bin").exists()  # a pickle: never opened, not copied
    assert files_below(fv / "scheduler") == files_below(src.parent / "LongCat-Video" / "scheduler")  # 1.0: shift 12
    report = validate_tree(fv)
    assert report["valid"] and "transformer_multi" in report["components"], errors(report)
    back = convert(fv, tmp_path / "back", "--to", "raw")
    for folder in ("avatar_single", "avatar_multi"):
        assert same_tensors(load_folder(back / folder), load_folder(src / folder))
    assert validate_tree(back)["valid"]
    refused = run_cli("convert", src, tmp_path / "x", "--to", "raw", "--to-int8")
    assert refused.exit_code == 2 and not (tmp_path / "x").exists()
