"""Write a complete, small raw LongCat-Video tree shaped exactly like the published one.

The DiT's keys and shapes come from the key map (the same data validate and convert use); values are
seeded random numbers. LoRAs follow the upstream format with targets shaped like the published
adapters. Text encoder, tokenizer, VAE and scheduler are real library classes (see tiny_components).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .core import keymap, progress
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
    full_size: bool = False  # real shapes: rank-128 LoRAs and real-size values


# The published DiT (weights.md §3.2); depth stays the caller's. Shards as diffusers' save_pretrained cuts them
# (max 10 GB: 6 files for the 54 GB fp32 model).
FULL_SIZE = {"hidden": 4096, "num_heads": 32, "caption_channels": 4096, "adaln_tembed_dim": 512,
             "max_shard_bytes": 10 * 10**9}


def dit_config(spec: TinySpec) -> dict:
    """Every field of the published dit/config.json, at the spec's sizes."""
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


def _tiny_scale(key: str, shape: tuple[int, ...]) -> float:
    return 0.3 if len(shape) == 1 else 0.08


def _full_size_scale(key: str, shape: tuple[int, ...]) -> float:
    """Keep activations O(1) through 48 real-width blocks: unit-variance Linears, small biases."""
    return 0.02 if len(shape) == 1 else 1.0 / math.sqrt(math.prod(shape[1:]))


def _dit_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator,
                scale: Callable[[str, tuple[int, ...]], float] = _tiny_scale) -> torch.Tensor:
    import torch

    values = torch.randn(shape, generator=gen)
    if key.endswith("norm.weight"):
        return 1.0 + 0.1 * values  # RMSNorm / LayerNorm scales sit near 1
    return values.mul_(scale(key, shape))


def write_sharded(folder: Path, prefix: str, planned: list[tuple[str, tuple[int, ...], torch.dtype]],
                  make: Callable[[str, tuple[int, ...]], torch.Tensor], max_bytes: int) -> None:
    """Write `planned` (name, shape, dtype) tensors, each made by `make` only when its turn comes, in shards of at
    most `max_bytes` (plus an index when there are several): memory holds one tensor, whatever the model size."""
    import torch

    def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    specs = {name: (shape, dtype) for name, shape, dtype in planned}
    groups = group_into_shards([(name, nbytes(shape, dtype)) for name, shape, dtype in planned], max_bytes)
    weight_map: dict[str, str] = {}
    for number, names in enumerate(groups, start=1):
        file = shard_name(prefix, number, len(groups))
        entries = [TensorEntry(n, SAFETENSORS_NAME[specs[n][1]], specs[n][0]) for n in names]
        with ShardWriter(folder / file, entries, {"format": "pt"}) as writer:
            for name in progress.steps(names, len(names), f"writing {folder.name}/{file}"):
                shape, dtype = specs[name]
                writer.write_tensor(name, [tensor_bytes(make(name, shape).to(dtype))])
        weight_map.update(dict.fromkeys(names, file))
    if len(groups) > 1:
        write_index(folder / index_name(prefix), weight_map, sum(nbytes(s, d) for _, s, d in planned))


def _write_shards(folder: Path, prefix: str, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    """`write_sharded` for tensors already in memory (small trees)."""
    write_sharded(folder, prefix, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                  lambda key, _shape: tensors[key], max_bytes)


def write_dit(folder: Path, spec: TinySpec) -> dict:
    import torch

    config = dit_config(spec)
    expanded = keymap.expand(config, "upstream")
    gen = torch.Generator().manual_seed(spec.seed)
    scale = _full_size_scale if spec.full_size else _tiny_scale
    folder.mkdir(parents=True)
    dtype = torch_dtype(spec.dtype, TINY_DTYPES)
    write_sharded(folder, keymap.load_map_document()["shard_prefix"],
                  [(r.upstream, r.shape, dtype) for r in expanded.params],
                  lambda key, shape: _dit_tensor(key, shape, gen, scale), spec.max_shard_bytes)
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


def lora_plan(expanded: keymap.ExpandedMap, targets: Iterable[str], rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of an upstream-format adapter's tensors, in file order: down, up(s), alpha per module."""
    planned: list[tuple[str, tuple[int, ...]]] = []
    for module in targets:
        linear = expanded.linears[module]
        n = linear.lora_up_blocks
        planned.append((upstream_key(module, "down"), (n * rank, linear.in_features)))
        if n == 1:
            planned.append((upstream_key(module, "up"), (linear.out_features, rank)))
        planned += [(upstream_key(module, "up", j), (linear.out_features // n, rank)) for j in range(n if n > 1 else 0)]
        planned.append((upstream_key(module, "alpha"), ()))
    return planned


def lora_state(expanded: keymap.ExpandedMap, targets: Iterable[str], rank: int, alpha: float,
               gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    make = _lora_maker(rank, alpha, gen, dtype)
    return {key: make(key, shape) for key, shape in lora_plan(expanded, targets, rank)}


def _lora_maker(rank: int, alpha: float, gen: torch.Generator, dtype: torch.dtype
                ) -> Callable[[str, tuple[int, ...]], torch.Tensor]:
    import torch

    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not shape:  # alpha_scale: always float32, as in the published files
            return torch.tensor(alpha / rank, dtype=torch.float32)
        return (torch.randn(shape, generator=gen) * 0.05).to(dtype)

    return make


# Two adapters with different ranks, alpha/rank = 0.5 as in the published files (64/128).
ADAPTERS = {"cfg_step_lora": (8, 4.0), "refinement_lora": (4, 2.0)}
FULL_SIZE_RANK, FULL_SIZE_ALPHA = 128, 64.0  # the published adapters (weights.md §1)


def write_loras(folder: Path, config: dict, spec: TinySpec) -> None:
    import torch

    expanded = keymap.expand(config, "upstream")
    gen = torch.Generator().manual_seed(spec.seed + 1)
    dtype = torch_dtype(spec.dtype, TINY_DTYPES)
    folder.mkdir(parents=True)
    for adapter, (rank, alpha) in ADAPTERS.items():
        if spec.full_size:
            rank, alpha = FULL_SIZE_RANK, FULL_SIZE_ALPHA
        planned = lora_plan(expanded, lora_targets(expanded, adapter, spec.lora_targets), rank)
        make = _lora_maker(rank, alpha, gen, dtype)
        entries = [TensorEntry(k, "F32" if not shape else SAFETENSORS_NAME[dtype], shape) for k, shape in planned]
        with ShardWriter(folder / f"{adapter}.safetensors", entries, {"format": "pt"}) as writer:
            for key, shape in progress.steps(planned, len(planned), f"writing lora/{adapter}"):
                writer.write_tensor(key, [tensor_bytes(make(key, shape))])


def build_tiny_tree(dst: Path, *, seed: int = 0, dtype: str = "float32", depth: int = 2, hidden: int = 128,
                    lora_targets: str = "published", overwrite: bool = False, full_size: bool = False) -> Path:
    """Write a complete raw tree into `dst` (atomically: built in a sibling folder, then renamed).

    full_size: the DiT and its two LoRAs at the published shapes (hidden 4096, rank 128; `depth` blocks), random
    values, streamed to disk one tensor at a time; text encoder, tokenizer, VAE and scheduler stay tiny."""
    from .atomic import AtomicDirectory

    if dtype not in TINY_DTYPES:
        raise LongcatError(f"--dtype must be float32 or bfloat16, not {dtype!r}")
    if hidden % 64 or hidden <= 0:
        raise LongcatError(f"--hidden must be a positive multiple of 64 (two heads of a multiple of 32), not {hidden}")
    if depth <= 0 or depth > MAX_DEPTH:
        raise LongcatError(f"--depth must be in 1..{MAX_DEPTH}, not {depth}")
    spec = (TinySpec(seed=seed, dtype=dtype, depth=depth, lora_targets=lora_targets, full_size=True, **FULL_SIZE)
            if full_size else TinySpec(seed=seed, dtype=dtype, depth=depth, hidden=hidden, lora_targets=lora_targets))
    if full_size:
        _check_free_space(Path(dst), spec)
    with AtomicDirectory(Path(dst), overwrite=overwrite) as work:
        from .tiny_components import write_components

        config = write_dit(work / "dit", spec)
        write_loras(work / "lora", config, spec)
        write_components(work, config["caption_channels"], seed, torch_dtype(dtype, TINY_DTYPES))
    return Path(dst)


MAX_DEPTH = 1024
SPACE_MARGIN = 1.05  # tiny components, headers, indexes


def tree_bytes(spec: TinySpec) -> int:
    """Bytes the DiT and LoRAs of `spec` take on disk."""
    config = dit_config(spec)
    expanded = keymap.expand(config, "upstream")
    element = 4 if spec.dtype == "float32" else 2
    total = sum(math.prod(rule.shape) for rule in expanded.params) * element
    for adapter, (rank, _) in ADAPTERS.items():
        rank = FULL_SIZE_RANK if spec.full_size else rank
        total += sum(math.prod(shape) for _, shape in
                     lora_plan(expanded, lora_targets(expanded, adapter, spec.lora_targets), rank)) * element
    return int(total * SPACE_MARGIN)


def _check_free_space(dst: Path, spec: TinySpec) -> None:
    import shutil

    parent = next((p for p in [dst.absolute(), *dst.absolute().parents] if p.exists()), Path("/"))
    need, free = tree_bytes(spec), shutil.disk_usage(parent).free
    if need > free:
        raise LongcatError(f"a full-size tree of depth {spec.depth} in {spec.dtype} needs ~{need / 1e9:.1f} GB, only "
                           f"{free / 1e9:.1f} GB are free", parent, "free space, pick a smaller --depth or bfloat16")
