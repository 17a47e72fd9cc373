"""INT8 weight-only format of LongCat-Video-Avatar 1.5 (`base_model_int8/`): the arithmetic, nothing else.

Facts from upstream `longcat_video/modules/quantization.py` (restated, not copied):
* quantise one Linear: W in float32; per output row s = max(|W_row|) clamped below at 1e-8, divided by 127
  (float32); q = round-half-to-even(W / s) clamped to [-128, 127], int8. The scale is stored as float32.
* dequantise at run time in the input's dtype τ: W' = τ(q) · τ(s), the product rounded to τ.
Which tensors are quantised, their names and dtypes is data (`keymap.int8_expected`). torch is imported on use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCALE_FLOOR = 1e-8
LEVELS = 127.0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-row scale) of a 2-D weight of any floating dtype, bitwise as upstream stores them."""
    import torch

    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating weight, got {tuple(weight.shape)} {weight.dtype}")
    full = weight.to(torch.float32)
    scale = full.abs().amax(dim=1).clamp(min=SCALE_FLOOR) / LEVELS
    quantized = torch.round(full / scale.unsqueeze(1)).clamp(-128, 127).to(torch.int8)
    return quantized, scale


def dequantize_rows(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight upstream's QuantizedLinear computes for inputs of `dtype`: both factors cast to it, then
    multiplied in it."""
    return quantized.to(dtype) * scale.to(dtype).unsqueeze(1)
