"""A corpus of broken trees, one defect each, built at test time from the tiny tree (and its conversions).

Every case runs the real CLI and must give the expected exit code (1: findings, 2: unreadable input), a
one-line message naming the file and the defect, and no traceback. Pickles are armed: unpickling one
would create a marker file, which must never appear.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_convert.core.jsonschemas import schema_errors
from longcat_convert.core.lora_format import encode_module
from tests.test_validate_helpers import (
    converted,
    dit_shards,
    edit_index,
    edit_json,
    header_bytes,
    replace_header,
    rewrite,
    shard_of,
    sync_total_size,
    validate_cli,
)

MARKER = "unpickled-marker"
INDEX = "dit/diffusion_pytorch_model.safetensors.index.json"


class _Bomb:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def armed_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weight": _Bomb(marker)})


@pytest.fixture(scope="module")
def trees(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("corpus-bases")
    return {layout: converted(tiny_raw, base / layout, layout) for layout in ("raw", "fastvideo", "diffusers")}


@dataclass(frozen=True)
class Defect:
    name: str
    damage: Callable[[Path, Path, dict[str, Path]], None]  # (tree, scratch folder, pristine trees)
    exit_code: int
    file: str  # appears in the message line
    says: str  # and so does this description of the defect
    base: str = "raw"
    args: tuple[str, ...] = ()


# --- damage functions -----------------------------------------------------------------------------------------


def truncate_shard(tree: Path, *_) -> None:
    path = dit_shards(tree)[2]
    os.truncate(path, path.stat().st_size - 100)


def header_length_past_end(tree: Path, *_) -> None:
    path = dit_shards(tree)[0]
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])


def garbage_header(tree: Path, *_) -> None:
    path = dit_shards(tree)[1]
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"\xff" * length + data[8 + length:])


def overlapping_offsets(tree: Path, *_) -> None:
    path = dit_shards(tree)[1]
    _, header = header_bytes(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]], header[names[1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    replace_header(path, header)


def delete_shard(tree: Path, *_) -> None:
    dit_shards(tree)[1].unlink()


def index_points_to_wrong_shard(tree: Path, *_) -> None:
    edit_index(tree, lambda d: d["weight_map"].update({"final_layer.linear.weight": dit_shards(tree)[0].name}))


def add_stray_key(tree: Path, *_) -> None:
    path = dit_shards(tree)[0]
    rewrite(path, lambda s: s.update({"blocks.0.attn.extra.weight": torch.zeros(4)}))
    edit_index(tree, lambda d: d["weight_map"].update({"blocks.0.attn.extra.weight": path.name}))
    sync_total_size(tree)


def wrong_shape(tree: Path, *_) -> None:
    rewrite(shard_of(tree, "blocks.1.attn.q_norm.weight"), lambda s: s.update({"blocks.1.attn.q_norm.weight": torch.ones(32)}))
    sync_total_size(tree)


def wrong_dtype(tree: Path, *_) -> None:
    key = "blocks.0.ffn.w1.weight"
    rewrite(shard_of(tree, key), lambda s: s.update({key: s[key].half()}))
    sync_total_size(tree)


def dit_config(edit: Callable[[dict], None], folder: str = "dit") -> Callable:
    return lambda tree, *_: edit_json(tree / folder / "config.json", edit)


def lora_edit(edit: Callable[[dict], None], adapter: str = "lora/cfg_step_lora.safetensors") -> Callable:
    return lambda tree, *_: rewrite(tree / adapter, edit)


PROJ = encode_module("blocks.0.attn.proj")
FFN_W2 = encode_module("blocks.0.ffn.w2")


def lora_unknown_module(state: dict) -> None:
    name = encode_module("blocks.0.attn.nonexistent")
    state.update({f"{name}.lora_down.weight": torch.zeros(8, 128), f"{name}.lora_up.weight": torch.zeros(128, 8),
                  f"{name}.alpha_scale": torch.tensor(0.5)})


def lora_other_rank(state: dict) -> None:
    state.update({f"{PROJ}.lora_down.weight": torch.zeros(4, 128), f"{PROJ}.lora_up.weight": torch.zeros(128, 4)})


def lora_wrong_in_features(state: dict) -> None:
    state[f"{FFN_W2}.lora_down.weight"] = torch.zeros(8, 500)


def weight_map_to(target: str) -> Callable:
    return lambda tree, *_: edit_index(tree, lambda d: d["weight_map"].update({"blocks.0.attn.proj.weight": target}))


def symlink_loop(tree: Path, *_) -> None:
    os.symlink("loop_b.safetensors", tree / "dit" / "loop_a.safetensors")
    os.symlink("loop_a.safetensors", tree / "dit" / "loop_b.safetensors")


def symlink_outside(tree: Path, scratch: Path, *_) -> None:
    outside = scratch / "outside.safetensors"
    shutil.copy(tree / "vae" / "diffusion_pytorch_model.safetensors", outside)
    (tree / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    os.symlink(outside, tree / "vae" / "diffusion_pytorch_model.safetensors")


def dangling_symlink(tree: Path, *_) -> None:
    os.symlink("gone.safetensors", tree / "vae" / "diffusion_pytorch_model-extra.safetensors")


def empty_shard(tree: Path, *_) -> None:
    os.truncate(dit_shards(tree)[3], 0)


def empty_directory(tree: Path, *_) -> None:
    shutil.rmtree(tree)
    tree.mkdir()


def not_a_directory(tree: Path, *_) -> None:
    shutil.rmtree(tree)
    tree.write_text("not a tree\n")


def no_layout(tree: Path, *_) -> None:
    shutil.rmtree(tree)
    tree.mkdir()
    (tree / "README.md").write_text("weights go here\n")


def pickle_instead_of_safetensors(tree: Path, scratch: Path, *_) -> None:
    (tree / "text_encoder" / "model.safetensors").unlink()
    (tree / "text_encoder" / "pytorch_model.bin").write_bytes(armed_pickle(scratch / MARKER))


def pickle_named_safetensors(tree: Path, scratch: Path, *_) -> None:
    dit_shards(tree)[0].write_bytes(armed_pickle(scratch / MARKER))


def pickle_lora(tree: Path, scratch: Path, *_) -> None:
    torch.save({"weight": _Bomb(scratch / MARKER)}, tree / "lora" / "extra_lora.pt")


def duplicate_key(tree: Path, *_) -> None:
    key = "blocks.0.attn.proj.bias"
    source = shard_of(tree, key)
    value = load_file(source)[key]
    other = next(p for p in dit_shards(tree) if p != source)
    rewrite(other, lambda s: s.update({key: value}))
    sync_total_size(tree)


def unindexed_shard(tree: Path, *_) -> None:
    save_file({"blocks.0.attn.proj.weight": torch.zeros(128, 128)}, tree / "dit" / "diffusion_pytorch_model-extra.safetensors")


def wrong_total_size(tree: Path, *_) -> None:
    edit_index(tree, lambda d: d["metadata"].update(total_size=d["metadata"]["total_size"] + 4))


def shrink_vae_z_dim(config: dict) -> None:
    config.update(z_dim=8, latents_mean=config["latents_mean"][:8], latents_std=config["latents_std"][:8])


def set_fastvideo_alpha(tree: Path, *_) -> None:
    path = tree / "lora" / "distilled" / "cfg_step_lora.safetensors"
    rewrite(path, lambda s: s.update({"blocks.0.self_attn.to_out.lora_alpha": torch.tensor(2.5)}))


def upstream_lora_in_fastvideo_tree(tree: Path, scratch: Path, trees: dict[str, Path]) -> None:
    shutil.copy(trees["raw"] / "lora" / "cfg_step_lora.safetensors", tree / "lora" / "distilled" / "cfg_step_lora.safetensors")


def fastvideo_keys_in_diffusers_tree(tree: Path, scratch: Path, trees: dict[str, Path]) -> None:
    for path in (tree / "transformer").glob("*.safetensors"):
        path.unlink()
    for path in (trees["fastvideo"] / "transformer").glob("*.safetensors"):
        shutil.copy(path, tree / "transformer" / path.name)


def remove(relative: str) -> Callable:
    def damage(tree: Path, *_) -> None:
        target = tree / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return damage


def truncate_tokenizer(tree: Path, *_) -> None:
    path = tree / "tokenizer" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def nan_in_tensor(tree: Path, *_) -> None:
    key = "blocks.1.ffn.w3.weight"

    def poison(state: dict) -> None:
        state[key] = state[key].clone()
        state[key][0, 0] = math.nan
    rewrite(shard_of(tree, key), poison)


def flip_transformer_value(tree: Path, *_) -> None:
    key = "blocks.0.self_attn.to_q.weight"
    path = next((tree / "transformer").glob("*.safetensors"))

    def flip(state: dict) -> None:
        state[key] = state[key].clone()
        state[key][0, 0] += 1.0
    rewrite(path, flip)


def non_identity_dropped_norm(tree: Path, *_) -> None:
    key = "blocks.0.mod_norm_attn.weight"
    path = dit_shards(tree)[0]
    rewrite(path, lambda s: s.update({key: torch.full((128,), 0.5)}))
    edit_index(tree, lambda d: d["weight_map"].update({key: path.name}))
    sync_total_size(tree)


DEFECTS = [
    Defect("truncated shard", truncate_shard, 1, "00003-of-00006.safetensors", "truncated"),
    Defect("header length beyond the file", header_length_past_end, 1, "00001-of-00006.safetensors",
           "runs past the end of the file"),
    Defect("garbage header", garbage_header, 1, "00002-of-00006.safetensors", "header is not valid JSON"),
    Defect("overlapping offsets", overlapping_offsets, 1, "00002-of-00006.safetensors", "overlaps"),
    Defect("missing shard", delete_shard, 1, INDEX, "00002-of-00006.safetensors"),
    Defect("index names a key its shard lacks", index_points_to_wrong_shard, 1, INDEX,
           "maps final_layer.linear.weight to diffusion_pytorch_model-00001-of-00006.safetensors, which does not contain it"),
    Defect("stray key", add_stray_key, 1, "00001-of-00006.safetensors", "blocks.0.attn.extra.weight [4], which is not a parameter"),
    Defect("wrong shape", wrong_shape, 1, "dit/diffusion_pytorch_model", "blocks.1.attn.q_norm.weight has shape [32], expected [64]"),
    Defect("wrong dtype", wrong_dtype, 1, "dit/diffusion_pytorch_model", "blocks.0.ffn.w1.weight is float16 while"),
    Defect("missing config field", dit_config(lambda c: c.pop("hidden_size")), 1, "dit/config.json",
           "required field hidden_size is missing"),
    Defect("mistyped config field", dit_config(lambda c: c.update(depth="2")), 1, "dit/config.json",
           "depth must be an integer, got '2'"),
    Defect("mistyped runtime flag", dit_config(lambda c: c.update(enable_bsa="yes")), 1, "dit/config.json",
           "enable_bsa must be a boolean"),
    Defect("wrong _class_name", dit_config(lambda c: c.update(_class_name="WanTransformer3DModel")), 1,
           "dit/config.json", "_class_name is 'WanTransformer3DModel', expected 'LongCatVideoTransformer3DModel'"),
    Defect("config not JSON", lambda tree, *_: (tree / "dit" / "config.json").write_text("{"), 1, "dit/config.json",
           "is not valid JSON"),
    Defect("head_dim not a multiple of 8", dit_config(lambda c: c.update(num_heads=32)), 1, "dit/config.json",
           "head_dim 4"),
    Defect("temporal patch", dit_config(lambda c: c.update(patch_size=[2, 2, 2])), 1, "dit/config.json",
           "patch_size[0] is 2"),
    Defect("LoRA for an unknown module", lora_edit(lora_unknown_module), 1, "lora/cfg_step_lora.safetensors",
           "targets blocks.0.attn.nonexistent, which is not a Linear of the DiT"),
    Defect("LoRA rank mismatch", lora_edit(lora_other_rank), 1, "lora/cfg_step_lora.safetensors",
           "module blocks.0.attn.proj has rank 4 while"),
    Defect("LoRA missing alpha", lora_edit(lambda s: s.pop(f"{PROJ}.alpha_scale")), 1,
           "lora/cfg_step_lora.safetensors", "module blocks.0.attn.proj has no alpha_scale"),
    Defect("LoRA input features", lora_edit(lora_wrong_in_features), 1, "lora/cfg_step_lora.safetensors",
           "the Linear has 512"),
    Defect("LoRA unparseable key", lora_edit(lambda s: s.update({f"{PROJ}.lora_mid.weight": torch.zeros(2)})), 1,
           "lora/cfg_step_lora.safetensors", f"key {PROJ}.lora_mid.weight is not"),
    Defect("LoRA pickle", pickle_lora, 1, "lora/extra_lora.pt", "never loaded"),
    Defect("weight_map path escaping with ..", weight_map_to("../x.safetensors"), 1, INDEX, "'../x.safetensors'"),
    Defect("weight_map absolute path", weight_map_to("/tmp/x.safetensors"), 1, INDEX, "'/tmp/x.safetensors'"),
    Defect("symlink loop", symlink_loop, 2, "dit/loop_", "symlink loop"),
    Defect("symlink outside the tree", symlink_outside, 2, "vae/diffusion_pytorch_model.safetensors",
           "outside the tree"),
    Defect("dangling symlink", dangling_symlink, 1, "vae/diffusion_pytorch_model-extra.safetensors", "does not exist"),
    Defect("empty file", empty_shard, 1, "00004-of-00006.safetensors", "is empty (0 bytes)"),
    Defect("empty directory", empty_directory, 2, "tree", "is an empty directory"),
    Defect("not a directory", not_a_directory, 2, "tree", "is not a directory"),
    Defect("no layout matches", no_layout, 2, "tree", "no LongCat-Video tree here"),
    Defect("pickled .bin instead of safetensors", pickle_instead_of_safetensors, 1, "text_encoder/pytorch_model.bin",
           "refused, never loaded"),
    Defect("pickle named .safetensors", pickle_named_safetensors, 1, "00001-of-00006.safetensors", "is a Python pickle"),
    Defect("total_size wrong", wrong_total_size, 1, INDEX, "metadata.total_size is"),
    Defect("duplicate key across shards", duplicate_key, 1, "dit/diffusion_pytorch_model",
           "blocks.0.attn.proj.bias is in 2 files"),
    Defect("unindexed shard", unindexed_shard, 1, "dit/diffusion_pytorch_model-extra.safetensors", "is not listed in"),
    Defect("no index for several shards", remove(INDEX), 1, "dit", "no diffusion_pytorch_model.safetensors.index.json"),
    Defect("caption_channels != text encoder d_model", lambda t, *_: edit_json(
        t / "text_encoder" / "config.json", lambda c: c.update(d_model=32)), 1, "dit/config.json",
        "caption_channels 64 != text encoder d_model 32"),
    Defect("z_dim != in_channels", lambda t, *_: edit_json(t / "vae" / "config.json", shrink_vae_z_dim), 1,
           "dit/config.json", "in_channels 16 != VAE z_dim 8"),
    Defect("VAE latents_std length", lambda t, *_: edit_json(t / "vae" / "config.json",
           lambda c: c.update(latents_std=c["latents_std"][:15])), 1, "vae/config.json", "latents_std has 15 values"),
    Defect("text encoder layer count", lambda t, *_: edit_json(t / "text_encoder" / "config.json",
           lambda c: c.update(num_layers=3)), 1, "text_encoder", "num_layers is 3"),
    Defect("missing component", remove("vae"), 1, "vae/", "folder is missing"),
    Defect("truncated tokenizer.json", truncate_tokenizer, 1, "tokenizer/tokenizer.json", "truncated"),
    Defect("NaN in a tensor (--deep)", nan_in_tensor, 1, "dit/diffusion_pytorch_model", "1 NaN", args=("--deep",)),
    Defect("dropped norm that is not the identity (--deep)", non_identity_dropped_norm, 1, "00001-of-00006",
           "must be ones", args=("--deep",)),
    Defect("bf16 required, fp32 found", lambda *_: None, 1, "dit/diffusion_pytorch_model", "expected bfloat16 (--dtype)",
           args=("--dtype", "bfloat16")),
    # fastvideo layout
    Defect("FastVideo non-integer lora_alpha", set_fastvideo_alpha, 1, "lora/distilled/cfg_step_lora.safetensors",
           "FastVideo scales by int(lora_alpha)/rank = 2/8", base="fastvideo"),
    Defect("upstream LoRA in a FastVideo tree", upstream_lora_in_fastvideo_tree, 1,
           "lora/distilled/cfg_step_lora.safetensors", "is an upstream-format LoRA where this layout expects the fastvideo format", base="fastvideo"),
    Defect("FastVideo config keeps num_heads", dit_config(lambda c: c.update(num_heads=c.pop("num_attention_heads")),
           "transformer"), 1, "transformer/config.json", "required field num_attention_heads is missing",
           base="fastvideo"),
    Defect("model_index transformer class", lambda t, *_: edit_json(t / "model_index.json", lambda c: c.update(
        transformer=["diffusers", "LongCatVideoTransformer3DModel"])), 1, "model_index.json",
        "'LongCatTransformer3DModel'", base="fastvideo"),
    Defect("scheduler field FastVideo rejects", lambda t, *_: edit_json(t / "scheduler" / "scheduler_config.json",
           lambda c: c.update(flow_shift=3.0)), 1, "scheduler/scheduler_config.json", "TypeError", base="fastvideo"),
    Defect("sha256 differs from the manifest (--deep)", flip_transformer_value, 1, "transformer/", "sha256",
           base="fastvideo", args=("--deep",)),
    # diffusers layout
    Defect("FastVideo key names in a diffusers tree", fastvideo_keys_in_diffusers_tree, 1, "transformer",
           "use the fastvideo key naming", base="diffusers"),
    Defect("diffusers model_index missing", remove("model_index.json"), 1, "model_index.json", "is missing",
           base="diffusers"),
]


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.name for d in DEFECTS])
def test_broken_tree_is_reported(defect: Defect, trees: dict[str, Path], tmp_path: Path) -> None:
    tree = Path(shutil.copytree(trees[defect.base], tmp_path / "tree", symlinks=True))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    defect.damage(tree, scratch, trees)
    report = scratch / "report.json"
    result = validate_cli(tree, *defect.args, "--report", str(report))
    output = result.output
    assert result.exit_code == defect.exit_code, output
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in output.splitlines() if defect.file in line and defect.says in line]
    assert lines, f"no line names {defect.file!r} and {defect.says!r}:\n{output}"
    assert not (scratch / MARKER).exists(), "a pickle was loaded"
    if defect.exit_code == 2:
        assert output.strip().count("\n") == 0 and output.startswith("error: "), output
        assert not report.exists()
    else:
        document = json.loads(report.read_text())
        assert schema_errors("validation-report", document) == []
        assert document["valid"] is False and document["counts"]["error"] >= 1


def test_corpus_is_large_and_covers_every_layout() -> None:
    assert len(DEFECTS) >= 30
    assert {d.base for d in DEFECTS} == {"raw", "fastvideo", "diffusers"}
    assert len({d.name for d in DEFECTS}) == len(DEFECTS)


def test_armed_pickle_really_fires(tmp_path: Path) -> None:
    """The corpus pickles would create the marker if anything unpickled them."""
    marker = tmp_path / "fired"
    pickle.loads(armed_pickle(marker))
    assert marker.exists()
