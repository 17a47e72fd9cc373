"""A rough cost of a run, worked out before any model loads.

FLOPs come from the DiT config and the token counts (dense layers 2·P·N, attention 4·depth·hidden·N·K),
the text encoder's parameter count, and the VAE's conv stack as its config describes it. Seconds come
from rates measured on this device and dtype with three small probes shaped like the work: a matmul of
the DiT's width, an attention of its head size, a 3x3x3 conv of the VAE's full-resolution width.
Memory is the weights in the compute dtype plus the largest call's activations (dense N² logits when the
block-sparse reference attention runs).

It tells seconds from minutes from days; it is not a schedule. On the tiny tree here it ran 1.7–2.2×
over the measured time (see README).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from longcat_convert.core.io import read_header

from ..config import DiTConfig
from ..loading import Tree
from .latents import SPATIAL_FACTOR, latent_frames

PROBE_SECONDS = 0.05  # each probe repeats its operation for at least this long
PROBE_FLOPS = 2e9  # and is sized to about this much work per repetition
BSA_LOGIT_COPIES = 3  # the dense reference keeps logits, the token mask and the softmax at once
ACTIVATION_WIDTHS = 12  # live [N, hidden] tensors in a block (q, k, v, the 4·hidden FFN, residuals)
VAE_ACTIVATION_COPIES = 12  # live full-resolution feature maps per frame in the VAE (caches included)


@dataclass(frozen=True)
class Call:
    """One sampling call of a run (long video makes several)."""

    task: str
    height: int
    width: int
    num_frames: int  # pixel frames the call samples (and decodes), conditioning and padding included
    steps: int  # entries of the schedule it runs
    cfg: bool  # two model passes per step
    cond_latents: int = 0  # latent frames given as conditioning
    kv_cache: bool = False  # conditioning attended through a cache, not recomputed
    encoded_frames: int = 0  # pixel frames VAE-encoded at (height, width)
    dense_bsa: bool = False  # block-sparse attention through the dense reference (N² logits)
    repeat: int = 1  # identical calls in a row (long video's continuations and later refine windows)


@dataclass(frozen=True)
class Model:
    """What the cost model needs from the tree, read from headers and configs only."""

    dit: DiTConfig
    dit_params: int
    text_params: int
    vae_params: int
    vae_config: dict | None

    @classmethod
    def from_tree(cls, tree: Tree) -> Model:
        dit = DiTConfig.from_dict(tree.dit.config, tree.naming, str(tree.config_path))
        dit_params = sum(tree.dit.info(key).numel for key in tree.dit.key_files)
        vae_config = _json_or_none(tree.root / "vae" / "config.json")
        return cls(dit, dit_params, _folder_params(tree.root / "text_encoder"), _folder_params(tree.root / "vae"),
                   vae_config)


@dataclass(frozen=True)
class Cost:
    dense_flops: float  # DiT and text-encoder matmuls
    attention_flops: float
    vae_flops: float
    memory_bytes: int

    @property
    def flops(self) -> float:
        return self.dense_flops + self.attention_flops + self.vae_flops


@dataclass(frozen=True)
class Rates:
    """FLOP/s measured on the run's device and dtype."""

    matmul: float
    attention: float
    conv: float

    def seconds(self, cost: Cost) -> float:
        return cost.dense_flops / self.matmul + cost.attention_flops / self.attention + cost.vae_flops / self.conv


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _folder_params(folder: Path) -> int:
    return sum(_numel(info.shape) for path in sorted(folder.glob("*.safetensors"))
               for info in read_header(path).tensors.values())


def _json_or_none(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return document if isinstance(document, dict) else None


# ---- FLOPs and memory ----------------------------------------------------------------------------------

def tokens_per_latent_frame(model: Model, height: int, width: int) -> int:
    _, patch_h, patch_w = model.dit.patch_size
    return (height // SPATIAL_FACTOR // patch_h) * (width // SPATIAL_FACTOR // patch_w)


def call_cost(model: Model, call: Call, text_tokens: int, itemsize: int) -> Cost:
    dit = model.dit
    per_frame = tokens_per_latent_frame(model, call.height, call.width)
    tokens = latent_frames(call.num_frames) * per_frame
    cond = call.cond_latents * per_frame
    queries = tokens - cond if call.kv_cache else tokens
    batch = 2 if call.cfg else 1
    dense = call.steps * batch * 2 * model.dit_params * queries + batch * 2 * model.text_params * text_tokens
    attention = call.steps * batch * 4 * dit.depth * dit.hidden_size * queries * (tokens + text_tokens)
    if call.kv_cache:
        dense += 2 * model.dit_params * cond
        attention += 4 * dit.depth * dit.hidden_size * cond * cond
    vae = vae_flops(model.vae_config, call.encoded_frames, call.height, call.width, encode=True)
    vae += vae_flops(model.vae_config, call.num_frames, call.height, call.width, encode=False)
    activations = batch * queries * dit.hidden_size * ACTIVATION_WIDTHS * itemsize
    if call.dense_bsa:
        activations += BSA_LOGIT_COPIES * batch * dit.num_heads * queries * tokens * itemsize
    if call.kv_cache:
        activations += dit.depth * 2 * cond * dit.hidden_size * itemsize
    activations = max(activations, _vae_activation_bytes(model.vae_config, call, itemsize))
    return Cost(float(dense), float(attention), vae, int(activations))


def vae_flops(config: dict | None, frames: int, height: int, width: int, encode: bool) -> float:
    """2 × Σ over the conv stack's levels of convs × 27 × C² × positions (3x3x3 convs, C in and out)."""
    if not config or frames <= 0:
        return 0.0
    try:
        levels = _vae_levels(config)
        res_blocks = int(config.get("num_res_blocks", 2))
    except (TypeError, ValueError):
        return 0.0
    convs = 2 * res_blocks if encode else 2 * (res_blocks + 1)
    total = 0.0
    for index, (channels, time_divisor) in enumerate(levels):
        positions = max(frames // time_divisor, 1) * (height >> index) * (width >> index)
        level_convs = convs + (4 if index == len(levels) - 1 else 0)  # the mid block sits at the coarsest level
        total += level_convs * 27 * channels * channels * positions
    return 2.0 * total


def _vae_levels(config: dict) -> list[tuple[int, int]]:
    """(channels, temporal divisor) per level, full resolution first."""
    base, mults = int(config.get("base_dim", 96)), [int(m) for m in config.get("dim_mult", [1, 2, 4, 4])]
    downsample = [bool(d) for d in config.get("temperal_downsample", [False, True, True])]
    return [(base * mult, 2 ** sum(downsample[:index])) for index, mult in enumerate(mults)]


def _vae_activation_bytes(config: dict | None, call: Call, itemsize: int) -> int:
    if not config:
        return 0
    try:
        channels = _vae_levels(config)[0][0]
    except (TypeError, ValueError, IndexError):
        return 0
    per_frame = channels * call.height * call.width * itemsize * VAE_ACTIVATION_COPIES
    return per_frame + call.num_frames * 3 * call.height * call.width * 4  # plus the decoded clip in float32


def weights_bytes(model: Model, itemsize: int) -> int:
    return (model.dit_params + model.text_params + model.vae_params) * itemsize


def total_cost(model: Model, calls: list[Call], text_tokens: int, itemsize: int) -> Cost:
    costs = [(call.repeat, call_cost(model, call, text_tokens, itemsize)) for call in calls]
    return Cost(sum(n * c.dense_flops for n, c in costs), sum(n * c.attention_flops for n, c in costs),
                sum(n * c.vae_flops for n, c in costs),
                weights_bytes(model, itemsize) + max((c.memory_bytes for _, c in costs), default=0))


# ---- measured rates -------------------------------------------------------------------------------------

def measure_rates(model: Model, dtype: torch.dtype, device: torch.device, max_tokens: int) -> Rates:
    """Time three small operations shaped like the run's work, on its device and in its dtype."""
    hidden, head_dim = model.dit.hidden_size, model.dit.head_dim
    rows = _clamp(PROBE_FLOPS / (2 * hidden * hidden), 64, min(max_tokens, 4096))
    left = torch.randn(rows, hidden, dtype=dtype, device=device)
    right = torch.randn(hidden, hidden, dtype=dtype, device=device)
    matmul = _rate(lambda: left @ right, 2 * rows * hidden * hidden, device)

    length = _clamp(math.sqrt(PROBE_FLOPS / (4 * head_dim)), 64, min(max_tokens, 2048))
    query = torch.randn(1, 1, length, head_dim, dtype=dtype, device=device)
    attention = _rate(lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query),
                      4 * length * length * head_dim, device)

    channels = _vae_levels(model.vae_config)[0][0] if model.vae_config else 96
    side = _clamp(math.sqrt(PROBE_FLOPS / (2 * 27 * channels * channels)), 16, 256)
    conv = torch.nn.Conv3d(channels, channels, 3, padding=(0, 1, 1)).to(device, dtype)
    volume = torch.randn(1, channels, 3, side, side, dtype=dtype, device=device)
    with torch.no_grad():
        conv_rate = _rate(lambda: conv(volume), 2 * 27 * channels * channels * side * side, device)
    return Rates(matmul, attention, conv_rate)


def _clamp(value: float, low: int, high: int) -> int:
    return int(min(max(value, low), max(high, low)))


def _rate(operation: Callable[[], object], flops: float, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        operation()  # warm-up: kernel selection, allocation
        sync()
        started, repetitions = time.perf_counter(), 0
        while True:
            operation()
            sync()
            repetitions += 1
            elapsed = time.perf_counter() - started
            if elapsed >= PROBE_SECONDS:
                return flops * repetitions / elapsed
