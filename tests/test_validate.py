"""validate on valid trees (every layout, fp32 and bf16), the schemas, layout detection, --deep, the report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_convert.core import keymap
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.jsonschemas import load_schema, schema_errors
from longcat_convert.core.layout_detect import detect_layout
from longcat_convert.core.lora_format import encode_module
from longcat_convert.validation import deep
from longcat_convert.validation.findings import KINDS
from longcat_convert.validation.render import render_summary
from longcat_convert.validation.run import ValidateOptions, validate_tree
from tests.test_validate_helpers import (
    PUBLISHED_DIT_CONFIG,
    UMT5_XXL,
    converted,
    dit_shards,
    edit_index,
    edit_json,
    rewrite,
    shard_of,
    sync_total_size,
    validate_cli,
)

LAYOUTS = ("raw", "fastvideo", "diffusers")


@pytest.fixture(scope="module")
def valid_trees(tiny_raw: Path, tiny_raw_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("valid")
    return {(layout, dtype): converted(raw, base / f"{layout}-{dtype}", layout)
            for dtype, raw in (("float32", tiny_raw), ("bfloat16", tiny_raw_bf16)) for layout in LAYOUTS}


def copy_of(tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tree, tmp_path / "tree", symlinks=True))


def errors_of(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["severity"] == "error"]


# --- valid trees ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_valid_tree_passes(layout: str, dtype: str, valid_trees: dict, tmp_path: Path) -> None:
    tree = valid_trees[(layout, dtype)]
    report_path = tmp_path / "report.json"
    result = validate_cli(tree, "--report", str(report_path), "--dtype", dtype)
    assert result.exit_code == 0, result.output
    assert "result: VALID" in result.output
    report = json.loads(report_path.read_text())
    assert schema_errors("validation-report", report) == []
    assert report["layout"] == {"name": layout, "reason": report["layout"]["reason"], "forced": False}
    assert [f for f in report["findings"] if f["severity"] != "info"] == []
    dit = report["components"]["dit"]
    assert dit["tensors"] == dit["expected_tensors"] == (68 if layout == "fastvideo" else 56)
    assert set(dit["dtypes"]) == {"F32" if dtype == "float32" else "BF16"}
    adapters = {a["name"]: a for a in report["components"]["lora"]["adapters"]}
    assert set(adapters) == {"cfg_step_lora", "refinement_lora"}
    assert adapters["cfg_step_lora"]["format"] == ("fastvideo" if layout == "fastvideo" else "upstream")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_valid_tree_passes_deep(layout: str, valid_trees: dict) -> None:
    report = validate_tree(valid_trees[(layout, "bfloat16")], ValidateOptions(deep=True))
    assert report["valid"], errors_of(report)
    scan = report["deep_scan"]
    assert scan["nan_inf_tensors"] == 0 and scan["all_zero_tensors"] == 0
    headers = report["components"]
    expected_files = (len(headers["dit"]["files"]) + len(headers["lora"]["adapters"]) + 2)  # + text encoder + VAE
    assert scan["files"] == expected_files
    if layout != "raw":  # converted trees carry conversion.json: every recorded tensor was hashed
        manifest = json.loads((valid_trees[(layout, "bfloat16")] / "conversion.json").read_text())
        assert scan["hashed_against_manifest"] == len(manifest["tensors"]) > 0


def test_json_output_is_the_report(valid_trees: dict) -> None:
    result = validate_cli(valid_trees[("fastvideo", "float32")], "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["valid"] and schema_errors("validation-report", report) == []
    assert report["manifest"]["target_layout"] == "fastvideo"


def test_runtime_flags_are_reported_apart_from_architecture(valid_trees: dict) -> None:
    config = validate_tree(valid_trees[("raw", "float32")])["components"]["dit"]["config"]
    assert set(config["runtime"]) == {"enable_flashattn3", "enable_flashattn2", "enable_xformers", "enable_bsa",
                                      "bsa_params", "cp_split_hw"}
    assert "hidden_size" in config["architecture"] and not set(config["runtime"]) & set(config["architecture"])
    assert config["derived"] == {"head_dim": 64, "ffn_hidden_size": 512}


def test_runtime_flag_error_has_its_own_kind(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    edit_json(tree / "dit" / "config.json", lambda c: c.update(cp_split_hw=[1, 1, 1], depth=0))
    kinds = {(f["kind"], f["message"].split()[0].rstrip(":")) for f in errors_of(validate_tree(tree))}
    assert ("runtime_flag", "cp_split_hw") in kinds and ("config_field", "depth") in kinds


# --- warnings do not fail ---------------------------------------------------------------------------------------


def test_non_integer_alpha_in_raw_tree_is_a_warning(valid_trees: dict, tmp_path: Path) -> None:
    """alpha_scale·rank = 1/3·8 is fine upstream but truncated by FastVideo after conversion."""
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    key = f"{encode_module('blocks.0.attn.proj')}.alpha_scale"
    rewrite(tree / "lora" / "cfg_step_lora.safetensors", lambda s: s.update({key: torch.tensor(1 / 3)}))
    result = validate_cli(tree)
    assert result.exit_code == 0, result.output
    assert "int(lora_alpha)/rank = 2/8" in result.output and "--lora-alpha-fix rescale" in result.output


def test_fastvideo_adapter_outside_its_folder_is_a_warning(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("fastvideo", "float32")], tmp_path)
    (tree / "conversion.json").unlink()  # it records where the converter put the file
    shutil.move(tree / "lora" / "refinement" / "refinement_lora.safetensors", tree / "lora" / "distilled")
    report = validate_tree(tree)
    assert report["valid"]
    messages = [f["message"] for f in report["findings"] if f["kind"] == "lora_placement"]
    assert any("holds 2 adapters" in m for m in messages) and any("lora/refinement/" in m for m in messages)


def test_mixed_dtypes_can_be_allowed(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    key = "blocks.0.adaLN_modulation.1.weight"
    rewrite(shard_of(tree, key), lambda s: s.update({key: s[key].bfloat16()}))
    sync_total_size(tree)
    assert validate_cli(tree).exit_code == 1
    result = validate_cli(tree, "--allow-mixed-dtypes")
    assert result.exit_code == 0 and "mixed dtypes" in result.output


def test_manifest_dtypes_make_a_deliberate_mix_valid(tiny_raw: Path, tmp_path: Path) -> None:
    tree = converted(tiny_raw, tmp_path / "fv", "fastvideo")
    shutil.rmtree(tree)
    from longcat_convert.conversion import ConvertRequest, convert

    convert(ConvertRequest(src=tiny_raw, dst=tree, to="fastvideo", dtype="bfloat16", keep_fp32=("*adaln*",), quiet=True))
    report = validate_tree(tree)
    assert report["valid"], errors_of(report)
    assert set(report["components"]["dit"]["dtypes"]) == {"BF16", "F32"}


def test_droppable_norm_key_is_a_warning_and_deep_checks_its_value(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    path = dit_shards(tree)[0]
    rewrite(path, lambda s: s.update({"blocks.0.mod_norm_attn.weight": torch.ones(128),
                                      "blocks.0.mod_norm_attn.bias": torch.zeros(128)}))
    edit_index(tree, lambda d: d["weight_map"].update({"blocks.0.mod_norm_attn.weight": path.name,
                                                       "blocks.0.mod_norm_attn.bias": path.name}))
    sync_total_size(tree)
    for deep_flag in (False, True):
        report = validate_tree(tree, ValidateOptions(deep=deep_flag))
        assert report["valid"], errors_of(report)
        assert sum(f["kind"] == "droppable_key" for f in report["findings"]) == 2
        assert not any(f["kind"] == "all_zero" for f in report["findings"])  # a zero bias is what is required


def test_outside_symlinks_can_be_allowed(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    outside = tmp_path / "blob"
    shutil.move(tree / "vae" / "diffusion_pytorch_model.safetensors", outside)
    os.symlink(outside, tree / "vae" / "diffusion_pytorch_model.safetensors")
    assert validate_cli(tree).exit_code == 2
    assert validate_cli(tree, "--follow-symlinks").exit_code == 0


def test_symlink_to_an_ancestor_is_refused(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    os.symlink("..", tree / "dit" / "up")
    result = validate_cli(tree)
    assert result.exit_code == 2 and "dit/up" in result.output and "cycle" in result.output


def test_all_zero_tensor_is_a_deep_warning(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    key = "blocks.1.cross_attn.proj.weight"
    rewrite(shard_of(tree, key), lambda s: s.update({key: torch.zeros_like(s[key])}))
    assert validate_tree(tree)["valid"]
    report = validate_tree(tree, ValidateOptions(deep=True))
    assert report["valid"] and [f["key"] for f in report["findings"] if f["kind"] == "all_zero"] == [key]


def test_unwritable_report_path_is_exit_2(valid_trees: dict, tmp_path: Path) -> None:
    result = validate_cli(valid_trees[("raw", "float32")], "--report", str(tmp_path / "missing" / "r.json"))
    assert result.exit_code == 2 and "cannot write the report" in result.output


# --- layout detection --------------------------------------------------------------------------------------------


def test_forced_layout_reports_wrong_tree(valid_trees: dict) -> None:
    report = validate_tree(valid_trees[("diffusers", "float32")], ValidateOptions(layout="fastvideo"))
    assert report["layout"]["forced"] and not report["valid"]
    assert any(f["kind"] == "wrong_naming" for f in report["findings"])


def test_layout_falls_back_to_model_index(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("fastvideo", "float32")], tmp_path)
    (tree / "transformer" / "config.json").write_text("not json")
    assert detect_layout(tree).name == "fastvideo"
    report = validate_tree(tree)
    assert any(f["file"] == "transformer/config.json" and "not valid JSON" in f["message"] for f in report["findings"])


def test_both_dit_and_transformer_is_ambiguous(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    (tree / "transformer").mkdir()
    with pytest.raises(LongcatError, match="both dit/"):
        detect_layout(tree)
    assert detect_layout(tree, "raw").forced


def test_unknown_transformer_class_is_refused(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("diffusers", "float32")], tmp_path)
    edit_json(tree / "transformer" / "config.json", lambda c: c.update(_class_name="WanModel"))
    (tree / "model_index.json").unlink()
    result = validate_cli(tree)
    assert result.exit_code == 2 and "'WanModel'" in result.output and "--layout" in result.output


# --- the summary -------------------------------------------------------------------------------------------------


def test_summary_groups_findings_and_never_lists_every_key(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    for path in dit_shards(tree)[1:]:
        path.unlink()
    result = validate_cli(tree, "--show", "3")
    assert result.exit_code == 1
    group = [line for line in result.output.splitlines() if line.startswith("  dit: missing key")]
    assert len(group) == 1
    assert "... and " in result.output and "by pattern: blocks.{i}." in result.output
    assert len(result.output.splitlines()) < 40


# --- --deep streaming ---------------------------------------------------------------------------------------------


def test_deep_scan_streams_in_small_chunks_and_hashes_tensor_bytes(tmp_path: Path, monkeypatch) -> None:
    """Chunks smaller than a tensor (and not a multiple of every itemsize) give the same counts and digests."""
    tensors = {"a": torch.randn(37, 5).bfloat16(), "b": torch.tensor([1.0, math.nan, math.inf, -math.inf]),
               "c": torch.zeros(9, dtype=torch.float16), "d": torch.arange(7, dtype=torch.int64),
               "e": torch.ones(11, dtype=torch.bfloat16), "f": torch.tensor([True, False])}
    tensors["a"][3, 1] = math.nan
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    monkeypatch.setattr(deep, "CHUNK_BYTES", 12)
    from longcat_convert.core.io import read_header

    seen = {}
    digest = deep.scan_file(read_header(path), lambda info, stats: seen.update({info.name: stats}))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    for name, tensor in load_file(path).items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        assert seen[name].digest.hexdigest() == hashlib.sha256(raw).hexdigest()
        assert seen[name].elements == tensor.numel()
    assert (seen["a"].nan, seen["a"].inf, seen["b"].nan, seen["b"].inf) == (1, 0, 1, 2)
    assert (seen["c"].any_nonzero, seen["d"].any_nonzero, seen["a"].any_nonzero) == (False, True, True)
    assert [name for name, stats in seen.items() if stats.all_ones] == ["e"]


def test_deep_scan_of_a_file_that_shrinks_while_read_raises_oserror(tmp_path: Path, monkeypatch) -> None:
    """The header was valid when read; the scan itself must notice the bytes are gone, not hash zeros."""
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(64)}, path)
    monkeypatch.setattr(deep, "CHUNK_BYTES", 32)
    from longcat_convert.core.io import read_header

    header = read_header(path)
    with open(path, "r+b") as handle:
        handle.truncate(header.data_start + 300)
    seen = []
    with pytest.raises(OSError, match="file ended at byte"):
        deep.scan_file(header, lambda info, stats: seen.append(info.name))
    assert "b" not in seen  # "a" (bytes 0-256) may have been reported; "b" is never judged on partial bytes


# --- schemas -------------------------------------------------------------------------------------------------------


def test_published_configs_match_their_schemas() -> None:
    assert schema_errors("dit-config", PUBLISHED_DIT_CONFIG) == []
    fastvideo = keymap.convert_config(PUBLISHED_DIT_CONFIG, "upstream", "fastvideo")
    assert schema_errors("fastvideo-transformer-config", fastvideo) == []
    assert schema_errors("dit-config", fastvideo) != [] and schema_errors("fastvideo-transformer-config",
                                                                          PUBLISHED_DIT_CONFIG) != []
    assert schema_errors("text-encoder-config", UMT5_XXL) == []
    document = keymap.load_map_document()["model_index"]
    for form in ("fastvideo", "diffusers"):
        index = {key: value for key, value in document[form].items() if key in ("_class_name", "workload_type")}
        index.update(document[form]["components"], _diffusers_version="0.35.1")
        assert schema_errors("model-index", index) == []
    assert schema_errors("scheduler-config", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                              "num_train_timesteps": 1000, "shift": 12.0}) == []


@pytest.mark.parametrize("edit", [
    lambda c: c.update(patch_size=[1, 2]), lambda c: c.update(cp_split_hw=[1]), lambda c: c.update(mlp_ratio=0),
    lambda c: c["bsa_params"].update(sparsity=1.0), lambda c: c["bsa_params"].pop("chunk_3d_shape_q"),
    lambda c: c.update(enable_flashattn2=1), lambda c: c.update(text_tokens_zero_pad=None),
])
def test_dit_config_schema_rejects(edit) -> None:
    config = json.loads(json.dumps(PUBLISHED_DIT_CONFIG))
    edit(config)
    assert schema_errors("dit-config", config) != []


def test_model_index_schema_checks_forms() -> None:
    fastvideo = {"_class_name": "LongCatPipeline", "_diffusers_version": "0.35.1", "workload_type": "video-generation",
                 "transformer": ["diffusers", "LongCatTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
                 "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "AutoTokenizer"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    assert schema_errors("model-index", fastvideo) == []
    assert schema_errors("model-index", {**fastvideo, "vae": ["diffusers"]}) != []
    assert schema_errors("model-index", {k: v for k, v in fastvideo.items() if k != "workload_type"}) != []
    diffusers = {**fastvideo, "_class_name": "LongCatVideoPipeline"}
    assert schema_errors("model-index", diffusers) != []  # FastVideo's transformer class under the diffusers form


def test_index_schema_refuses_paths_leaving_the_folder() -> None:
    for name in ("../x.safetensors", "/abs/x.safetensors", "sub/x.safetensors", "..safetensors", "x.bin"):
        assert schema_errors("safetensors-index", {"weight_map": {"k": name}}) != [], name
    assert schema_errors("safetensors-index", {"metadata": {"total_size": 4},
                                               "weight_map": {"k": "model-00001-of-00002.safetensors"}}) == []


def test_parity_report_schema_is_permissive_but_shaped() -> None:
    report = {"level": "L1", "passed": True, "device": "cpu",
              "cases": [{"name": "t2v", "max_abs": 6e-7, "rel_l2": 1e-7, "cosine": 1.0, "passed": True, "extra": 1}]}
    assert schema_errors("parity-report", report) == []
    assert schema_errors("parity-report", {**report, "cases": [{"max_abs": 1.0}]}) != []
    assert schema_errors("parity-report", {"level": 1, "cases": [{"name": "x", "passed": True,
                                                                   "rel_l2": -1.0}], "passed": True}) != []


def test_report_schema_knows_every_finding_kind() -> None:
    kinds = load_schema("validation-report")["$defs"]["finding"]["properties"]["kind"]["enum"]
    assert sorted(kinds) == sorted(KINDS)


def test_summary_renders_every_component(valid_trees: dict) -> None:
    text = render_summary(validate_tree(valid_trees[("fastvideo", "float32")]))
    for component in ("model_index", "dit", "lora", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert f"\n  {component}" in text


def test_dtype_option_covers_dit_and_lora_only(tiny_raw: Path, tmp_path: Path) -> None:
    """A bf16 conversion copies the fp32 text encoder and VAE as they are; --dtype bfloat16 accepts that."""
    from longcat_convert.conversion import ConvertRequest, convert

    tree = tmp_path / "fv"
    convert(ConvertRequest(src=tiny_raw, dst=tree, to="fastvideo", dtype="bfloat16", quiet=True))
    report = validate_tree(tree, ValidateOptions(dtype="bfloat16"))
    assert report["valid"], errors_of(report)
    assert set(report["components"]["text_encoder"]["dtypes"]) == {"F32"}
    report = validate_tree(tree, ValidateOptions(dtype="float32"))
    flagged = {f["component"] for f in errors_of(report)}
    assert flagged == {"dit", "lora"}


def test_pickle_next_to_safetensors_is_only_a_warning(valid_trees: dict, tmp_path: Path) -> None:
    from tests.test_validate_corpus import MARKER, armed_pickle

    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    (tree / "text_encoder" / "pytorch_model.bin").write_bytes(armed_pickle(tmp_path / MARKER))
    result = validate_cli(tree)
    assert result.exit_code == 0 and "text_encoder/pytorch_model.bin: is a Python pickle" in result.output
    assert not (tmp_path / MARKER).exists()


def test_fp32_alpha_next_to_bf16_lora_weights_is_not_a_mix(valid_trees: dict) -> None:
    adapters = validate_tree(valid_trees[("raw", "bfloat16")])["components"]["lora"]["adapters"]
    assert all(set(a["dtypes"]) == {"BF16", "F32"} for a in adapters)  # the 0-d alpha_scale stays fp32


def test_fastvideo_alpha_below_one_means_scale_one(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("fastvideo", "float32")], tmp_path)
    (tree / "conversion.json").unlink()
    path = tree / "lora" / "distilled" / "cfg_step_lora.safetensors"
    rewrite(path, lambda s: s.update({"blocks.1.ffn.w1.lora_alpha": torch.tensor(0.5)}))
    result = validate_cli(tree)
    assert result.exit_code == 1 and "int(alpha) is 0, which FastVideo reads as 'no scaling'" in result.output


def test_deep_parses_tokenizer_json(valid_trees: dict, tmp_path: Path) -> None:
    tree = copy_of(valid_trees[("raw", "float32")], tmp_path)
    path = tree / "tokenizer" / "tokenizer.json"
    text = path.read_text()
    path.write_text(text[:len(text) // 2] + "}")  # braces intact, body broken
    assert validate_tree(tree)["valid"]
    report = validate_tree(tree, ValidateOptions(deep=True))
    assert any(f["file"] == "tokenizer/tokenizer.json" and "not valid JSON" in f["message"] for f in errors_of(report))
