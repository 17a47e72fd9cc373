"""Run a block of torch work on a given number of intra-op threads, then restore the caller's setting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """`count` threads inside the block (None or 0 leaves the setting alone); torch is imported only here."""
    import torch

    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
