"""Compare the effective weight deltas of two LoRA adapters exactly, from their low-rank factors.

A module's ΔW is a sum of terms scale·up·down, each owning a row range (a row block of a fused projection, or
one FastVideo target), with the scale each format's loader applies (alpha_scale; FastVideo's int(lora_alpha)/rank).
The relative Frobenius error between two such sums is computed in float64, row interval by row interval,
without forming ΔW: for the difference, down rows shared bit for bit by several terms are merged first (so
equal factors cancel exactly), then one thin QR of the shorter side gives the norm, with no squared norms
cancelling (accurate to ~1e-15 even when the difference is tiny); the reference norm comes from Gram matrices.
That costs O((rows + cols)·k²) instead of O(rows·cols·k). Tensors are read one module at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise

import torch

from . import keymap
from .dtypes import TORCH_DTYPE
from .io import SafetensorsHeader, read_tensor
from .lora_format import LoraModule, ParsedLora, fastvideo_scale

# reads one tensor of a file whose header is given: read_tensor by path, or SourceFiles.tensor from a held file
TensorReader = Callable[[SafetensorsHeader, str], torch.Tensor]


@dataclass(frozen=True)
class Term:
    """A low-rank piece of ΔW: rows [row, row + up.shape[0]) get scale·up·down."""

    row: int
    up: torch.Tensor
    down: torch.Tensor
    scale: float

    @property
    def stop(self) -> int:
        return self.row + self.up.shape[0]


def relative_delta_error(want: list[Term], got: list[Term], rows: int = 0) -> float:
    """‖ΔW_got − ΔW_want‖_F / ‖ΔW_want‖_F without forming ΔW (inf when the terms' column counts differ)."""
    terms = want + got
    widths = {t.down.shape[1] for t in terms}
    if len(widths) > 1:
        return math.inf
    if _same_terms(want, got):
        return 0.0
    cols = widths.pop() if widths else 0
    intervals = list(pairwise(sorted({0, rows, *(t.row for t in terms), *(t.stop for t in terms)})))
    diff_sq = sum(_difference_norm_sq(*_factors(want, start, stop, cols), *_factors(got, start, stop, cols))
                  for start, stop in intervals)
    if diff_sq == 0.0:
        return 0.0
    ref_sq = sum(_gram_norm_sq(*_factors(want, start, stop, cols)) for start, stop in intervals)
    return math.sqrt(diff_sq / ref_sq) if ref_sq else math.inf


def _same_terms(want: list[Term], got: list[Term]) -> bool:
    """Both sides are the same terms, factors equal bit for bit (a conversion that only moved them): the same ΔW,
    known without widening anything to float64."""
    if len(want) != len(got):
        return False
    pairs = zip(sorted(want, key=lambda t: t.row), sorted(got, key=lambda t: t.row), strict=True)
    return all(a.row == b.row and a.scale == b.scale and a.up.dtype == b.up.dtype and a.down.dtype == b.down.dtype
               and torch.equal(a.up, b.up) and torch.equal(a.down, b.down) for a, b in pairs)


def _factors(terms: list[Term], start: int, stop: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U [rows, k] and D [k, cols], new float64 tensors with U·D = Σ scale·up·down over rows [start, stop)."""
    ups, downs = [], []
    for term in terms:
        if term.row >= stop or term.stop <= start:
            continue
        up, down = term.up[start - term.row:stop - term.row], term.down
        if (start, stop) != (term.row, term.stop):  # part of a block-diagonal B: only its own columns touch these rows
            used = (up.amax(dim=0) != 0) | (up.amin(dim=0) != 0)
            up, down = up[:, used], down[used]
        ups.append(up.to(torch.float64, copy=True).mul_(term.scale))
        downs.append(down.to(torch.float64))
    if len(ups) == 1:
        return ups[0], downs[0]
    return (torch.cat([torch.zeros(stop - start, 0, dtype=torch.float64), *ups], dim=1),
            torch.cat([torch.zeros(0, cols, dtype=torch.float64), *downs]))


def _difference_norm_sq(want_up: torch.Tensor, want_down: torch.Tensor, got_up: torch.Tensor,
                        got_down: torch.Tensor) -> float:
    """‖want_up·want_down − got_up·got_down‖² with nothing cancelling (overwrites want_up): the up columns of down
    rows shared bit for bit are subtracted first (equal factors give exactly 0), then ‖U·D‖ = ‖R·D‖ for U = Q·R
    (or ‖U·Rᵀ‖ for Dᵀ = Q·R), QR on the shorter side."""
    if want_down.shape == got_down.shape and torch.equal(want_down, got_down):
        if torch.equal(want_up, got_up):
            return 0.0
        up, down = want_up.sub_(got_up), want_down
    else:
        down, groups = torch.unique(torch.cat([want_down, got_down]), dim=0, return_inverse=True)
        up = torch.zeros(want_up.shape[0], down.shape[0], dtype=torch.float64)
        up.index_add_(1, groups[:want_up.shape[1]], want_up).index_add_(1, groups[want_up.shape[1]:], got_up, alpha=-1)
    if up.shape[1] == 0 or not bool(up.any()):
        return 0.0
    if up.shape[0] <= down.shape[1]:
        return float(torch.linalg.matrix_norm(torch.linalg.qr(up, mode="r").R @ down)) ** 2
    return float(torch.linalg.matrix_norm(up @ torch.linalg.qr(down.T, mode="r").R.T)) ** 2


def _gram_norm_sq(up: torch.Tensor, down: torch.Tensor) -> float:
    """‖U·D‖² = Σ (UᵀU ∘ D·Dᵀ): cheap, and accurate where nothing cancels (the reference side of the ratio)."""
    return max(float(((up.T @ up) * (down @ down.T)).sum()), 0.0) if up.shape[1] else 0.0


class AdapterDeltas:
    """The ΔW of each upstream module of an adapter as Terms, read on demand (FastVideo targets are grouped under
    their upstream module by the key map; targets it does not know are listed in `unknown`).

    `read` reads a tensor (a conversion reads its source through the held files); `round_to` names the dtype a
    key is rounded to before widening to float64 (the source side of a conversion that casts)."""

    def __init__(self, lora: ParsedLora, expanded: keymap.ExpandedMap | None = None, read: TensorReader = read_tensor,
                 round_to: Mapping[str, str] | None = None):
        self.lora, self.read, self.round_to = lora, read, round_to or {}
        self.parts: dict[str, list[tuple[int, LoraModule]]] = {}  # upstream module -> (first row, record)
        self.unknown: list[str] = []
        by_target = expanded.linear_by_fastvideo() if lora.format == "fastvideo" else {}
        for name, record in lora.modules.items():
            if lora.format == "upstream":
                self.parts[name] = [(0, record)]
            elif name in by_target:
                linear, part = by_target[name]
                self.parts.setdefault(linear.upstream, []).append((part * linear.out_features // len(linear.fastvideo),
                                                                   record))
            else:
                self.unknown.append(name)

    def terms(self, module: str) -> list[Term]:
        terms = []
        for row, record in self.parts[module]:
            down, ups = self._load(record.down), [self._load(key) for key in record.ups]
            if self.lora.format == "fastvideo":
                alpha = self.lora.alphas.get(record.alpha)
                terms.append(Term(row, ups[0], down, 1.0 if alpha is None else fastvideo_scale(alpha, down.shape[0])))
                continue
            scale, rank = self.lora.alphas[record.alpha], down.shape[0] // len(ups)
            terms.extend(Term(row + j * up.shape[0], up, down if len(ups) == 1 else down[j * rank:(j + 1) * rank],
                              scale) for j, up in enumerate(ups))
        return terms

    def _load(self, key: str) -> torch.Tensor:
        tensor = self.read(self.lora.header, key)
        return tensor.to(TORCH_DTYPE[self.round_to[key]]) if key in self.round_to else tensor


@dataclass(frozen=True)
class ModuleDelta:
    module: str
    rel_error: float  # inf when `problem`
    tolerance: float
    problem: str | None = None  # why the factors cannot be compared

    @property
    def passed(self) -> bool:
        return self.problem is None and self.rel_error <= self.tolerance


@dataclass(frozen=True)
class DeltaComparison:
    modules: list[ModuleDelta]  # those in both adapters, sorted
    missing: list[str]  # only in `want`
    unexpected: list[str]  # only in `got`, then FastVideo targets the key map does not know

    @property
    def max_rel_error(self) -> float:
        return max((m.rel_error for m in self.modules if m.problem is None), default=0.0)

    @property
    def passed(self) -> bool:
        return not self.missing and not self.unexpected and all(m.passed for m in self.modules)


def compare_deltas(want: AdapterDeltas, got: AdapterDeltas, tolerance: Callable[[list[Term]], float]
                   ) -> DeltaComparison:
    """Module by module; `tolerance` gives the bound on the relative error from the terms of both sides."""
    modules = []
    for module in sorted(want.parts.keys() & got.parts.keys()):
        want_terms, got_terms = want.terms(module), got.terms(module)
        in_features = want_terms[0].down.shape[1]
        wrong = sorted({tuple(t.down.shape) for t in got_terms if t.down.shape[1] != in_features})
        bound = tolerance(want_terms + got_terms)
        if wrong:
            modules.append(ModuleDelta(module, math.inf, bound, f"lora_A shapes {wrong} do not take {in_features} inputs"))
        else:
            modules.append(ModuleDelta(module, relative_delta_error(want_terms, got_terms), bound))
    return DeltaComparison(modules, sorted(want.parts.keys() - got.parts.keys()),
                           sorted(got.parts.keys() - want.parts.keys()) + sorted(got.unknown))
