"""3D rotary position embedding over a (t, h, w) token grid.

The head dimension is cut into a t part, then h, then w: h and w each get 2·(d//6) channels and t the
rest (d = 128 gives 44/42/42). Within each part, channel pairs (2i, 2i+1) rotate together by
position·base^(-2i/width). Angles and rotation are computed in fp32.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from longcat_convert.core.errors import LongcatError

BASE = 10000
Grid = tuple[int, int, int]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channel widths (t, h, w) of the three rotary parts."""
    if head_dim % 8:
        raise LongcatError(f"3D RoPE needs a head dim divisible by 8, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def axis_angles(length: int, width: int) -> torch.Tensor:
    """[length, width] angles for positions 0..length-1, each frequency repeated for its channel pair."""
    return position_angles(torch.arange(length, dtype=torch.float32), width)


def position_angles(positions: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] fp32 angles for arbitrary (possibly fractional) positions [...]."""
    inverse = 1.0 / (BASE ** (torch.arange(0, width, 2).float() / width))
    angles = positions.float()[..., None] * inverse.to(positions.device)
    return angles.repeat_interleave(2, dim=-1)


@lru_cache(maxsize=32)
def _grid_angles(grid: Grid, head_dim: int) -> torch.Tensor:
    return frame_grid_angles(tuple(float(t) for t in range(grid[0])), grid[1], grid[2], head_dim)


def frame_grid_angles(frame_positions: tuple[float, ...], height: int, width: int, head_dim: int) -> torch.Tensor:
    """[T·H·W, head_dim] fp32 angles for a grid whose latent frames sit at the given temporal positions."""
    widths = rope_split(head_dim)
    frames = len(frame_positions)
    parts = [position_angles(torch.tensor(frame_positions, dtype=torch.float32), widths[0]),
             axis_angles(height, widths[1]), axis_angles(width, widths[2])]
    return torch.cat([
        parts[0][:, None, None, :].expand(frames, height, width, -1),
        parts[1][None, :, None, :].expand(frames, height, width, -1),
        parts[2][None, None, :, :].expand(frames, height, width, -1),
    ], dim=-1).reshape(frames * height * width, head_dim)


def grid_angles(grid: Grid, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T·H·W, head_dim] fp32 angles for every token of the grid, tokens in t-major order."""
    return _grid_angles(tuple(int(n) for n in grid), head_dim).to(device)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., S, d] by angles [S, d]; computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * angles.cos() + rotate_pairs(xf) * angles.sin()).to(x.dtype)
