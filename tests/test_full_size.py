"""`tiny --full-size`: the published shapes (counts from weights.md, derived there from the hub's file sizes), and
the free-space check before anything is written."""

from __future__ import annotations

import math
import shutil
from collections import namedtuple
from pathlib import Path

from longcat_convert import tiny_tree
from longcat_convert.core import keymap
from longcat_convert.tiny_tree import (
    ADAPTERS,
    FULL_SIZE,
    FULL_SIZE_RANK,
    TinySpec,
    dit_config,
    lora_plan,
    lora_targets,
)
from tests.helpers import run_cli

PUBLISHED_DIT_PARAMS = 13_581_071_424
PUBLISHED_LORA_PARAMS = {"cfg_step_lora": 630_718_464, "refinement_lora": 802_299_904}  # up/down matrices
PUBLISHED_LORA_KEYS = {"cfg_step_lora": 1152, "refinement_lora": 1543}


def _full_spec(depth: int = 48, dtype: str = "bfloat16") -> TinySpec:
    return TinySpec(depth=depth, dtype=dtype, full_size=True, **FULL_SIZE)


def test_full_size_dit_and_loras_have_the_published_counts() -> None:
    expanded = keymap.expand(dit_config(_full_spec()), "upstream")
    assert sum(math.prod(rule.shape) for rule in expanded.params) == PUBLISHED_DIT_PARAMS
    assert len(expanded.params) == 1022
    for adapter in ADAPTERS:
        planned = lora_plan(expanded, lora_targets(expanded, adapter, "published"), FULL_SIZE_RANK)
        assert len(planned) == PUBLISHED_LORA_KEYS[adapter]
        assert sum(math.prod(shape) for _, shape in planned if shape) == PUBLISHED_LORA_PARAMS[adapter]


def test_the_free_space_check_refuses_before_writing(tmp_path: Path, monkeypatch) -> None:
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: Usage(10**12, 10**12 - 10**9, 10**9))
    result = run_cli("tiny", tmp_path / "full", "--full-size", "--depth", "48", "--dtype", "bfloat16")
    assert result.exit_code == 2 and "GB are free" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "full").exists() and list(tmp_path.iterdir()) == []
    need = tiny_tree.tree_bytes(_full_spec())
    assert 2 * PUBLISHED_DIT_PARAMS < need < 1.1 * 2 * (PUBLISHED_DIT_PARAMS + sum(PUBLISHED_LORA_PARAMS.values()))


def test_hidden_and_full_size_conflict(tmp_path: Path) -> None:
    result = run_cli("tiny", tmp_path / "x", "--full-size", "--hidden", "256")
    assert result.exit_code == 2 and "--hidden" in result.output
