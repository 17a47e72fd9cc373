"""Weight-only INT8 Linears as upstream's `QuantizedLinear` stores and computes them (`modules/quantization.py`).

Stored per quantised Linear `<m>`: `<m>.weight_int8` int8 [out, in], `<m>.weight_scale` fp32 [out] (one scale per
output row, symmetric) and, if biased, `<m>.bias` bf16 — no `<m>.weight`. Every Linear is quantised except those
whose name contains `final_layer.linear` (upstream's hard-coded skip list, a substring test).

At run time, for an input of dtype τ: W = τ(int8) · τ(scale) (the product rounded in τ), b = τ(bias), y = x·Wᵀ + b.
Inputs that upstream feeds in fp32 (timestep MLP, adaLN modulations) therefore dequantise exactly in fp32; the
others dequantise in the model dtype (bf16 in the published runs).
"""

from __future__ import annotations

import torch
from torch import nn

from longcat_convert.core.errors import LongcatError

from ..layout import Slot, _container

SKIP_SUBSTRING = "final_layer.linear"
INT8_PARTS = ("weight_int8", "weight_scale", "bias")
INT8_DTYPES = {"weight_int8": torch.int8, "weight_scale": torch.float32, "bias": torch.bfloat16}


def quantized_roles(slots: dict[str, Slot]) -> frozenset[str]:
    """The Linears upstream's loader turns into QuantizedLinear."""
    return frozenset(role for role, slot in slots.items() if slot.kind == "linear" and SKIP_SUBSTRING not in role)


def int8_shapes(slot: Slot) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of one quantised Linear's buffers."""
    path = _single_path(slot)
    out_features = slot.shapes["weight"][0]
    shapes = {f"{path}.weight_int8": slot.shapes["weight"], f"{path}.weight_scale": (out_features,)}
    if "bias" in slot.shapes:
        shapes[f"{path}.bias"] = (out_features,)
    return shapes


def attach_int8_buffers(root: nn.Module, slot: Slot, device: torch.device | str) -> None:
    holder = _container(root, _single_path(slot))
    for key, shape in int8_shapes(slot).items():
        part = key.rsplit(".", 1)[1]
        holder.register_buffer(part, torch.empty(shape, dtype=INT8_DTYPES[part], device=device))


def dequantize(weight_int8: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """τ(q) · τ(s) per row, computed in τ = `dtype`."""
    return weight_int8.to(dtype) * weight_scale.to(dtype).unsqueeze(1)


def _single_path(slot: Slot) -> str:
    if len(slot.paths) != 1:
        raise LongcatError(f"{slot.role} is split into {len(slot.paths)} tensors in this naming; upstream's INT8 format "
                           "stores one weight_int8/weight_scale per Linear")
    return slot.paths[0]
