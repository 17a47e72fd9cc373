"""Where each DiT parameter lives under a given naming.

Compute code addresses a module by its *role*: its upstream module name (`blocks.3.attn.qkv`). A slot
says which module path(s) hold that role's tensors in the chosen naming: one path for upstream names,
several for FastVideo's row-split projections (`self_attn.to_q/to_k/to_v`), whose dim-0
concatenation is the fused tensor. The slots come from the project's key map, so both namings
expose exactly the key sets the converter and validator expect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from longcat_convert.core import keymap

if TYPE_CHECKING:
    from .lora_layers import RuntimeLora


class Weights(Protocol):
    """What the compute functions need from a model: fused tensors and linear layers by role."""

    def tensor(self, role: str, param: str) -> torch.Tensor: ...

    def linear(self, role: str, x: torch.Tensor, fp32: bool = False) -> torch.Tensor: ...


class SlotWeights:
    """`Weights` over `slots`: a role's fused tensor and Linear, with the LoRA hooks.

    `runtime_loras` maps a role to adapters added to that Linear's output at run time (upstream semantics);
    `merged_weights` maps a state-dict key to an effective weight that replaces the stored one (FastVideo's
    merge). Where a stored key lives is the subclass's `get_parameter` (the whole model, or one streamed block).
    """

    slots: dict[str, Slot]
    runtime_loras: dict[str, list[RuntimeLora]]
    merged_weights: dict[str, torch.Tensor]

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


@dataclass
class Slot:
    role: str
    kind: str
    paths: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # fused (upstream) shape per param

    def keys(self, param: str) -> tuple[str, ...]:
        return tuple(f"{path}.{param}" for path in self.paths)


def build_slots(expanded: keymap.ExpandedMap, naming: str) -> dict[str, Slot]:
    slots: dict[str, Slot] = {}
    for rule in expanded.params:
        keys = rule.keys(naming)
        paths = tuple(key.removesuffix(f".{rule.param}") for key in keys)
        slot = slots.setdefault(rule.module, Slot(rule.module, rule.kind, paths))
        slot.shapes[rule.param] = rule.shape
    return slots


def attach_parameters(root: nn.Module, slots: dict[str, Slot], dtype: torch.dtype,
                      device: torch.device | str) -> None:
    """Register one (uninitialised) parameter per state-dict key under `root`, making containers as needed."""
    for slot in slots.values():
        for param, shape in slot.shapes.items():
            part_shape = (shape[0] // len(slot.paths), *shape[1:])
            for path in slot.paths:
                holder = _container(root, path)
                tensor = torch.empty(part_shape, dtype=dtype, device=device)
                holder.register_parameter(param, nn.Parameter(tensor, requires_grad=False))


def _container(root: nn.Module, path: str) -> nn.Module:
    module = root
    for name in path.split("."):
        child = module._modules.get(name)
        if child is None:
            child = nn.Module()
            module.add_module(name, child)
        module = child
    return module
