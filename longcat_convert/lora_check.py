"""Check that a converted LoRA has the same effective weight delta as its source, module by module.

Instead of forming ΔW (out × in, up to hundreds of MB per module at full size) we compare ΔW·X for a
few fixed random probe columns X, in float64: equal factors give equal responses up to summation
order, and a dropped block, a wrong row order or a wrong scale shows up at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import keymap
from .dtypes import TORCH_DTYPE
from .io import SafetensorsHeader, read_tensor
from .lora import ParsedLora, fastvideo_scale

PROBES = 4

# reads one tensor of a file whose header is given: read_tensor by path, or SourceFiles.tensor from a held file
TensorReader = Callable[[SafetensorsHeader, str], torch.Tensor]


@dataclass(frozen=True)
class LoraCheckResult:
    adapter: str
    modules: int
    max_rel_error: float
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return not self.missing and not self.extra and self.max_rel_error <= self.tolerance

    def to_json(self) -> dict:
        return {"adapter": self.adapter, "modules": self.modules, "max_rel_error": self.max_rel_error,
                "tolerance": self.tolerance, "missing_modules": list(self.missing),
                "extra_modules": list(self.extra), "passed": self.passed}


def _probe(in_features: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234 + in_features)
    return torch.randn(in_features, PROBES, generator=generator, dtype=torch.float64)


def _load(read: TensorReader, header: SafetensorsHeader, key: str, round_to: str | None) -> torch.Tensor:
    tensor = read(header, key)
    if round_to is not None:
        tensor = tensor.to(TORCH_DTYPE[round_to])
    return tensor.to(torch.float64)


def _scalar(read: TensorReader, header: SafetensorsHeader, key: str) -> float:
    return float(read(header, key).double().reshape(-1)[0])


def upstream_responses(lora: ParsedLora, round_to: dict[str, str] | None = None,
                       read: TensorReader = read_tensor) -> dict[str, torch.Tensor]:
    """ΔW·X per module of an upstream-format adapter: alpha_scale · blockdiag(U) · D · X."""
    round_to, header = round_to or {}, lora.header
    responses = {}
    for module, record in lora.modules.items():
        down = _load(read, header, record.down, round_to.get(record.down))
        hidden = down @ _probe(down.shape[1])
        rank = down.shape[0] // record.n_blocks
        parts = [_load(read, header, key, round_to.get(key)) @ hidden[j * rank:(j + 1) * rank]
                 for j, key in enumerate(record.ups)]
        responses[module] = torch.cat(parts) * _scalar(read, header, record.alpha)
    return responses


def fastvideo_responses(lora: ParsedLora, expanded: keymap.ExpandedMap,
                        round_to: dict[str, str] | None = None, read: TensorReader = read_tensor
                        ) -> dict[str, torch.Tensor]:
    """ΔW·X per upstream module of a FastVideo-format adapter, with the scale FastVideo applies."""
    round_to, header = round_to or {}, lora.header
    by_target = expanded.linear_by_fastvideo()
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for name, record in lora.modules.items():
        a = _load(read, header, record.down, round_to.get(record.down))
        b = _load(read, header, record.up, round_to.get(record.up))
        scale = fastvideo_scale(_scalar(read, header, record.alpha), a.shape[0])
        linear, part = by_target.get(name, (None, 0))
        key = linear.upstream if linear else f"<unknown {name}>"
        pieces.setdefault(key, {})[part] = b @ (a @ _probe(a.shape[1])) * scale
    responses = {}
    for module, parts in pieces.items():
        linear = expanded.linears.get(module)
        k = len(linear.fastvideo) if linear else 1
        rows = next(iter(parts.values())).shape[0]
        responses[module] = torch.cat([parts.get(t, torch.zeros(rows, PROBES, dtype=torch.float64)) for t in range(k)])
    return responses


def responses(lora: ParsedLora, expanded: keymap.ExpandedMap, round_to: dict[str, str] | None = None,
              read: TensorReader = read_tensor) -> dict[str, torch.Tensor]:
    if lora.format == "upstream":
        return upstream_responses(lora, round_to, read)
    return fastvideo_responses(lora, expanded, round_to, read)


def compare(adapter: str, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
            tolerance: float) -> LoraCheckResult:
    missing = tuple(sorted(set(source) - set(target)))
    extra = tuple(sorted(set(target) - set(source)))
    worst = 0.0
    for module in set(source) & set(target):
        reference = source[module]
        error = (target[module] - reference).abs().max().item() if target[module].shape == reference.shape else float("inf")
        worst = max(worst, error / max(reference.abs().max().item(), 1e-30))
    return LoraCheckResult(adapter, len(source), worst, missing, extra, tolerance)
