"""Write a complete, small raw LongCat-Video tree shaped exactly like the published one.

The DiT's keys and shapes come from the key map (the same data validate and convert use); values are
seeded random numbers. LoRAs follow the upstream format with targets shaped like the published
adapters. Text encoder, tokenizer, VAE and scheduler are real library classes (see tiny_components).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .core import keymap
from .core.dtypes import SAFETENSORS_NAME, torch_dtype
from .core.errors import LongcatError
from .core.io import ShardWriter, TensorEntry, index_name, shard_name, tensor_bytes, write_index
from .core.lora_format import upstream_key
from .sharding import group_into_shards

if TYPE_CHECKING:  # torch is imported where tensors are made, so that argument checks come first and fast
    import torch

LORA_TARGET_SETS = ("published", "extended", "all")
TINY_DTYPES = ("float32", "bfloat16")
CFG_STEP_SUFFIXES = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                     "ffn.w1", "ffn.w2", "ffn.w3")
DIFFUSERS_VERSION = "0.35.1"


@dataclass(frozen=True)
class TinySpec:
    seed: int = 0
    dtype: str = "float32"
    depth: int = 2
    hidden: int = 128
    num_heads: int = 2
    caption_channels: int = 64
    adaln_tembed_dim: int = 32
    lora_targets: str = "published"
    max_shard_bytes: int = 600_000


def dit_config(spec: TinySpec) -> dict:
    """Every field of the published dit/config.json, at tiny sizes."""
    return {
        "_class_name": keymap.class_name("upstream"),
        "_diffusers_version": DIFFUSERS_VERSION,
        "adaln_tembed_dim": spec.adaln_tembed_dim,
        "bsa_params": {"chunk_3d_shape_k": [4, 4, 4], "chunk_3d_shape_q": [4, 4, 4], "sparsity": 0.9375},
        "caption_channels": spec.caption_channels,
        "cp_split_hw": None,
        "depth": spec.depth,
        "enable_bsa": False,
        "enable_flashattn2": True,
        "enable_flashattn3": False,
        "enable_xformers": False,
        "frequency_embedding_size": 256,
        "hidden_size": spec.hidden,
        "in_channels": 16,
        "mlp_ratio": 4,
        "num_heads": spec.num_heads,
        "out_channels": 16,
        "patch_size": [1, 2, 2],
        "text_tokens_zero_pad": True,
    }


def _dit_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    import torch

    values = torch.randn(shape, generator=gen)
    if key.endswith("norm.weight"):
        return 1.0 + 0.1 * values  # RMSNorm / LayerNorm scales sit near 1
    return values * (0.3 if len(shape) == 1 else 0.08)


def _write_shards(folder: Path, prefix: str, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    sizes = [(k, v.numel() * v.element_size()) for k, v in tensors.items()]
    groups = group_into_shards(sizes, max_bytes)
    weight_map: dict[str, str] = {}
    for number, names in enumerate(groups, start=1):
        file = shard_name(prefix, number, len(groups))
        entries = [TensorEntry(n, SAFETENSORS_NAME[tensors[n].dtype], tuple(tensors[n].shape)) for n in names]
        with ShardWriter(folder / file, entries, {"format": "pt"}) as writer:
            for name in names:
                writer.write_tensor(name, [tensor_bytes(tensors[name])])
        weight_map.update(dict.fromkeys(names, file))
    if len(groups) > 1:
        write_index(folder / index_name(prefix), weight_map, sum(size for _, size in sizes))


def write_dit(folder: Path, spec: TinySpec) -> dict:
    import torch

    config = dit_config(spec)
    expanded = keymap.expand(config, "upstream")
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = torch_dtype(spec.dtype, TINY_DTYPES)
    tensors = {r.upstream: _dit_tensor(r.upstream, r.shape, gen).to(dtype) for r in expanded.params}
    folder.mkdir(parents=True)
    _write_shards(folder, keymap.load_map_document()["shard_prefix"], tensors, spec.max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def lora_targets(expanded: keymap.ExpandedMap, adapter: str, which: str) -> list[str]:
    """Modules an adapter targets: shaped like the published cfg_step / refinement adapters."""
    if which not in LORA_TARGET_SETS:
        raise LongcatError(f"--lora-targets must be one of {', '.join(LORA_TARGET_SETS)}, not {which!r}")
    chosen = []
    for module in expanded.linears:
        suffix = module.split(".", 2)[2] if module.startswith("blocks.") else None
        published = suffix in CFG_STEP_SUFFIXES or (
            adapter == "refinement_lora" and (suffix == "adaLN_modulation.1" or module.startswith("final_layer.")))
        extended = adapter == "refinement_lora" and suffix == "cross_attn.proj"
        if published or (which in ("extended", "all") and extended) or which == "all":
            chosen.append(module)
    return chosen


def lora_state(expanded: keymap.ExpandedMap, targets: Iterable[str], rank: int, alpha: float,
               gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import torch

    state: dict[str, torch.Tensor] = {}
    for module in targets:
        linear = expanded.linears[module]
        n = linear.lora_up_blocks
        state[upstream_key(module, "down")] = (torch.randn(n * rank, linear.in_features, generator=gen) * 0.05).to(dtype)
        if n == 1:
            state[upstream_key(module, "up")] = (torch.randn(linear.out_features, rank, generator=gen) * 0.05).to(dtype)
        for j in range(n if n > 1 else 0):
            state[upstream_key(module, "up", j)] = (
                torch.randn(linear.out_features // n, rank, generator=gen) * 0.05).to(dtype)
        state[upstream_key(module, "alpha")] = torch.tensor(alpha / rank, dtype=torch.float32)
    return state


# Two adapters with different ranks, alpha/rank = 0.5 as in the published files (64/128).
ADAPTERS = {"cfg_step_lora": (8, 4.0), "refinement_lora": (4, 2.0)}


def write_loras(folder: Path, config: dict, spec: TinySpec) -> None:
    import torch

    expanded = keymap.expand(config, "upstream")
    gen = torch.Generator().manual_seed(spec.seed + 1)
    folder.mkdir(parents=True)
    for adapter, (rank, alpha) in ADAPTERS.items():
        state = lora_state(expanded, lora_targets(expanded, adapter, spec.lora_targets), rank, alpha, gen,
                           torch_dtype(spec.dtype, TINY_DTYPES))
        entries = [TensorEntry(k, SAFETENSORS_NAME[v.dtype], tuple(v.shape)) for k, v in state.items()]
        with ShardWriter(folder / f"{adapter}.safetensors", entries, {"format": "pt"}) as writer:
            for key, value in state.items():
                writer.write_tensor(key, [tensor_bytes(value)])


def build_tiny_tree(dst: Path, *, seed: int = 0, dtype: str = "float32", depth: int = 2, hidden: int = 128,
                    lora_targets: str = "published", overwrite: bool = False) -> Path:
    """Write a complete raw tree into `dst` (atomically: built in a sibling folder, then renamed)."""
    from .atomic import AtomicDirectory

    if dtype not in TINY_DTYPES:
        raise LongcatError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
    if hidden % 64 or hidden <= 0:
        raise LongcatError(f"--hidden must be a positive multiple of 64 (two heads of a multiple of 32), not {hidden}")
    if depth <= 0:
        raise LongcatError(f"--depth must be positive, not {depth}")
    spec = TinySpec(seed=seed, dtype=dtype, depth=depth, hidden=hidden, lora_targets=lora_targets)
    with AtomicDirectory(Path(dst), overwrite=overwrite) as work:
        from .tiny_components import write_components

        config = write_dit(work / "dit", spec)
        write_loras(work / "lora", config, spec)
        write_components(work, config["caption_channels"], seed, torch_dtype(dtype, TINY_DTYPES))
    return Path(dst)
