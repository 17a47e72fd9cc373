"""The LongCat-Video DiT: one implementation, two parameter layouts.

`LongcatDiT(config, naming="upstream")` has exactly the upstream state-dict keys (fused `attn.qkv`,
`cross_attn.kv_linear`); `naming="fastvideo"` has exactly FastVideo's (`self_attn.to_q/to_k/to_v`, ...).
The compute never looks at names: it asks for a role's fused tensor, which for split layouts is the
dim-0 concatenation of the parts, so both layouts run the very same arithmetic on the same numbers.

LoRA hooks (see lora.py): `runtime_loras` maps a role to adapters added to that Linear's output at run
time (upstream semantics); `merged_weights` maps a state-dict key to an effective weight that replaces
the stored one (FastVideo's merge), leaving the parameters themselves untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from longcat_convert.core import keymap
from longcat_convert.core.errors import LongcatError

from .attention import LayerCache
from .blocks import BlockInputs, dit_block, final_layer
from .bsa import BsaParams
from .config import DiTConfig
from .embeddings import caption_embedding, patch_embed, timestep_embedding
from .layout import Slot, attach_parameters, build_slots

if TYPE_CHECKING:
    from .lora_layers import RuntimeLora

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class KVCache:
    """Per-block keys/values of the conditioning latents, built by `LongcatDiT.build_kv_cache`."""

    num_latents: int
    grid: Grid
    layers: tuple[LayerCache, ...]


class LongcatDiT(nn.Module):
    def __init__(self, config: dict, naming: str = "upstream", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", where: str = "config.json"):
        """Parameters are allocated uninitialised: fill them with `loading.load_dit` or `load_state_dict`."""
        super().__init__()
        if naming not in keymap.NAMINGS:
            raise LongcatError(f"unknown naming {naming!r}; choose one of {', '.join(keymap.NAMINGS)}")
        self.naming = naming
        self.arch = DiTConfig.from_dict(config, naming, where)
        self.slots: dict[str, Slot] = build_slots(keymap.expand(config, naming, where), naming)
        attach_parameters(self, self.slots, dtype, device)
        self.runtime_loras: dict[str, list[RuntimeLora]] = {}
        self.merged_weights: dict[str, torch.Tensor] = {}
        self.bsa: BsaParams | None = None
        if self.arch.enable_bsa:
            self.enable_bsa()

    # ---- parameter access by role -------------------------------------------------------------------

    @property
    def config(self) -> DiTConfig:
        """The hyper-parameters (`arch`); the diffusers model class replaces this with its config dict."""
        return self.arch

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor("x_embedder.proj", "weight").dtype

    @property
    def device(self) -> torch.device:
        return self.tensor("x_embedder.proj", "weight").device

    def tensor(self, role: str, param: str) -> torch.Tensor:
        """The role's tensor in upstream (fused) form, with any merged LoRA weight in place."""
        parts = [self.merged_weights[key] if key in self.merged_weights else self.get_parameter(key)
                 for key in self.slots[role].keys(param)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def linear(self, role: str, x: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """y = x·Wᵀ + b (+ runtime LoRA branches). `fp32` runs it as an fp32 island on any weight dtype."""
        weight = self.tensor(role, "weight")
        bias = self.tensor(role, "bias") if "bias" in self.slots[role].shapes else None
        if fp32:
            out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        else:
            out = F.linear(x, weight, bias)
        for adapter in self.runtime_loras.get(role, ()):
            out = out + adapter(x, fp32)
        return out

    # ---- block-sparse attention ---------------------------------------------------------------------

    def enable_bsa(self, params: BsaParams | None = None) -> None:
        """Switch BSA on for self-attention, with `params` or the config's `bsa_params` (else the defaults)."""
        self.bsa = params or self.arch.bsa_params or BsaParams()

    def disable_bsa(self) -> None:
        self.bsa = None

    # ---- forward ------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, num_cond_latents: int = 0,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Velocity for latents [B, C_in, T, H, W] -> fp32 [B, C_out, T, H, W].

        timestep: [B] or per frame [B, T]. encoder_hidden_states: [B, 1, L, C_cap] or [B, L, C_cap].
        num_cond_latents: leading latent frames that are clean conditioning. kv_cache: the conditioning
        was cached and `hidden_states` holds only the noise frames.
        """
        grid = self._grid(hidden_states)
        batch = hidden_states.shape[0]
        if kv_cache is not None:
            num_cond_latents = self._check_cache(kv_cache, grid, num_cond_latents)
        elif not 0 <= num_cond_latents <= grid[0]:
            raise LongcatError(f"num_cond_latents {num_cond_latents} is outside 0..{grid[0]}")
        x = patch_embed(self, hidden_states.to(self.device, self.dtype), self.arch.patch_size)
        t_emb = timestep_embedding(self, self._frame_timesteps(timestep, batch, grid[0]),
                                   self.arch.frequency_embedding_size)
        text, key_mask = caption_embedding(self, self._text(encoder_hidden_states, batch),
                                           _on(encoder_attention_mask, self.device), self.arch.text_tokens_zero_pad)
        inputs = BlockInputs(text, key_mask, t_emb, grid, self.arch.num_heads,
                             0 if kv_cache is not None else num_cond_latents, self.bsa)
        for index in range(self.arch.depth):
            x, _ = dit_block(self, index, x, inputs, None if kv_cache is None else kv_cache.layers[index])
        return self._unpatchify(final_layer(self, x, t_emb, grid[0]), grid).float()

    def build_kv_cache(self, cond_latents: torch.Tensor) -> KVCache:
        """Run the conditioning latents alone (t = 0, no cross-attention) and keep every block's k/v."""
        grid = self._grid(cond_latents)
        batch = cond_latents.shape[0]
        x = patch_embed(self, cond_latents.to(self.device, self.dtype), self.arch.patch_size)
        t_emb = timestep_embedding(self, torch.zeros(batch, grid[0], device=self.device),
                                   self.arch.frequency_embedding_size)
        inputs = BlockInputs(None, None, t_emb, grid, self.arch.num_heads, 0, self.bsa)
        layers = []
        for index in range(self.arch.depth):
            x, entry = dit_block(self, index, x, inputs)
            layers.append(LayerCache(entry.keys.contiguous(), entry.values.contiguous()))
        return KVCache(grid[0], grid, tuple(layers))

    # ---- helpers ------------------------------------------------------------------------------------

    def _grid(self, latents: torch.Tensor) -> Grid:
        if latents.ndim != 5 or latents.shape[1] != self.arch.in_channels:
            raise LongcatError(f"latents must be [B, {self.arch.in_channels}, T, H, W], got {list(latents.shape)}")
        sizes = latents.shape[2:]
        if any(size % step for size, step in zip(sizes, self.arch.patch_size, strict=True)):
            raise LongcatError(f"latent size {list(sizes)} is not divisible by patch {list(self.arch.patch_size)}")
        return tuple(size // step for size, step in zip(sizes, self.arch.patch_size, strict=True))

    def _frame_timesteps(self, timestep: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=self.device)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(-1, frames)
        if tuple(timestep.shape) != (batch, frames):
            raise LongcatError(f"timestep must be [{batch}] or [{batch}, {frames}], got {list(timestep.shape)}")
        # the model sees the timestep rounded to its own dtype (bf16 in the published runs)
        return timestep.to(self.dtype).float()

    def _text(self, text: torch.Tensor, batch: int) -> torch.Tensor:
        if text.ndim == 4 and text.shape[1] == 1:
            text = text[:, 0]
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.arch.caption_channels:
            raise LongcatError(f"encoder_hidden_states must be [{batch}, 1, L, {self.arch.caption_channels}], "
                               f"got {list(text.shape)}")
        return text.to(self.device, self.dtype)

    def _check_cache(self, cache: KVCache, grid: Grid, num_cond_latents: int) -> int:
        if len(cache.layers) != self.arch.depth:
            raise LongcatError(f"KV cache has {len(cache.layers)} layers, the model {self.arch.depth}")
        if cache.grid[1:] != grid[1:]:
            raise LongcatError(f"KV cache grid {list(cache.grid)} does not match latent grid {list(grid)}")
        if num_cond_latents not in (0, cache.num_latents):
            raise LongcatError(f"num_cond_latents {num_cond_latents} disagrees with the cache ({cache.num_latents})")
        return cache.num_latents

    def _unpatchify(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """[B, N, (pt ph pw C)] -> [B, C, T·pt, H·ph, W·pw]."""
        batch = x.shape[0]
        (pt, ph, pw), channels = self.arch.patch_size, self.arch.out_channels
        x = x.view(batch, *grid, pt, ph, pw, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(batch, channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
