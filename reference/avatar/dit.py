"""The LongCat-Video-Avatar DiT (v1.0 and v1.5): the base reference DiT plus the audio path.

`LongcatAvatarDiT(config)` holds exactly upstream's state-dict keys for an avatar `config.json` (base keys +
audio modules, `params.py`); `slots_for` swaps in another naming. With `int8=True` every Linear but
`final_layer.linear` holds upstream's INT8 buffers instead of a weight and computes as `QuantizedLinear`
(`int8.py`). Everything else (embedders, final layer, text cross-attention, FFN, fp32 islands, runtime LoRA) is
the base reference's code.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from longcat_convert.core.errors import LongcatError

from ..dit import KVCache, LongcatDiT
from ..stages import cache_entry, embed, embed_for_cache, head, latent_grid
from .audio_attention import token_masks
from .audio_proj import audio_tokens, frame_tokens, speaker_layout
from .block import AudioInputs, avatar_block
from .config import AvatarConfig
from .int8 import attach_int8_buffers, dequantize, quantized_roles
from .params import SlotsFor, upstream_slots
from .self_attention import Reference


class LongcatAvatarDiT(LongcatDiT):
    def __init__(self, config: dict, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 where: str = "config.json", slots_for: SlotsFor = upstream_slots, int8: bool = False,
                 naming: str = "upstream"):
        """Tensors are allocated uninitialised: fill them with `avatar.loading` or `load_state_dict`.

        naming: which head-count field the config uses (the base key map's namings); slots_for: where each
        tensor lives (default: upstream names)."""
        slots = slots_for(config, where)
        quantized = quantized_roles(slots) if int8 else frozenset()
        plain = {role: slot for role, slot in slots.items() if role not in quantized}
        super().__init__(config, naming, dtype, device, where, slots=plain)
        self.slots = slots
        self.int8_roles = quantized
        for role in sorted(quantized):
            attach_int8_buffers(self, slots[role], device)
        self.avatar = AvatarConfig.from_dict(config, where)

    def linear(self, role: str, x: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        if role not in self.int8_roles:
            return super().linear(role, x, fp32)
        module = self.get_submodule(self.slots[role].paths[0])
        inputs = x.float() if fp32 else x
        bias = module.bias.to(inputs.dtype) if "bias" in self.slots[role].shapes else None
        out = F.linear(inputs, dequantize(module.weight_int8, module.weight_scale, inputs.dtype), bias)
        for adapter in self.runtime_loras.get(role, ()):
            out = out + adapter(x, fp32)
        return out

    # ---- forward ------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, num_cond_latents: int = 0, *,
                audio_embs: torch.Tensor, num_ref_latents: int | None = None, ref_img_index: int | None = None,
                mask_frame_range: int | None = None, ref_target_masks: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """Velocity for latents [B, C_in, T, H, W] -> fp32 [B, C_out, T, H, W], as upstream's forward.

        audio_embs [B_a, 1+V·n, W, S, C_a]: one window per pixel frame (B_a = B; several speakers of one sample
        when ref_target_masks [n_cls, H_px, W_px] is given). num_ref_latents / ref_img_index / mask_frame_range:
        the continuation's reference latent (latent frame 0), None when not given. kv_cache: from
        `build_kv_cache`; `hidden_states` then holds only the noise frames.
        """
        grid = latent_grid(self.arch, hidden_states)
        x, inputs = embed(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                          num_cond_latents, kv_cache)
        audio = self._audio_inputs(audio_embs, grid, hidden_states.shape[0], num_ref_latents, ref_target_masks,
                                   cached=kv_cache is not None,
                                   num_cond_latents=num_cond_latents if kv_cache is None else kv_cache.num_latents)
        reference = Reference(num_ref_latents, ref_img_index, mask_frame_range)
        for index in range(self.arch.depth):
            layer = None if kv_cache is None else kv_cache.layers[index]
            x, _ = avatar_block(self, index, x, inputs, audio, reference, layer)
        return head(self, x, inputs)

    def build_kv_cache(self, cond_latents: torch.Tensor, num_ref_latents: int | None = None,
                       ref_img_index: int | None = None) -> KVCache:
        """Run the reference + conditioning latents alone (every frame conditioning, t = 0, no cross-attention)
        and keep every block's RMS-normed keys (before RoPE) and values, as upstream's cache-building call."""
        x, inputs = embed_for_cache(self, cond_latents)
        inputs = replace(inputs, num_cond_latents=inputs.grid[0])  # upstream's cache call: every frame conditioning
        reference = Reference(num_ref_latents, ref_img_index)
        layers = []
        for index in range(self.arch.depth):
            x, entry = avatar_block(self, index, x, inputs, None, reference)
            layers.append(cache_entry(entry))
        return KVCache(inputs.grid[0], inputs.grid, tuple(layers))

    # ---- helpers ------------------------------------------------------------------------------------

    def _audio_inputs(self, audio_embs: torch.Tensor, grid: tuple[int, int, int], batch: int,
                      num_ref_latents: int | None, ref_target_masks: torch.Tensor | None, cached: bool,
                      num_cond_latents: int) -> AudioInputs:
        if audio_embs is None:
            raise LongcatError("audio_embs is required (zero features stand for silence)")
        tokens = audio_tokens(self, audio_embs.to(self.device, self.dtype), self.avatar)
        tokens = frame_tokens(tokens, grid[0], num_ref_latents)
        multi = ref_target_masks is not None
        masks = None
        if multi:
            if ref_target_masks.ndim != 3 or ref_target_masks.shape[0] < 2:
                raise LongcatError(f"ref_target_masks must be [n_cls >= 2, H, W] (speaker 1, speaker 2, ...), got "
                                   f"{list(ref_target_masks.shape)}")
            if not cached and num_cond_latents == 0:
                raise LongcatError("ref_target_masks needs num_cond_latents > 0 (the speakers are located in the "
                                   "first latent frame)")
            masks = token_masks(ref_target_masks.to(self.device), grid[1:], self.dtype)
        return AudioInputs(speaker_layout(tokens, batch, multi), masks, audio_embs.shape[0] if multi else None,
                           self.avatar.audio_prenorm, self.avatar.class_range, self.avatar.class_interval)

