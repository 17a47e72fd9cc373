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
from torch import nn

from longcat_convert.core import keymap
from longcat_convert.core.errors import LongcatError

from .attention import LayerCache
from .blocks import dit_block
from .bsa import BsaParams
from .config import DiTConfig
from .layout import Slot, SlotWeights, attach_parameters, build_slots
from .stages import Grid, cache_entry, embed, embed_for_cache, head

if TYPE_CHECKING:
    from .lora_layers import RuntimeLora

@dataclass(frozen=True)
class KVCache:
    """Per-block keys/values of the conditioning latents, built by `LongcatDiT.build_kv_cache`."""

    num_latents: int
    grid: Grid
    layers: tuple[LayerCache, ...]


class LongcatDiT(nn.Module, SlotWeights):
    def __init__(self, config: dict, naming: str = "upstream", dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", where: str = "config.json",
                 slots: dict[str, Slot] | None = None):
        """Parameters are allocated uninitialised: fill them with `loading.load_dit` or `load_state_dict`.

        slots: where each role's tensors live; by default the project key map's for `naming` (a model family
        with more modules, such as the avatar DiT, passes its own)."""
        super().__init__()
        if naming not in keymap.NAMINGS:
            raise LongcatError(f"unknown naming {naming!r}; choose one of {', '.join(keymap.NAMINGS)}")
        self.naming = naming
        self.arch = DiTConfig.from_dict(config, naming, where)
        self.slots: dict[str, Slot] = (build_slots(keymap.expand(config, naming, where), naming) if slots is None
                                       else slots)
        attach_parameters(self, self.slots, dtype, device)
        self.runtime_loras: dict[str, list[RuntimeLora]] = {}  # see SlotWeights
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
        x, inputs = embed(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                          num_cond_latents, kv_cache)
        for index in range(self.arch.depth):
            x, _ = dit_block(self, index, x, inputs, None if kv_cache is None else kv_cache.layers[index])
        return head(self, x, inputs)

    def build_kv_cache(self, cond_latents: torch.Tensor) -> KVCache:
        """Run the conditioning latents alone (t = 0, no cross-attention) and keep every block's k/v."""
        x, inputs = embed_for_cache(self, cond_latents)
        layers = []
        for index in range(self.arch.depth):
            x, entry = dit_block(self, index, x, inputs)
            layers.append(cache_entry(entry))
        return KVCache(inputs.grid[0], inputs.grid, tuple(layers))


