"""How close two outputs are: the one comparison behind forward parity, task parity and the oracle scripts."""

from __future__ import annotations

import math

import numpy as np
import torch


def compare_outputs(output: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor,
                    peak: float | None = None) -> dict[str, float | None]:
    """max abs, relative L2 and cosine similarity of `output` against `reference`, computed in float64, and
    with `peak` the PSNR in dB (frames in [0, 1] use peak 1, latents the reference's largest magnitude).

    The numbers are strict JSON: a value that is not finite is None (the PSNR of identical outputs, the
    relative error against an all-zero reference, anything computed from NaN or infinite values).
    """
    out, ref = _float64(output), _float64(reference)
    diff = out - ref
    ref_norm, out_norm, diff_norm = float(ref.norm()), float(out.norm()), float(diff.norm())
    rel = diff_norm / ref_norm if ref_norm else (0.0 if diff_norm == 0 else math.inf)
    found = {"max_abs": float(diff.abs().max()) if diff.numel() else 0.0, "rel_l2": rel,
             "cosine": float(out @ ref) / (out_norm * ref_norm) if out_norm and ref_norm else 0.0}
    if peak is not None:
        mse = float((diff**2).mean()) if diff.numel() else 0.0
        found["psnr"] = _psnr(peak, mse)
    return {name: json_number(value) for name, value in found.items()}


def json_number(value: float) -> float | None:
    """Strict JSON has no NaN or infinity: those become None."""
    return value if math.isfinite(value) else None


def _psnr(peak: float, mse: float) -> float:
    if mse == 0:
        return math.inf
    ratio = peak**2 / mse
    return 10 * math.log10(ratio) if ratio > 0 else -math.inf  # a zero peak, an infinite or NaN error


def _float64(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).flatten()
    return torch.as_tensor(np.asarray(values, dtype=np.float64)).flatten()
