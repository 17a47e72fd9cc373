"""Classifier-free guidance with the "optimized scale" of CFG-Zero*
(reference/pipeline/README.md, "Classifier-free guidance (CFG-Zero*)").

The model batch is [uncond, cond]. Per sample, over every element of the model output:
    s* = <c, u> / (||u||² + 1e-8),   v = u·s* + g·(c − u·s*)   (= g·c + (1 − g)·s*·u)
No zero-init steps. Upstream reshapes s* to 4 dims and broadcasts it against the 5-D output, which only
works for batch 1, so batch 1 is the only supported case.
"""

from __future__ import annotations

import torch

from longcat_convert.core.errors import LongcatError

EPS = 1e-8


def uses_cfg(guidance: float) -> bool:
    return guidance > 1.0


def optimized_scale(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """[B, N] flattened outputs -> [B, 1] scale s* = <c, u> / (||u||² + 1e-8)."""
    dot = torch.sum(cond * uncond, dim=1, keepdim=True)
    return dot / (torch.sum(uncond**2, dim=1, keepdim=True) + EPS)


def cfg_zero_star(output: torch.Tensor, guidance: float) -> torch.Tensor:
    """Combine a [2, ...] model output ordered [uncond, cond] into one guided [1, ...] velocity."""
    if output.shape[0] != 2:
        raise LongcatError(f"guidance needs the model batch [uncond, cond] of a single sample, got batch "
                           f"{output.shape[0]}")
    uncond, cond = output.chunk(2)
    scale = optimized_scale(cond.reshape(1, -1), uncond.reshape(1, -1)).view(1, *([1] * (output.ndim - 1)))
    # the same operation order as upstream, so results agree bit for bit
    return uncond * scale + guidance * (cond - uncond * scale)
