"""`longcat-convert parity` on LongCat-Video-Avatar trees: weights and forward levels over every DiT folder of the
variant (1.0: single and multi-speaker), the dmd LoRA (1.5), INT8 sources (`--from-int8`) and INT8 results
(`--to-int8`), both namings; and the failures a damaged audio module must cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from longcat_reference.dit_parity import weights_parity
from longcat_reference.forward_parity import forward_parity
from safetensors.torch import load_file, save_file

from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core import jsonschemas
from longcat_convert.tiny_avatar import build_tiny_avatar
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIVE_CASES = ["at2v", "ai2v", "multi", "vc", "vc-kv"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Raw v1.0 and v1.5 trees and their conversions: <variant>/<fastvideo|diffusers>, v1.5 from-int8 in float32,
    v1.5 to-int8."""
    root = tmp_path_factory.mktemp("avatar-parity")
    made: dict[str, Path] = {}
    for variant in ("avatar-v1.0", "avatar-v1.5"):
        raw = made[variant] = build_tiny_avatar(root / variant, variant, seed=5)
        for to in ("fastvideo", "diffusers"):
            made[f"{variant}/{to}"] = root / f"{variant}-{to}"
            convert(ConvertRequest(src=raw, dst=made[f"{variant}/{to}"], to=to, quiet=True))
    raw15 = made["avatar-v1.5"]
    made["from-int8"], made["to-int8"] = root / "from-int8", root / "to-int8"
    convert(ConvertRequest(src=raw15, dst=made["from-int8"], to="diffusers", from_int8=True, dtype="float32",
                           quiet=True))
    convert(ConvertRequest(src=raw15, dst=made["to-int8"], to="raw", to_int8=True, quiet=True))
    return made


def failing(report: dict) -> list[str]:
    return [case["name"] for case in report["cases"] if not case["passed"]]


def shard_with(folder: Path, key: str) -> Path:
    return next(p for p in sorted(folder.glob("*.safetensors")) if key in load_file(p))


def edit_tensor(folder: Path, key: str, change) -> None:
    """Rewrite the shard holding `key` with `change(tensor)` in its place (same dtype and shape)."""
    path = shard_with(folder, key)
    tensors = load_file(path)
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, path, {"format": "pt"})


@pytest.mark.parametrize("variant", ["avatar-v1.0", "avatar-v1.5"])
@pytest.mark.parametrize("to", ["fastvideo", "diffusers"])
def test_weights_level_covers_every_dit_folder_and_the_dmd_lora(trees: dict[str, Path], variant: str,
                                                                 to: str) -> None:
    report = weights_parity(trees[variant], trees[f"{variant}/{to}"])
    assert report["passed"], failing(report)
    names = [case["name"] for case in report["cases"]]
    if variant == "avatar-v1.0":
        assert names == ["config", "dit", "config:transformer_multi", "dit:transformer_multi"]
        multi = report["cases"][3]
        assert multi["raw_folder"] == "avatar_multi" and multi["checked"] == report["cases"][1]["checked"] > 0
    else:
        assert names == ["config", "dit", "lora:dmd_lora"]
        assert report["cases"][2]["modules_checked"] > 0
    audio = "audio_embedder.linear_2.weight" if to == "fastvideo" else "audio_proj.proj2.weight"
    assert audio not in {m["key"] for m in report["cases"][1]["mismatches"]}
    assert report["cases"][1]["mismatched"] == 0 and report["cases"][1]["missing_count"] == 0


@pytest.mark.parametrize("variant,to", [("avatar-v1.0", "fastvideo"), ("avatar-v1.5", "diffusers"),
                                        ("avatar-v1.5", "fastvideo")])
def test_forward_level_passes_on_every_dit_folder_and_lora(trees: dict[str, Path], variant: str, to: str) -> None:
    cases = None if variant == "avatar-v1.5" else ["at2v", "multi", "vc-kv"]
    report = forward_parity(trees[variant], trees[f"{variant}/{to}"], cases=cases)
    assert report["passed"], failing(report)
    assert jsonschemas.checked_report("parity-report", report) is report
    names = [case["name"] for case in report["cases"]]
    if variant == "avatar-v1.0":
        assert report["dit_folders"] == [{"raw": "avatar_single", "converted": "transformer"},
                                         {"raw": "avatar_multi", "converted": "transformer_multi"}]
        assert names == [f"{folder}/{case}" for folder in ("transformer", "transformer_multi")
                         for case in ("at2v", "multi", "vc-kv")]
    else:
        assert names == [f"transformer/{c}" for c in FIVE_CASES] + [f"transformer/lora:dmd_lora/{c}"
                                                                    for c in FIVE_CASES]
        assert all(case["rel_l2"] <= 1e-5 for case in report["cases"])


def test_the_dmd_lora_cases_compare_a_changed_model(trees: dict[str, Path], tmp_path: Path) -> None:
    """A converted LoRA scaled to nothing passes the bare cases and fails every LoRA case."""
    converted = tmp_path / "fv"
    shutil.copytree(trees["avatar-v1.5/fastvideo"], converted)
    lora = converted / "lora" / "distilled" / "dmd_lora.safetensors"
    tensors = {k: (v * 0 if "lora_B" in k or "lora_up" in k else v) for k, v in load_file(lora).items()}
    assert any(not torch.equal(a, b) for a, b in zip(tensors.values(), load_file(lora).values(), strict=True))
    save_file(tensors, lora)
    report = forward_parity(trees["avatar-v1.5"], converted, cases=["ai2v", "lora"])
    assert failing(report) == ["transformer/lora:dmd_lora/ai2v"]


def test_swapped_audio_kv_halves_fail_both_levels_naming_the_tensor(trees: dict[str, Path], tmp_path: Path) -> None:
    converted = tmp_path / "dif"
    shutil.copytree(trees["avatar-v1.5/diffusers"], converted)
    key = "blocks.1.audio_cross_attn.kv_linear.weight"
    edit_tensor(converted / "transformer", key, lambda t: torch.cat(t.chunk(2)[::-1]))
    weights = weights_parity(trees["avatar-v1.5"], converted)
    assert failing(weights) == ["dit"]
    assert [m["key"] for m in weights["cases"][1]["mismatches"]] == [key]
    forward = forward_parity(trees["avatar-v1.5"], converted, cases=["ai2v", "vc"])
    assert failing(forward) == ["transformer/ai2v", "transformer/vc"]
    assert all(case["rel_l2"] > 1e-3 for case in forward["cases"])


def test_swapped_to_k_to_v_in_the_multi_speaker_dit_fail_only_there(trees: dict[str, Path], tmp_path: Path) -> None:
    converted = tmp_path / "fv"
    shutil.copytree(trees["avatar-v1.0/fastvideo"], converted)
    folder = converted / "transformer_multi"
    k, v = "blocks.0.audio_cross_attn.to_k.weight", "blocks.0.audio_cross_attn.to_v.weight"
    path = shard_with(folder, k)
    tensors = load_file(path)
    tensors[k], tensors[v] = tensors[v], tensors[k]
    save_file(tensors, path, {"format": "pt"})
    weights = weights_parity(trees["avatar-v1.0"], converted)
    assert failing(weights) == ["dit:transformer_multi"]
    problems = {m["key"]: m["problem"] for m in weights["cases"][3]["mismatches"]}
    assert set(problems) == {k, v} and "holds the source rows meant for " + v in problems[k]
    forward = forward_parity(trees["avatar-v1.0"], converted, cases=["multi"])
    assert failing(forward) == ["transformer_multi/multi"]


def test_perturbed_audio_proj_fails_through_the_cli(trees: dict[str, Path], tmp_path: Path) -> None:
    converted = tmp_path / "fv"
    shutil.copytree(trees["avatar-v1.5/fastvideo"], converted)
    key = "audio_embedder.linear_2.weight"
    edit_tensor(converted / "transformer", key, lambda t: t * 1.01)
    result = run_cli("parity", trees["avatar-v1.5"], converted)
    assert result.exit_code == 1 and key in result.output and "parity weights: FAIL" in result.output
    report = tmp_path / "forward.json"
    result = run_cli("parity", trees["avatar-v1.5"], converted, "--level", "forward", "--cases", "at2v",
                     "--report", report)
    assert result.exit_code == 1, result.output
    assert "transformer/at2v" in result.output and "parity forward: FAIL" in result.output
    document = json.loads(report.read_text())
    assert jsonschemas.schema_errors("parity-report", document) == []
    assert document["model"] == "avatar" and document["cases"][0]["rel_l2"] > 1e-4


def test_from_int8_tree_matches_the_int8_folder(trees: dict[str, Path]) -> None:
    raw, converted = trees["avatar-v1.5"], trees["from-int8"]
    result = run_cli("parity", raw, converted, "--level", "forward", "--from-int8", "--cases", "ai2v",
                     "--cases", "vc-kv", "--cases", "lora")
    assert result.exit_code == 0, result.output
    assert "base_model_int8 vs transformer" in result.output and "parity forward: PASS" in result.output
    weights = weights_parity(raw, converted, from_int8=True)
    assert weights["passed"], failing(weights)
    assert weights["cases"][1]["raw_folder"] == "base_model_int8" and weights["cases"][1]["exact"] > 0
    # without --from-int8 the tree is refused with the fix, not compared with the float DiT
    refused = run_cli("parity", raw, converted)
    assert refused.exit_code == 2 and "pass --from-int8" in refused.output


def test_from_int8_weights_are_upstreams_dequantisation_bit_for_bit(trees: dict[str, Path], tmp_path: Path) -> None:
    converted = tmp_path / "from-int8"
    shutil.copytree(trees["from-int8"], converted)
    key = "blocks.0.audio_cross_attn.q_linear.weight"
    # one ulp on one element: the dequantised value is no longer int8 x scale in float32
    edit_tensor(converted / "transformer", key,
                lambda t: t.flatten().index_put((torch.tensor([0]),), torch.nextafter(t.flatten()[:1],
                                                                                        torch.tensor(9.0))).view_as(t))
    report = weights_parity(trees["avatar-v1.5"], converted, from_int8=True)
    assert failing(report) == ["dit"]
    assert [m["key"] for m in report["cases"][1]["mismatches"]] == [key]
    assert "1 of" in report["cases"][1]["mismatches"][0]["problem"]


def test_to_int8_tree_holds_upstreams_quantisation(trees: dict[str, Path], tmp_path: Path) -> None:
    report = weights_parity(trees["avatar-v1.5"], trees["to-int8"])
    assert report["passed"], failing(report)
    assert report["cases"][1]["raw_folder"] == "base_model"
    converted = tmp_path / "to-int8"
    shutil.copytree(trees["to-int8"], converted)
    key = "audio_proj.proj1.weight_scale"
    edit_tensor(converted / "base_model_int8", key, lambda t: t * 1.5)
    report = weights_parity(trees["avatar-v1.5"], converted)
    assert [m["key"] for m in report["cases"][1]["mismatches"]] == [key]


def test_stream_is_refused_for_an_avatar_tree(trees: dict[str, Path]) -> None:
    result = run_cli("parity", trees["avatar-v1.5"], trees["avatar-v1.5/fastvideo"], "--level", "forward", "--stream")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "drop --stream" in result.output


def test_a_missing_multi_speaker_dit_fails_its_cases_only(trees: dict[str, Path], tmp_path: Path) -> None:
    converted = tmp_path / "fv"
    shutil.copytree(trees["avatar-v1.0/fastvideo"], converted)
    shutil.rmtree(converted / "transformer_multi")
    weights = weights_parity(trees["avatar-v1.0"], converted)
    assert failing(weights) == ["config:transformer_multi", "dit:transformer_multi"]
    assert "has no transformer_multi/" in weights["cases"][3]["error"]
    forward = forward_parity(trees["avatar-v1.0"], converted, cases=["at2v"])
    assert failing(forward) == ["transformer_multi/at2v"]
    assert "cannot load the converted DiT" in forward["cases"][1]["error"]
