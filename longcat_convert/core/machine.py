"""What this machine has: memory as the OS reports it, and the compute devices torch sees."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LongcatError

if TYPE_CHECKING:  # core never imports torch when imported (ARCHITECTURE.md)
    import torch

MEMINFO = Path("/proc/meminfo")


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, when the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes a new allocation can use now: the device's free memory for CUDA, else the kernel's MemAvailable
    (RAM that can be had without swapping, page cache included), else None when the OS does not say."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resolve_device(device: str | torch.device) -> torch.device:
    """A device torch can use here, or a one-line error."""
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LongcatError(f"unknown device {device!r}", fix="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LongcatError(f"device {device} requested but torch sees no CUDA device", fix="use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LongcatError(f"device {device} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device
