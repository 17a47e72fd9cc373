"""LoRA adapters in both on-disk formats.

Upstream format (reference/README.md, "Upstream LoRA format and runtime"): per target Linear
`lora___lorahyphen___<path>` with `lora_down.weight` [n·r, in], `lora_up.weight` [out, r] or
`lora_up.blocks.<j>.weight` [out/n, r], and `alpha_scale`.
It is applied at run time, never merged: y = W x + b + cast(up(down(x)))·multiplier·alpha_scale, with
the adapter cast to the model dtype and fp32 islands computing the branch in fp32.

FastVideo format (reference/README.md, "FastVideo LoRA format"): per target `<module>.lora_A` [r, in],
`.lora_B` [out, r], `.lora_alpha` (0-d), merged as W += (B·A)·(int(alpha)/r)·strength in the weight's
dtype (scale 1 when int(alpha) is 0).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from longcat_convert.core.errors import LongcatError
from longcat_convert.core.io import read_header, read_tensor
from longcat_convert.core.lora_format import ParsedLora, fastvideo_scale, parse

from .layout import SlotWeights


@dataclass
class UpstreamLoraModule:
    """One target Linear of an upstream-format LoRA. `ups` has one entry, or one per row block."""

    module: str
    down: torch.Tensor
    ups: list[torch.Tensor]
    alpha_scale: torch.Tensor

    @property
    def rank(self) -> int:
        return self.ups[0].shape[1]

    @property
    def out_features(self) -> int:
        return sum(up.shape[0] for up in self.ups)


@dataclass
class FastvideoLoraTarget:
    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    alpha: torch.Tensor | None

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def scale(self) -> float:
        """FastVideo's effective scale (`fastvideo_scale`); alpha absent means scale 1."""
        return 1.0 if self.alpha is None else fastvideo_scale(float(self.alpha), self.rank)


def read_upstream_lora(path: str | Path) -> dict[str, UpstreamLoraModule]:
    """Read an upstream-format LoRA file strictly: its first defect (an unexpected key, a missing part, inconsistent
    shapes, an unusable alpha_scale) is an error."""
    return upstream_modules(read_adapter(path, "upstream"))


def upstream_modules(lora: ParsedLora, only: Collection[str] | None = None) -> dict[str, UpstreamLoraModule]:
    """The tensors of an upstream-format adapter's modules (those named in `only`, or all)."""
    return {name: UpstreamLoraModule(name, _tensor(lora, m.down), [_tensor(lora, k) for k in m.ups],
                                     _tensor(lora, m.alpha).reshape(()))
            for name, m in sorted(lora.modules.items()) if only is None or name in only}


def read_fastvideo_lora(path: str | Path) -> dict[str, FastvideoLoraTarget]:
    """Read a FastVideo-format LoRA file strictly; as in FastVideo, a target without lora_alpha has scale 1."""
    return fastvideo_targets(read_adapter(path, "fastvideo"))


def fastvideo_targets(lora: ParsedLora, only: Collection[str] | None = None) -> dict[str, FastvideoLoraTarget]:
    """The tensors of a FastVideo-format adapter's targets (those named in `only`, or all)."""
    return {name: FastvideoLoraTarget(name, _tensor(lora, m.down), _tensor(lora, m.up),
                                      None if m.alpha is None else _tensor(lora, m.alpha))
            for name, m in sorted(lora.modules.items()) if only is None or name in only}


def read_adapter(path: str | Path, fmt: str) -> ParsedLora:
    """The keys and alphas of an adapter file in format `fmt`; its first defect is a one-line error (a FastVideo
    target without lora_alpha is none: FastVideo then uses scale 1)."""
    lora = parse(read_header(path))
    if lora.format not in (None, fmt):
        raise LongcatError(f"is a {lora.format}-format LoRA where a {fmt}-format one is expected", path)
    return lora.check(("lora_missing_alpha",) if fmt == "fastvideo" else ())


def _tensor(lora: ParsedLora, key: str) -> torch.Tensor:
    return read_tensor(lora.header, key)


class RuntimeLora:
    """An upstream-format adapter as applied by upstream's forward wrapper."""

    def __init__(self, module: UpstreamLoraModule, dtype: torch.dtype, device: torch.device, multiplier: float):
        self.down = module.down.to(device, dtype)
        self.ups = [up.to(device, dtype) for up in module.ups]
        self.alpha_scale = module.alpha_scale.to(device, dtype)
        self.multiplier = multiplier

    def __call__(self, x: torch.Tensor, fp32: bool) -> torch.Tensor:
        if self.down.device != x.device:  # the DiT was moved after the adapters were enabled (CPU offload)
            self.down, self.ups = self.down.to(x.device), [up.to(x.device) for up in self.ups]
            self.alpha_scale = self.alpha_scale.to(x.device)
        u = x.to(self.down.dtype)
        down, ups = self.down, self.ups
        if fp32:  # inside an fp32 island the branch is computed in fp32 from the adapter-dtype input
            u, down, ups = u.float(), down.float(), [up.float() for up in ups]
        z = F.linear(u, down)
        if len(ups) == 1:
            y = F.linear(z, ups[0])
        else:
            y = torch.cat([F.linear(chunk, up) for chunk, up in zip(z.chunk(len(ups), dim=-1), ups, strict=True)], dim=-1)
        return y.to(x.dtype) * self.multiplier * self.alpha_scale


def check_upstream_targets(dit: SlotWeights, lora: dict[str, UpstreamLoraModule], where: str | Path) -> None:
    for module, adapter in lora.items():
        slot = dit.slots.get(module)
        if slot is None or slot.kind != "linear":
            raise LongcatError(f"LoRA targets {module!r}, which is not a Linear of the DiT", where)
        out_features, in_features = slot.shapes["weight"]
        if adapter.down.shape[1] != in_features or adapter.out_features != out_features:
            raise LongcatError(f"LoRA for {module} maps {adapter.down.shape[1]}->{adapter.out_features}, "
                               f"the Linear {in_features}->{out_features}", where)


def enable_runtime_loras(dit: SlotWeights, loras: list[dict[str, UpstreamLoraModule]], multiplier: float = 1.0,
                         where: str | Path = "LoRA") -> None:
    """Replace the active runtime adapters with `loras` (several on one module are summed)."""
    for lora in loras:
        check_upstream_targets(dit, lora, where)
    dit.runtime_loras = {}
    for lora in loras:
        for module, adapter in lora.items():
            dit.runtime_loras.setdefault(module, []).append(RuntimeLora(adapter, dit.dtype, dit.device, multiplier))


def merge_fastvideo_lora(dit: SlotWeights, targets: dict[str, FastvideoLoraTarget], strength: float = 1.0,
                         where: str | Path = "LoRA") -> None:
    """Merge into effective weights (stacking on earlier merges), as FastVideo's LoRA layers do."""
    linears = {path for slot in dit.slots.values() if slot.kind == "linear" for path in slot.paths}
    deltas = {}
    for module, target in targets.items():
        if module not in linears:
            raise LongcatError(f"LoRA targets {module!r}, which is not a Linear of the {dit.naming} layout", where)
        key = f"{module}.weight"
        weight = dit.merged_weights.get(key, dit.get_parameter(key))
        if tuple(target.lora_b.shape[:1]) + tuple(target.lora_a.shape[1:]) != tuple(weight.shape):
            raise LongcatError(f"LoRA for {module}: B·A is {[target.lora_b.shape[0], target.lora_a.shape[1]]}, "
                               f"the weight {list(weight.shape)}", where)
        delta = target.lora_b.to(weight) @ target.lora_a.to(weight)
        delta *= target.scale * strength
        deltas[key] = weight + delta
    dit.merged_weights.update(deltas)


def clear_loras(dit: SlotWeights) -> None:
    dit.runtime_loras = {}
    dit.merged_weights = {}
