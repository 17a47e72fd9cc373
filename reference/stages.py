"""The DiT forward outside its blocks: checked inputs -> tokens and shared block inputs, and the output head.

`LongcatDiT` runs embed → every block → head with all its weights in memory; the streamed forward
(`streamed.py`) runs the very same functions with one block's weights at a time. Both pass a `StageModel`:
anything with the config, the compute dtype and device, and `Weights` access by role.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from longcat_convert.core.errors import LongcatError

from .attention import LayerCache
from .blocks import BlockInputs, final_layer
from .bsa import BsaParams
from .config import DiTConfig
from .embeddings import caption_embedding, patch_embed, timestep_embedding

if TYPE_CHECKING:
    from .dit import KVCache

Grid = tuple[int, int, int]


class StageModel(Protocol):
    arch: DiTConfig
    bsa: BsaParams | None

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def tensor(self, role: str, param: str) -> torch.Tensor: ...

    def linear(self, role: str, x: torch.Tensor, fp32: bool = False) -> torch.Tensor: ...


def embed(model: StageModel, hidden_states: torch.Tensor, timestep: torch.Tensor,
          encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None,
          num_cond_latents: int = 0, kv_cache: KVCache | None = None) -> tuple[torch.Tensor, BlockInputs]:
    """Latent tokens [B, N, hidden] and what every block shares (see `LongcatDiT.forward` for the arguments)."""
    config = model.arch
    grid = latent_grid(config, hidden_states)
    batch = hidden_states.shape[0]
    if kv_cache is not None:
        check_cache(config, kv_cache, grid, num_cond_latents)
    elif not 0 <= num_cond_latents <= grid[0]:
        raise LongcatError(f"num_cond_latents {num_cond_latents} is outside 0..{grid[0]}")
    x = patch_embed(model, hidden_states.to(model.device, model.dtype), config.patch_size)
    t_emb = timestep_embedding(model, frame_timesteps(model, timestep, batch, grid[0]),
                               config.frequency_embedding_size)
    text, key_mask = caption_embedding(model, caption(model, encoder_hidden_states, batch),
                                       _on(encoder_attention_mask, model.device), config.text_tokens_zero_pad)
    return x, BlockInputs(text, key_mask, t_emb, grid, config.num_heads,
                          0 if kv_cache is not None else num_cond_latents, model.bsa)


def embed_for_cache(model: StageModel, cond_latents: torch.Tensor) -> tuple[torch.Tensor, BlockInputs]:
    """Tokens of the conditioning latents alone, at t = 0 and without cross-attention, for a KV cache."""
    config = model.arch
    grid = latent_grid(config, cond_latents)
    batch = cond_latents.shape[0]
    x = patch_embed(model, cond_latents.to(model.device, model.dtype), config.patch_size)
    t_emb = timestep_embedding(model, torch.zeros(batch, grid[0], device=model.device),
                               config.frequency_embedding_size)
    return x, BlockInputs(None, None, t_emb, grid, config.num_heads, 0, model.bsa)


def cache_entry(entry: LayerCache | None) -> LayerCache:
    if entry is None:
        raise LongcatError("a block run for the KV cache returned no keys/values")
    return LayerCache(entry.keys.contiguous(), entry.values.contiguous())


def head(model: StageModel, x: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """Final layer and unpatchify: fp32 [B, C_out, T, H, W]."""
    return unpatchify(model.arch, final_layer(model, x, inputs.t_emb, inputs.grid[0]), inputs.grid).float()


def latent_grid(config: DiTConfig, latents: torch.Tensor) -> Grid:
    if latents.ndim != 5 or latents.shape[1] != config.in_channels:
        raise LongcatError(f"latents must be [B, {config.in_channels}, T, H, W], got {list(latents.shape)}")
    sizes = latents.shape[2:]
    if any(size % step for size, step in zip(sizes, config.patch_size, strict=True)):
        raise LongcatError(f"latent size {list(sizes)} is not divisible by patch {list(config.patch_size)}")
    return tuple(size // step for size, step in zip(sizes, config.patch_size, strict=True))


def frame_timesteps(model: StageModel, timestep: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    timestep = torch.as_tensor(timestep, device=model.device)
    if timestep.ndim == 1:
        timestep = timestep[:, None].expand(-1, frames)
    if tuple(timestep.shape) != (batch, frames):
        raise LongcatError(f"timestep must be [{batch}] or [{batch}, {frames}], got {list(timestep.shape)}")
    # the model sees the timestep rounded to its own dtype (bf16 in the published runs)
    return timestep.to(model.dtype).float()


def caption(model: StageModel, text: torch.Tensor, batch: int) -> torch.Tensor:
    if text.ndim == 4 and text.shape[1] == 1:
        text = text[:, 0]
    if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != model.arch.caption_channels:
        raise LongcatError(f"encoder_hidden_states must be [{batch}, 1, L, {model.arch.caption_channels}], "
                           f"got {list(text.shape)}")
    return text.to(model.device, model.dtype)


def check_cache(config: DiTConfig, cache: KVCache, grid: Grid, num_cond_latents: int) -> None:
    if len(cache.layers) != config.depth:
        raise LongcatError(f"KV cache has {len(cache.layers)} layers, the model {config.depth}")
    if cache.grid[1:] != grid[1:]:
        raise LongcatError(f"KV cache grid {list(cache.grid)} does not match latent grid {list(grid)}")
    if num_cond_latents not in (0, cache.num_latents):
        raise LongcatError(f"num_cond_latents {num_cond_latents} disagrees with the cache ({cache.num_latents})")


def unpatchify(config: DiTConfig, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """[B, N, (pt ph pw C)] -> [B, C, T·pt, H·ph, W·pw]."""
    batch = x.shape[0]
    (pt, ph, pw), channels = config.patch_size, config.out_channels
    x = x.view(batch, *grid, pt, ph, pw, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(batch, channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
