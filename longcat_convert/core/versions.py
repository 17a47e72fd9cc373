"""Version strings written into the trees we produce."""

from __future__ import annotations

import importlib.metadata

# Written when diffusers is not installed: the oldest release this package supports (pyproject's
# diffusers>=0.33, the first with AutoencoderKLWan), i.e. the oldest diffusers a written tree is for.
DIFFUSERS_FALLBACK = "0.33.0"


def diffusers_version() -> str:
    """model_index.json's `_diffusers_version`: the diffusers the tree is written for, the installed one
    (read from its package metadata, without importing it), else DIFFUSERS_FALLBACK."""
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return DIFFUSERS_FALLBACK
