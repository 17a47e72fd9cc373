"""Block-sparse attention as an exact dense, block-masked reference
(reference/README.md, "Block-sparse attention").

Tokens come in t-major (t, h, w) order. Each grid is cut into 3D chunks; a query chunk keeps a set of
key chunks chosen from the dot products of chunk-mean vectors, and each query attends with an exact
softmax over the union of the tokens of its kept key chunks (no key chunk kept: output exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_convert.core.errors import LongcatError

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class BsaParams:
    sparsity: float | None = 0.9375
    cdf_threshold: float | None = None
    chunk_q: Grid = (4, 4, 4)
    chunk_k: Grid = (4, 4, 4)

    def __post_init__(self) -> None:
        if self.sparsity is None and self.cdf_threshold is None:
            raise LongcatError("block-sparse attention needs a sparsity, a cdf_threshold or both")
        if self.sparsity is not None and not 0 <= self.sparsity <= 1:
            raise LongcatError(f"BSA sparsity must lie in [0, 1], got {self.sparsity}")
        for chunk in (self.chunk_q, self.chunk_k):
            if len(chunk) != 3 or any(not isinstance(c, int) or c <= 0 for c in chunk):
                raise LongcatError(f"BSA chunk shapes must be 3 positive integers, got {list(chunk)}")

    @classmethod
    def from_config(cls, params: dict, where: str = "config.json") -> BsaParams:
        if not isinstance(params, dict):
            raise LongcatError(f"bsa_params must be an object, got {params!r}", where)
        known = {"sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise LongcatError(f"bsa_params has unknown fields {unknown}", where)
        # Absent fields fall back to the defaults of upstream's kernel entry point, not to the published values.
        return cls(
            sparsity=params.get("sparsity", 0.875),
            cdf_threshold=params.get("cdf_threshold"),
            chunk_q=tuple(params.get("chunk_3d_shape_q", (4, 4, 8))),
            chunk_k=tuple(params.get("chunk_3d_shape_k", (4, 4, 8))),
        )


def chunk_index(grid: Grid, chunk: Grid, device: torch.device | None = None) -> torch.Tensor:
    """For every token (t-h-w order) the row-major index of the chunk it falls in."""
    for axis, (size, step) in enumerate(zip(grid, chunk, strict=True)):
        if size % step:
            raise LongcatError(f"BSA grid {list(grid)} is not divisible by chunk {list(chunk)} (axis {axis})")
    n_h, n_w = grid[1] // chunk[1], grid[2] // chunk[2]
    t = torch.arange(grid[0], device=device)[:, None, None] // chunk[0]
    h = torch.arange(grid[1], device=device)[None, :, None] // chunk[1]
    w = torch.arange(grid[2], device=device)[None, None, :] // chunk[2]
    return ((t * n_h + h) * n_w + w).reshape(-1)


def chunk_means(x: torch.Tensor, grid: Grid, chunk: Grid) -> torch.Tensor:
    """[B, heads, S, d] -> [B, heads, M, d]: the mean vector of each chunk, in the input dtype."""
    b, heads, _, d = x.shape
    nt, nh, nw = grid[0] // chunk[0], grid[1] // chunk[1], grid[2] // chunk[2]
    blocks = x.reshape(b, heads, nt, chunk[0], nh, chunk[1], nw, chunk[2], d)
    blocks = blocks.permute(0, 1, 2, 4, 6, 3, 5, 7, 8).reshape(b, heads, nt * nh * nw, -1, d)
    return blocks.mean(dim=3)


def select_chunks(scores: torch.Tensor, params: BsaParams, head_dim: int) -> torch.Tensor:
    """Boolean [B, heads, Mq, Mk]: which key chunks each query chunk keeps."""
    num_k = scores.shape[-1]
    topk = int((1 - params.sparsity) * num_k) if params.sparsity is not None else 0
    if params.cdf_threshold is None:
        order = torch.topk(scores, topk, dim=-1).indices
        counts = torch.full(scores.shape[:-1], topk, device=scores.device)
    else:
        weights = torch.softmax(scores * (1 / head_dim**0.5), dim=-1)
        ranked = torch.sort(weights, dim=-1, descending=True)
        cdf = torch.cumsum(ranked.values, dim=-1).float()
        threshold = torch.full((*cdf.shape[:-1], 1), params.cdf_threshold, device=cdf.device)
        counts = torch.searchsorted(cdf.contiguous(), threshold, right=True).squeeze(-1).clamp_min(topk)
        order = ranked.indices
    keep_rank = torch.arange(order.shape[-1], device=scores.device) < counts[..., None]
    selected = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return selected.scatter(-1, order, keep_rank.expand(order.shape))


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_q: Grid, grid_k: Grid,
                           params: BsaParams) -> torch.Tensor:
    """q [B, heads, Sq, d], k/v [B, heads, Sk, d] in t-h-w token order -> [B, heads, Sq, d] (q's dtype)."""
    head_dim = q.shape[-1]
    if grid_q[0] * grid_q[1] * grid_q[2] != q.shape[2] or grid_k[0] * grid_k[1] * grid_k[2] != k.shape[2]:
        raise LongcatError(f"BSA grids {list(grid_q)}/{list(grid_k)} do not match {q.shape[2]}/{k.shape[2]} tokens")
    q_chunk, k_chunk = chunk_index(grid_q, params.chunk_q, q.device), chunk_index(grid_k, params.chunk_k, q.device)
    scores = chunk_means(q, grid_q, params.chunk_q) @ chunk_means(k, grid_k, params.chunk_k).transpose(-1, -2)
    selected = select_chunks(scores, params, head_dim)
    token_mask = selected[:, :, q_chunk][:, :, :, k_chunk]
    logits = (q.float() @ k.float().transpose(-1, -2)) * head_dim**-0.5
    logits = logits.masked_fill(~token_mask, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    # Unnormalised probabilities meet V in V's dtype and the sum is divided out afterwards, as the kernel does.
    probs = torch.exp(logits - row_max)
    total = probs.sum(dim=-1, keepdim=True)
    out = (probs.to(v.dtype).float() @ v.float()) / total.clamp_min(torch.finfo(torch.float32).tiny)
    return out.to(q.dtype)
