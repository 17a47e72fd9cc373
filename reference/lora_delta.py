"""Compare two LoRA weight deltas given as low-rank pieces, without forming the dense ΔW.

A module's ΔW is a sum of terms scale·up·down, each owning a row range (a row block of a fused
projection, or one FastVideo target). The relative Frobenius error between two such sums is computed
row interval by row interval from two thin QR factorisations, which costs O(rows·k²) instead of
O(rows·cols·k) and stays accurate to ~1e-15 (no cancellation of squared norms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch


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


def relative_delta_error(want: list[Term], got: list[Term], rows: int) -> float:
    """‖ΔW_got − ΔW_want‖_F / ‖ΔW_want‖_F without forming ΔW, row interval by row interval."""
    edges = sorted({0, rows, *(t.row for t in want + got), *(t.stop for t in want + got)})
    diff_sq = ref_sq = 0.0
    for start, stop in pairwise(edges):
        diff_sq += _lowrank_norm([(1.0, t) for t in want] + [(-1.0, t) for t in got], start, stop) ** 2
        ref_sq += _lowrank_norm([(1.0, t) for t in want], start, stop) ** 2
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_sq)


def _lowrank_norm(signed: list[tuple[float, Term]], start: int, stop: int) -> float:
    """Frobenius norm of Σ sign·scale·up[rows]·down restricted to rows [start, stop), via two thin QRs."""
    ups, downs = [], []
    for sign, term in signed:
        if term.row >= stop or term.stop <= start:
            continue
        up = term.up[start - term.row:stop - term.row].double() * (sign * term.scale)
        used = up.ne(0).any(dim=0)  # block-diagonal B: only its own columns touch these rows
        ups.append(up[:, used])
        downs.append(term.down.double()[used])
    if not ups or sum(u.shape[1] for u in ups) == 0:
        return 0.0
    r_up = torch.linalg.qr(torch.cat(ups, dim=1), mode="r").R
    r_down = torch.linalg.qr(torch.cat(downs, dim=0).T, mode="r").R
    return float(torch.linalg.matrix_norm(r_up @ r_down.T))
