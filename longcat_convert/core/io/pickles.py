"""Pickle files: recognised by suffix (and sniffed by their first bytes), never opened for loading.

Unpickling runs arbitrary code. The project refuses a pickle where weights are expected and never copies one
(`validate` reports every pickle; `convert` refuses or skips it exactly as `validate` judges it).
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})


def is_pickle_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def sniff_pickle(path: Path) -> str | None:
    """Describe a file whose first bytes show a PyTorch zip checkpoint or a raw pickle (never unpickled)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch torch.save checkpoint)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle"
    return None


def pickle_message(path: Path) -> str:
    what = sniff_pickle(path) or "a PyTorch pickle checkpoint (by its suffix)"
    return (f"is {what} where safetensors is expected: refused, never loaded (unpickling runs arbitrary code); "
            "convert it to .safetensors from a trusted environment")


STRAY_PICKLE = ("is a pickle file: never loaded (unpickling runs arbitrary code) and not copied by `convert`; "
                "keep weights as .safetensors")
