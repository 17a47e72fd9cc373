"""Reference runner for the LongCat-Video DiT: a small, readable re-implementation used to check
converted checkpoints (weights- and forward-level parity) against the raw upstream tree."""

from .bsa import BsaParams, block_sparse_attention
from .dit import KVCache, LongcatDiT
from .dit_parity import weights_parity
from .forward_parity import forward_parity
from .loading import LoraFile, Tree, apply_loras, load_dit, lora_paths, open_tree, read_lora
from .lora_layers import (
    FastvideoLoraTarget,
    UpstreamLoraModule,
    clear_loras,
    enable_runtime_loras,
    merge_fastvideo_lora,
    read_fastvideo_lora,
    read_upstream_lora,
)
from .metrics import compare_outputs

__all__ = [
    "BsaParams", "FastvideoLoraTarget", "KVCache", "LongcatDiT", "LoraFile", "Tree", "UpstreamLoraModule",
    "apply_loras", "block_sparse_attention", "clear_loras", "compare_outputs", "enable_runtime_loras",
    "forward_parity", "load_dit", "lora_paths", "merge_fastvideo_lora", "open_tree", "read_fastvideo_lora",
    "read_lora", "read_upstream_lora", "weights_parity",
]
