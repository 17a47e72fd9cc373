"""Helpers for the validate tests (tree builders, shard surgery) and the full-size header-only timing test.

The full-size tree has the published shapes (1022 DiT keys in 6 fp32 shards, both adapters at rank 128, a
UMT5-XXL encoder in 5 shards, the Wan VAE) but sparse files: headers are real, data regions are holes.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file, save_file

from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core import keymap
from longcat_convert.core.io import TensorEntry, encode_header
from longcat_convert.core.lora_format import encode_module
from longcat_convert.tiny_tree import lora_targets
from longcat_convert.validation.run import validate_tree
from tests.helpers import run_cli

PUBLISHED_DIT_CONFIG = {
    "_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": "0.35.1", "in_channels": 16,
    "out_channels": 16, "hidden_size": 4096, "depth": 48, "num_heads": 32, "caption_channels": 4096, "mlp_ratio": 4,
    "adaln_tembed_dim": 512, "frequency_embedding_size": 256, "patch_size": [1, 2, 2], "enable_flashattn3": False,
    "enable_flashattn2": True, "enable_xformers": False, "enable_bsa": False,
    "bsa_params": {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
    "cp_split_hw": None, "text_tokens_zero_pad": True,
}
UMT5_XXL = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "d_model": 4096, "d_ff": 10240, "d_kv": 64,
            "num_heads": 64, "num_layers": 24, "vocab_size": 256384, "feed_forward_proj": "gated-gelu"}


def validate_cli(tree: Path, *args: str) -> Result:
    return run_cli("validate", tree, *args)


def converted(raw: Path, dst: Path, layout: str) -> Path:
    """`raw` itself for the raw layout, else a converted copy at `dst`."""
    if layout == "raw":
        return raw
    convert(ConvertRequest(src=raw, dst=dst, to=layout, quiet=True))
    return dst


# --- shard surgery on small trees ---------------------------------------------------------------------------


def dit_shards(tree: Path) -> list[Path]:
    return sorted((tree / "dit").glob("*.safetensors"))


def shard_of(tree: Path, key: str) -> Path:
    index = json.loads((tree / "dit" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    return tree / "dit" / index["weight_map"][key]


def edit_index(tree: Path, edit) -> None:
    path = tree / "dit" / "diffusion_pytorch_model.safetensors.index.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def sync_total_size(tree: Path) -> None:
    """Recompute the index's total_size after a shard was rewritten (so only the intended defect shows)."""
    total = sum(t.numel() * t.element_size() for p in dit_shards(tree) for t in load_file(p).values())
    edit_index(tree, lambda d: d["metadata"].update(total_size=total))


def rewrite(path: Path, edit) -> None:
    """Load a small safetensors file, let `edit` change the dict, save it back."""
    state = load_file(path)
    edit(state)
    save_file(state, path, {"format": "pt"})


def edit_json(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document, indent=2))


def header_bytes(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length])


def replace_header(path: Path, header: dict) -> None:
    """Write `header` in place of the file's header, keeping its data bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


# --- a full-size tree of sparse files ------------------------------------------------------------------------


def write_sparse(path: Path, entries: list[TensorEntry], values: dict[str, bytes] | None = None) -> int:
    """A safetensors file with a real header and a hole for data (only `values` are written). Returns data size."""
    header = encode_header(entries, {"format": "pt"})
    size = sum(e.nbytes for e in entries)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + size)
        offset = len(header)
        for entry in entries:
            if values and entry.name in values:
                handle.seek(offset)
                handle.write(values[entry.name])
            offset += entry.nbytes
    return size


def write_sharded(folder: Path, prefix: str, entries: list[TensorEntry], shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    budget = math.ceil(sum(e.nbytes for e in entries) / shards)
    groups: list[list[TensorEntry]] = [[]]
    for entry in entries:
        if groups[-1] and sum(e.nbytes for e in groups[-1]) + entry.nbytes > budget and len(groups) < shards:
            groups.append([])
        groups[-1].append(entry)
    weight_map, total = {}, 0
    for number, group in enumerate(groups, 1):
        name = f"{prefix}-{number:05d}-of-{len(groups):05d}.safetensors"
        total += write_sparse(folder / name, group)
        weight_map.update({e.name: name for e in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index))


def _meta_state(model_factory) -> list[TensorEntry]:
    with torch.device("meta"):
        model = model_factory()
    return [TensorEntry(k, "F32", tuple(v.shape)) for k, v in model.state_dict().items()]


def build_full_size_raw_tree(root: Path) -> Path:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    config = PUBLISHED_DIT_CONFIG
    expanded = keymap.expand(config, "upstream")
    dit_entries = [TensorEntry(rule.upstream, "F32", rule.shape) for rule in expanded.params]
    write_sharded(root / "dit", "diffusion_pytorch_model", dit_entries, 6)
    (root / "dit" / "config.json").write_text(json.dumps(config))
    (root / "lora").mkdir()
    for adapter in ("cfg_step_lora", "refinement_lora"):
        entries, values = [], {}
        for module in lora_targets(expanded, adapter, "published"):
            linear, name = expanded.linears[module], encode_module(module)
            n, rank = linear.lora_up_blocks, 128
            entries.append(TensorEntry(f"{name}.lora_down.weight", "F32", (n * rank, linear.in_features)))
            ups = [f"{name}.lora_up.weight"] if n == 1 else [f"{name}.lora_up.blocks.{j}.weight" for j in range(n)]
            entries += [TensorEntry(up, "F32", (linear.out_features // n, rank)) for up in ups]
            entries.append(TensorEntry(f"{name}.alpha_scale", "F32", ()))
            values[f"{name}.alpha_scale"] = struct.pack("<f", 0.5)
        write_sparse(root / "lora" / f"{adapter}.safetensors", entries, values)
    te_config = UMT5Config(**{k: v for k, v in UMT5_XXL.items() if k != "architectures"})
    write_sharded(root / "text_encoder", "model", _meta_state(lambda: UMT5EncoderModel(te_config)), 5)
    (root / "text_encoder" / "config.json").write_text(json.dumps(UMT5_XXL))
    vae = root / "vae"
    vae.mkdir()
    write_sparse(vae / "diffusion_pytorch_model.safetensors", _meta_state(AutoencoderKLWan))
    vae_config = {"_class_name": "AutoencoderKLWan", **{k: v for k, v in AutoencoderKLWan().config.items()
                                                         if not k.startswith("_")}}
    (vae / "config.json").write_text(json.dumps(vae_config))
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text("{}")
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 12.0}))
    return root


@pytest.fixture(scope="module")
def full_size_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_full_size_raw_tree(tmp_path_factory.mktemp("full") / "raw")


def test_full_size_tree_is_valid_and_checked_in_well_under_a_second(full_size_raw: Path) -> None:
    validate_tree(full_size_raw)  # warm imports and schema caches
    timings = []
    for _ in range(3):  # the best of three, so a busy machine does not fail the test
        started = time.perf_counter()
        report = validate_tree(full_size_raw)
        timings.append(time.perf_counter() - started)
    elapsed = min(timings)
    errors = [f for f in report["findings"] if f["severity"] != "info"]
    assert errors == [] and report["valid"]
    dit = report["components"]["dit"]
    assert (dit["tensors"], len(dit["files"]), dit["expected_parameters"]) == (1022, 6, 13_581_071_424)
    keys = {a["name"]: a["keys"] for a in report["components"]["lora"]["adapters"]}
    assert keys == {"cfg_step_lora": 1152, "refinement_lora": 1543}
    assert elapsed < 1.0, f"header-only validation of the full-size tree took {elapsed:.2f} s"


def test_full_size_tree_defect_is_found(full_size_raw: Path, tmp_path: Path) -> None:
    """The full-size tree seen through symlinks (--follow-symlinks), with one index entry naming the wrong shard."""
    tree = tmp_path / "raw"
    (tree / "dit").mkdir(parents=True)
    for entry in full_size_raw.iterdir():
        if entry.name != "dit":
            (tree / entry.name).symlink_to(entry, target_is_directory=True)
    for entry in (full_size_raw / "dit").iterdir():
        if not entry.name.endswith(".index.json"):
            (tree / "dit" / entry.name).symlink_to(entry)
    index = json.loads((full_size_raw / "dit" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"]["blocks.47.ffn.w2.weight"] = "diffusion_pytorch_model-00001-of-00006.safetensors"
    (tree / "dit" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert validate_cli(tree).exit_code == 2  # symlinks leave the tree
    result = validate_cli(tree, "--follow-symlinks")
    assert result.exit_code == 1
    assert "maps blocks.47.ffn.w2.weight to diffusion_pytorch_model-00001-of-00006.safetensors" in result.output
