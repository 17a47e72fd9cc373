"""Shared fixtures: tiny raw trees built once per session with the real component classes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from longcat_convert.core.torch_threads import torch_threads
from longcat_convert.tiny_tree import build_tiny_tree


def _build(factory: pytest.TempPathFactory, name: str, **kwargs) -> Path:
    return build_tiny_tree(factory.mktemp(name) / "raw", **kwargs)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, LoRAs shaped like the published adapters."""
    return _build(tmp_path_factory, "raw32", seed=0, dtype="float32")


@pytest.fixture(scope="session")
def tiny_raw_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "raw16", seed=1, dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_raw_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRAs on every Linear, embedders and cross_attn.proj included."""
    return _build(tmp_path_factory, "rawall", seed=2, dtype="float32", lora_targets="all")


@pytest.fixture
def raw_copy(tiny_raw: Path, tmp_path: Path) -> Path:
    """A private copy of the fp32 tree that a test may damage."""
    return Path(shutil.copytree(tiny_raw, tmp_path / "raw"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures(...)`): extra threads only add contention."""
    with torch_threads(1):
        yield
