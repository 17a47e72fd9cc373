"""Streamed forward parity: block by block equals whole-model exactly, names the first diverging block, and the
memory budget picks the mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from longcat_reference.config import DiTConfig
from longcat_reference.forward_parity import (
    LatentGrid,
    _case_names,
    _streamed,
    _whole,
    case_thresholds,
    choose_mode,
    forward_parity,
    make_inputs,
)
from longcat_reference.loading import lora_paths, open_tree
from safetensors.torch import load_file, save_file

from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core.errors import LongcatError
from longcat_convert.tiny_tree import build_tiny_tree
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEPTH = 3


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streamed")
    raw = build_tiny_tree(root / "raw", depth=DEPTH, seed=4, lora_targets="all")
    convert(ConvertRequest(src=raw, dst=root / "fv", to="fastvideo", quiet=True))
    raw16 = build_tiny_tree(root / "raw16", depth=DEPTH, seed=5, dtype="bfloat16")
    convert(ConvertRequest(src=raw16, dst=root / "fv16", to="fastvideo", quiet=True))
    return {"raw": raw, "fv": root / "fv", "raw16": raw16, "fv16": root / "fv16"}


def _both_modes(raw_path: Path, converted_path: Path, dtype: torch.dtype, grid: LatentGrid | None = None):
    raw, converted = open_tree(raw_path), open_tree(converted_path)
    names = _case_names(None, sorted(lora_paths(raw)))
    inputs = make_inputs(DiTConfig.from_dict(raw.dit.config, "upstream"), 3, grid)
    whole = _whole(raw, converted, names, inputs, dtype, torch.device("cpu"))
    streamed = _streamed(raw, converted, names, inputs, dtype, torch.device("cpu"), dict.fromkeys(names, 1e-5))
    return names, whole, streamed


@pytest.mark.parametrize(("raw", "converted", "dtype"), [("raw", "fv", torch.float32), ("raw16", "fv16", torch.bfloat16)])
def test_streamed_outputs_equal_whole_model_outputs_bit_for_bit(trees, raw, converted, dtype):
    names, (whole_out, whole_ref), (out, ref, stages, _) = _both_modes(trees[raw], trees[converted], dtype)
    assert {"plain", "cond", "kvcache"} < set(names) and any(name.startswith("lora:") for name in names)
    for name in names:
        assert torch.equal(whole_ref[name], ref[name]), name
        assert torch.equal(whole_out[name], out[name]), name
    assert [stage["stage"] for stage in stages] == ["embedders", *(f"block {i}" for i in range(DEPTH)), "final layer"]


def test_streamed_equals_whole_on_a_larger_grid(trees):
    _, (whole_out, _), (out, _, _, _) = _both_modes(trees["raw"], trees["fv"], torch.float32, LatentGrid(5, 6, 4))
    assert all(torch.equal(whole_out[name], out[name]) for name in whole_out)
    assert out["plain"].shape[2:] == (5, 6, 4)


def _swap_k_v(tree: Path, block: int, dst: Path) -> Path:
    """A converted tree whose block `block` has to_k and to_v exchanged (weights and biases)."""
    shutil.copytree(tree, dst)
    prefix = f"blocks.{block}.self_attn."
    for path in sorted((dst / "transformer").glob("*.safetensors")):
        tensors = load_file(path)
        keys = [key for key in tensors if key.startswith(prefix + "to_k.")]
        if not keys:
            continue
        for key in keys:
            other = key.replace(".to_k.", ".to_v.")
            tensors[key], tensors[other] = tensors[other], tensors[key]
        save_file(tensors, path, metadata={"format": "pt"})
        return dst
    raise AssertionError(f"no {prefix}to_k in {dst}")


def test_first_divergence_names_the_corrupted_block(trees, tmp_path):
    broken = _swap_k_v(trees["fv"], 1, tmp_path / "broken")
    report = forward_parity(trees["raw"], broken, stream=True, cases=["plain", "kvcache", "lora"])
    assert not report["passed"]
    assert report["first_divergence"] == "block 1"
    passed = {stage["stage"]: stage["passed"] for stage in report["stages"]}
    assert passed["embedders"] and passed["block 0"] and not passed["block 1"] and not passed["final layer"]
    assert all(not case["passed"] for case in report["cases"])


def test_cli_prints_the_first_divergence_and_fails(trees, tmp_path):
    broken = _swap_k_v(trees["fv"], 2, tmp_path / "broken")
    result = run_cli("parity", trees["raw"], broken, "--level", "forward", "--stream", "--cases", "plain",
                     "--report", tmp_path / "r.json")
    assert result.exit_code == 1
    assert "first divergence: block 2" in result.output and "block 2" in result.output.split("first divergence")[1]
    assert json.loads((tmp_path / "r.json").read_text())["first_divergence"] == "block 2"


def test_a_converted_block_that_cannot_be_read_fails_from_that_stage_on(trees, tmp_path):
    damaged = Path(shutil.copytree(trees["fv"], tmp_path / "damaged"))
    shard = next(path for path in sorted((damaged / "transformer").glob("*.safetensors"))
                 if any(key.startswith("blocks.2.") for key in load_file(path)))
    size = shard.stat().st_size
    with shard.open("r+b") as handle:  # the header stays intact: only reading tensor bytes fails
        handle.truncate(size - 64)
    report = forward_parity(trees["raw"], damaged, stream=True, cases=["plain"])
    assert not report["passed"]
    assert report["first_divergence"] in {"embedders", "block 0", "block 1", "block 2"}
    assert "cannot" in json.dumps(report["cases"])


def test_memory_budget_chooses_the_mode(trees):
    whole = forward_parity(trees["raw"], trees["fv"], cases=["plain"], max_memory=10**12)
    assert whole["memory"]["mode"] == "whole" and "stages" not in whole
    streamed_bytes = whole["memory"]["streamed_bytes"]
    assert 0 < streamed_bytes < whole["memory"]["whole_model_bytes"]
    budget = (streamed_bytes + whole["memory"]["whole_model_bytes"]) // 2
    auto = forward_parity(trees["raw"], trees["fv"], cases=["plain"], max_memory=budget)
    assert auto["memory"]["mode"] == "streamed" and auto["passed"] and auto["first_divergence"] is None
    with pytest.raises(LongcatError, match="even streamed"):
        forward_parity(trees["raw"], trees["fv"], cases=["plain"], max_memory=streamed_bytes - 1)


def test_choose_mode_rules():
    assert not choose_mode(100, 10, 100, False).streamed
    assert choose_mode(101, 10, 100, False).streamed
    assert choose_mode(50, 10, 100, True).streamed and "--stream" in choose_mode(50, 10, 100, True).reason
    with pytest.raises(LongcatError, match="budget"):
        choose_mode(101, 101, 100, False)


@pytest.mark.parametrize(("tokens", "frames", "expected"), [(24, 4, (4, 4, 6)), (96, 4, (4, 4 * 2, 6 * 2)),
                                                            (100, 5, (5, 8, 10))])
def test_token_count_gives_a_near_square_grid(tokens, frames, expected):
    grid = LatentGrid.for_tokens(tokens, (1, 2, 2), frames)
    config = DiTConfig.from_dict(json.loads(json.dumps({
        "hidden_size": 128, "depth": 1, "num_heads": 2, "caption_channels": 64, "adaln_tembed_dim": 32,
        "frequency_embedding_size": 256, "in_channels": 16, "out_channels": 16, "mlp_ratio": 4,
        "patch_size": [1, 2, 2]})), "upstream")
    resolved = grid.resolved(config)
    assert resolved == expected
    assert resolved[0] * (resolved[1] // 2) * (resolved[2] // 2) >= tokens


@pytest.mark.parametrize("args", [("--frames", "2"), ("--height", "3"), ("--tokens", "8", "--width", "4"),
                                  ("--tokens", "0"), ("--max-memory", "lots")])
def test_bad_input_sizes_are_one_line_errors(trees, args):
    result = run_cli("parity", trees["raw"], trees["fv"], "--level", "forward", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_forward_only_options_are_refused_at_other_levels(trees):
    result = run_cli("parity", trees["raw"], trees["fv"], "--stream")
    assert result.exit_code == 2 and "--level forward only" in result.output


def test_lora_cases_across_adapter_formats_get_the_half_precision_bound():
    names = ["plain", "lora:a"]
    assert case_thresholds(names, "bfloat16", 2e-2, False, True) == {"plain": 2e-2, "lora:a": 1e-1}
    assert case_thresholds(names, "bfloat16", 2e-2, False, False) == {"plain": 2e-2, "lora:a": 2e-2}
    assert case_thresholds(names, "bfloat16", 3e-2, True, True) == {"plain": 3e-2, "lora:a": 3e-2}
    assert case_thresholds(names, "float32", 1e-5, False, True) == {"plain": 1e-5, "lora:a": 1e-5}
