"""The two random streams of the upstream pipeline
(reference/pipeline/README.md, "Random streams").

`user` is the generator the demos create once (`torch.Generator(device).manual_seed(seed)`) and pass to
every call: initial noise, then the VAE posterior samples of conditioning frames, in that order.

`default` stands for torch's *global* RNG, which upstream's refinement uses without a generator for two
draws: the posterior sample of the upsampled video and the `t_thresh` noise. Upstream never seeds it.
We mirror it by seeding a dedicated generator with the task seed: its draws are exactly those of
`torch.manual_seed(seed)` followed by generator-less draws on the same device, without touching the
caller's global RNG state. Reusing one `RandomStreams` across calls continues both streams the way the
demos' single generator and the never-reseeded global RNG continue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_convert.core.errors import LongcatError


@dataclass
class RandomStreams:
    user: torch.Generator
    default: torch.Generator
    seed: int

    @classmethod
    def from_seed(cls, seed: int, device: torch.device | str = "cpu") -> RandomStreams:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise LongcatError(f"seed must be a non-negative integer, got {seed!r}")
        device = torch.device(device)
        return cls(torch.Generator(device).manual_seed(seed), torch.Generator(device).manual_seed(seed), seed)


def randn(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
          device: torch.device | str) -> torch.Tensor:
    """A standard-normal draw of `shape` in `dtype` from `generator`, on the generator's own device."""
    if torch.device(device).type != generator.device.type:
        raise LongcatError(f"the random generator lives on {generator.device}, the draw on {device}")
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)
