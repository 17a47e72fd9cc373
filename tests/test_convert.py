"""convert: layouts, bit-exact round trips, LoRA deltas, dtype policy, manifest, atomicity, refusals.

Expectations are derived independently of the key map: FastVideo names come from the rules written
out below (as FastVideo's own model names its parameters), splits from torch.chunk, LoRA deltas from
the dense block-diagonal formula.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longcat_convert import execute as execute_module
from longcat_convert import plan
from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core import lora_format as lora
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.jsonschemas import schema_errors
from tests.helpers import bitwise_equal, load_folder, run_cli

# upstream module -> FastVideo module(s), per FastVideo's LongCatTransformer3DModel
RENAMES = [
    (r"x_embedder\.proj", ["patch_embed.proj"]),
    (r"t_embedder\.mlp\.0", ["time_embedder.linear_1"]),
    (r"t_embedder\.mlp\.2", ["time_embedder.linear_2"]),
    (r"y_embedder\.y_proj\.0", ["caption_embedder.linear_1"]),
    (r"y_embedder\.y_proj\.2", ["caption_embedder.linear_2"]),
    (r"blocks\.(\d+)\.adaLN_modulation\.1", ["blocks.\\1.adaln_linear_1"]),
    (r"blocks\.(\d+)\.pre_crs_attn_norm", ["blocks.\\1.norm_cross"]),
    (r"blocks\.(\d+)\.attn\.qkv", ["blocks.\\1.self_attn.to_q", "blocks.\\1.self_attn.to_k", "blocks.\\1.self_attn.to_v"]),
    (r"blocks\.(\d+)\.attn\.proj", ["blocks.\\1.self_attn.to_out"]),
    (r"blocks\.(\d+)\.attn\.(q_norm|k_norm)", ["blocks.\\1.self_attn.\\2"]),
    (r"blocks\.(\d+)\.cross_attn\.q_linear", ["blocks.\\1.cross_attn.to_q"]),
    (r"blocks\.(\d+)\.cross_attn\.kv_linear", ["blocks.\\1.cross_attn.to_k", "blocks.\\1.cross_attn.to_v"]),
    (r"blocks\.(\d+)\.cross_attn\.proj", ["blocks.\\1.cross_attn.to_out"]),
    (r"blocks\.(\d+)\.cross_attn\.(q_norm|k_norm)", ["blocks.\\1.cross_attn.\\2"]),
    (r"blocks\.(\d+)\.ffn\.(w[123])", ["blocks.\\1.ffn.\\2"]),
    (r"final_layer\.adaLN_modulation\.1", ["final_layer.adaln_linear"]),
    (r"final_layer\.linear", ["final_layer.proj"]),
]


def fastvideo_modules(module: str) -> list[str]:
    for pattern, targets in RENAMES:
        match = re.fullmatch(pattern, module)
        if match:
            return [match.expand(t) for t in targets]
    raise AssertionError(f"no rule for {module}")


def expected_fastvideo_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    expected = {}
    for key, tensor in raw.items():
        module, param = key.rsplit(".", 1)
        targets = fastvideo_modules(module)
        for target, part in zip(targets, torch.chunk(tensor, len(targets), dim=0), strict=True):
            expected[f"{target}.{param}"] = part
    return expected


def _convert(src: Path, dst: Path, to: str, **kwargs) -> dict:
    return convert(ConvertRequest(src=src, dst=dst, to=to, quiet=True, **kwargs))


# ----------------------------------------------------------------------------------------- the DiT


@pytest.mark.parametrize("fixture", ["tiny_raw", "tiny_raw_bf16"])
def test_fastvideo_dit_is_split_and_renamed(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    raw = request.getfixturevalue(fixture)
    _convert(raw, tmp_path / "fv", "fastvideo")
    source = load_folder(raw / "dit")
    converted = load_folder(tmp_path / "fv" / "transformer")
    expected = expected_fastvideo_state(source)
    assert set(converted) == set(expected)
    assert len(converted) == 10 + 27 * 2 + 4
    for key, tensor in expected.items():
        assert bitwise_equal(converted[key], tensor.contiguous()), key


def test_fastvideo_config_and_model_index(tiny_raw: Path, tmp_path: Path) -> None:
    _convert(tiny_raw, tmp_path / "fv", "fastvideo")
    source = json.loads((tiny_raw / "dit" / "config.json").read_text())
    config = json.loads((tmp_path / "fv" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "LongCatTransformer3DModel"
    assert config["num_attention_heads"] == source["num_heads"] and "num_heads" not in config
    assert {k: v for k, v in config.items() if k not in ("_class_name", "num_attention_heads")} == \
        {k: v for k, v in source.items() if k not in ("_class_name", "num_heads")}
    index = json.loads((tmp_path / "fv" / "model_index.json").read_text())
    assert index["_class_name"] == "LongCatPipeline" and index["workload_type"] == "video-generation"
    assert index["transformer"] == ["diffusers", "LongCatTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for path in (tiny_raw / component).iterdir():
            assert (tmp_path / "fv" / component / path.name).read_bytes() == path.read_bytes()


def test_diffusers_layout_keeps_upstream_names(tiny_raw: Path, tmp_path: Path) -> None:
    _convert(tiny_raw, tmp_path / "d", "diffusers", max_shard_size="400KB")
    source = load_folder(tiny_raw / "dit")
    converted = load_folder(tmp_path / "d" / "transformer")
    assert set(converted) == set(source)
    assert all(bitwise_equal(converted[k], source[k]) for k in source)
    index = json.loads((tmp_path / "d" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "d" / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in converted.values())
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    model_index = json.loads((tmp_path / "d" / "model_index.json").read_text())
    # importable with this package alone (diffusers' loader imports the library named here)
    assert model_index["transformer"] == ["longcat_reference", "LongCatVideoTransformer3DModel"]
    assert model_index["tokenizer"] == ["transformers", "T5TokenizerFast"]
    config = json.loads((tmp_path / "d" / "transformer" / "config.json").read_text())
    assert config == json.loads((tiny_raw / "dit" / "config.json").read_text())


@pytest.mark.parametrize("fixture", ["tiny_raw", "tiny_raw_bf16", "tiny_raw_all"])
@pytest.mark.parametrize("via", ["fastvideo", "diffusers"])
def test_round_trip_is_bitwise(fixture: str, via: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    raw = request.getfixturevalue(fixture)
    _convert(raw, tmp_path / "mid", via)
    _convert(tmp_path / "mid", tmp_path / "back", "raw")
    for folder, pattern in (("dit", "*.safetensors"), ("lora", "cfg_step_lora.safetensors"),
                            ("lora", "refinement_lora.safetensors")):
        before, after = load_folder(raw / folder, pattern), load_folder(tmp_path / "back" / folder, pattern)
        assert before and set(before) == set(after)
        assert all(bitwise_equal(before[k], after[k]) for k in before), folder
    assert json.loads((tmp_path / "back" / "dit" / "config.json").read_text()) == \
        json.loads((raw / "dit" / "config.json").read_text())
    assert not (tmp_path / "back" / "model_index.json").exists()


# ------------------------------------------------------------------------------------------- LoRAs


def _upstream_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Dense ΔW per module from the upstream format: alpha_scale · blockdiag(U_0..U_{n-1}) · D."""
    state = load_file(path)
    deltas = {}
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        encoded = key[: -len(".lora_down.weight")]
        module = encoded.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        ups = [state[k].double() for k in sorted(k for k in state if k.startswith(encoded + ".lora_up."))]
        up = torch.block_diag(*ups) if len(ups) > 1 else ups[0]
        deltas[module] = float(state[encoded + ".alpha_scale"]) * up @ state[key].double()
    return deltas


def _fastvideo_deltas(path: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """Dense ΔW for each upstream module from the FastVideo format, with FastVideo's int(alpha)/rank.

    Every FastVideo target in the file must be consumed by one of `modules`, so extras fail too."""
    state = load_file(path)
    per_target = {}
    for key in state:
        if key.endswith(".lora_A"):
            target = key[: -len(".lora_A")]
            a, b = state[key].double(), state[target + ".lora_B"].double()
            per_target[target] = int(float(state[target + ".lora_alpha"])) / a.shape[0] * b @ a
    deltas = {}
    for module in modules:
        targets = fastvideo_modules(module)
        if all(t in per_target for t in targets):
            deltas[module] = torch.cat([per_target.pop(t) for t in targets])
    assert not per_target, f"targets with no upstream module: {sorted(per_target)}"
    return deltas


@pytest.mark.parametrize("fixture", ["tiny_raw", "tiny_raw_all"])
def test_lora_effective_delta_is_preserved(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    raw = request.getfixturevalue(fixture)
    manifest = _convert(raw, tmp_path / "fv", "fastvideo")
    for adapter, subdir in (("cfg_step_lora", "distilled"), ("refinement_lora", "refinement")):
        source = _upstream_deltas(raw / "lora" / f"{adapter}.safetensors")
        converted = _fastvideo_deltas(tmp_path / "fv" / "lora" / subdir / f"{adapter}.safetensors", list(source))
        assert set(converted) == set(source), set(source) ^ set(converted)
        for module, delta in source.items():
            torch.testing.assert_close(converted[module], delta, rtol=1e-12, atol=1e-15, msg=module)
    assert all(check["passed"] for check in manifest["lora_checks"])


def test_cross_attention_output_lora_is_kept(tiny_raw_all: Path, tmp_path: Path) -> None:
    """FastVideo's own converter drops cross_attn.proj and the embedders; we map them."""
    _convert(tiny_raw_all, tmp_path / "fv", "fastvideo")
    keys = load_file(tmp_path / "fv" / "lora" / "refinement" / "refinement_lora.safetensors").keys()
    for module in ("blocks.0.cross_attn.to_out", "time_embedder.linear_1", "caption_embedder.linear_2"):
        assert {f"{module}.lora_A", f"{module}.lora_B", f"{module}.lora_alpha"} <= set(keys)


def _rewrite_alpha(path: Path, value: float) -> None:
    state = load_file(path)
    for key in state:
        if key.endswith("alpha_scale"):
            state[key] = torch.tensor(value)
    save_file(state, path)


def test_non_integer_alpha_is_refused_or_rescaled(raw_copy: Path, tmp_path: Path) -> None:
    _rewrite_alpha(raw_copy / "lora" / "cfg_step_lora.safetensors", 0.3)  # 0.3 · rank 8 = 2.4
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo", "-q")
    assert result.exit_code == 2 and "not an integer" in result.output and "--lora-alpha-fix" in result.output
    assert not (tmp_path / "fv").exists()
    _convert(raw_copy, tmp_path / "fv", "fastvideo", lora_alpha_fix="rescale")
    source = _upstream_deltas(raw_copy / "lora" / "cfg_step_lora.safetensors")
    converted = _fastvideo_deltas(tmp_path / "fv" / "lora" / "distilled" / "cfg_step_lora.safetensors", list(source))
    for module, delta in source.items():
        torch.testing.assert_close(converted[module], delta, rtol=1e-6, atol=1e-9)


def _slightly_off_alpha(adapter, module, alpha_scale, rank, fix):
    return alpha_scale * rank, 1 + 2**-20  # lora_B scaled by 1 + 2⁻²⁰: 8 float32 ulps, twice the rescale tolerance


def _targets_reversed(*args):
    return lora.fused_targets(*args)[::-1]  # to_q gets the factors meant for to_v


@pytest.mark.parametrize("name, bug", [("_fastvideo_alpha", _slightly_off_alpha), ("fused_targets", _targets_reversed)],
                         ids=["scale off by 2^-20", "fused targets swapped"])
def test_the_lora_check_catches_a_converter_bug_before_commit(tiny_raw: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, name: str, bug) -> None:
    monkeypatch.setattr(plan, name, bug)
    with pytest.raises(LongcatError, match="effective delta differs from the source"):
        _convert(tiny_raw, tmp_path / "fv", "fastvideo")
    assert not (tmp_path / "fv").exists()


# --------------------------------------------------------------------------------------- dtype policy


def test_dtype_policy_casts_and_keeps_fp32(tiny_raw: Path, tmp_path: Path) -> None:
    manifest = _convert(tiny_raw, tmp_path / "fv", "fastvideo", dtype="bfloat16", keep_fp32=("*adaln*",))
    source = expected_fastvideo_state(load_folder(tiny_raw / "dit"))
    converted = load_folder(tmp_path / "fv" / "transformer")
    for key, tensor in converted.items():
        wanted = torch.float32 if "adaln" in key else torch.bfloat16
        assert tensor.dtype == wanted, key
        assert bitwise_equal(tensor, source[key].to(wanted)), key
    assert set(manifest["census"]["after"]) == {"BF16", "F32"} and set(manifest["census"]["before"]) == {"F32"}


def test_bf16_source_is_not_upcast_silently(tiny_raw_bf16: Path, tmp_path: Path) -> None:
    _convert(tiny_raw_bf16, tmp_path / "fv", "fastvideo")
    assert {t.dtype for t in load_folder(tmp_path / "fv" / "transformer").values()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_hashes_every_tensor_and_file(tiny_raw: Path, tmp_path: Path) -> None:
    dst = tmp_path / "fv"
    _convert(tiny_raw, dst, "fastvideo")
    manifest = json.loads((dst / "conversion.json").read_text())
    assert schema_errors("manifest", manifest) == []
    written = {}
    for record in manifest["tensors"]:
        tensor = load_file(dst / record["file"])[record["name"]]
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        written[record["name"]] = hashlib.sha256(data).hexdigest() == record["sha256"]
    assert written and all(written.values())
    for record in manifest["files"]:
        assert hashlib.sha256((dst / record["path"]).read_bytes()).hexdigest() == record["sha256"], record["path"]
    qkv = next(r for r in manifest["tensors"] if r["name"] == "blocks.1.self_attn.to_k.weight")
    assert qkv["sources"][0]["key"] == "blocks.1.attn.qkv.weight" and qkv["sources"][0]["rows"] == [128, 256]


# (op, cast, column slices): byte copies, casts, adaLN block-diagonals, FastVideo lora_B column slices, alphas
@pytest.mark.parametrize("fixture, to, dtype, kinds", [
    ("tiny_raw", "fastvideo", "keep", {("rows", False, False), ("blockdiag", False, False), ("scalar", False, False)}),
    ("tiny_raw", "fastvideo", "bfloat16", {("rows", True, False), ("blockdiag", True, False), ("scalar", False, False)}),
    ("tiny_raw_all", "raw", "float16", {("rows", True, False), ("rows", True, True), ("scalar", False, False)}),
])
def test_manifest_records_the_sha256_of_each_tensors_source_bytes(fixture: str, to: str, dtype: str, kinds: set,
                                                                  request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """source_sha256 = sha256 of the source rows each output was made from, one slice after another (computed
    here from the source files with safetensors); for a byte copy it is the tensor's own sha256."""
    src = request.getfixturevalue(fixture)
    if to == "raw":  # fastvideo -> raw: LoRA blocks rebuilt from column slices of lora_B
        _convert(src, tmp_path / "fv", "fastvideo")
        src = tmp_path / "fv"
    manifest = _convert(src, tmp_path / "out", to, dtype=dtype)
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    ops = set()
    for record in manifest["tensors"]:
        digest = hashlib.sha256()
        for piece in record["sources"]:
            tensors = loaded.setdefault(piece["file"], load_file(src / piece["file"]))
            tensor = tensors[piece["key"]]
            if "rows" in piece:
                tensor = tensor[piece["rows"][0]:piece["rows"][1]]
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        assert record["source_sha256"] == digest.hexdigest(), record["name"]
        if record["dtype"] == record["source_dtype"] and record["op"] == "rows" and not any("cols" in p for p in record["sources"]):
            assert record["source_sha256"] == record["sha256"], record["name"]
        ops.add((record["op"], record["dtype"] != record["source_dtype"], any("cols" in p for p in record["sources"])))
    assert ops == kinds
    assert schema_errors("manifest", manifest) == []


# ----------------------------------------------------------------------------------- safety & errors


def test_failure_midway_leaves_nothing(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = execute_module._write_shard

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(execute_module, "_write_shard", failing)
    with pytest.raises(LongcatError, match="no space left"):
        _convert(tiny_raw, tmp_path / "fv", "fastvideo")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_overwrite(tiny_raw: Path, tmp_path: Path) -> None:
    dst = tmp_path / "fv"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    result = run_cli("convert", tiny_raw, dst, "--to", "fastvideo", "-q")
    assert result.exit_code == 2 and "already exists" in result.output and "--overwrite" in result.output
    assert (dst / "keep.txt").read_text() == "mine"
    assert run_cli("convert", tiny_raw, dst, "--to", "fastvideo", "-q", "--overwrite").exit_code == 0
    assert not (dst / "keep.txt").exists() and (dst / "conversion.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fv"]


def test_destination_inside_source_is_refused(raw_copy: Path) -> None:
    for dst in (raw_copy / "out", raw_copy):
        result = run_cli("convert", raw_copy, dst, "--to", "fastvideo")
        assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (raw_copy / "out").exists()


def test_dry_run_writes_nothing(tiny_raw: Path, tmp_path: Path) -> None:
    result = run_cli("convert", tiny_raw, tmp_path / "fv", "--to", "fastvideo", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "plan: raw -> fastvideo" in result.output and "dtype census" in result.output
    assert not (tmp_path / "fv").exists()


def _add_stray_tensor(raw: Path) -> None:
    shard = sorted((raw / "dit").glob("*-00001-of-*.safetensors"))[0]
    state = load_file(shard)
    state["blocks.0.attn.extra_gate"] = torch.zeros(3)
    save_file(state, shard, metadata={"format": "pt"})
    index_path = raw / "dit" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["blocks.0.attn.extra_gate"] = shard.name
    index_path.write_text(json.dumps(index))


def test_unknown_source_key_is_an_error_naming_it(raw_copy: Path, tmp_path: Path) -> None:
    _add_stray_tensor(raw_copy)
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo")
    assert result.exit_code == 2 and "blocks.0.attn.extra_gate" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "fv").exists()


def test_missing_source_key_is_an_error(raw_copy: Path, tmp_path: Path) -> None:
    shard = sorted((raw_copy / "dit").glob("*-00001-of-*.safetensors"))[0]
    state = load_file(shard)
    victim = sorted(state)[0]
    del state[victim]
    save_file(state, shard, metadata={"format": "pt"})
    index_path = raw_copy / "dit" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][victim]
    index_path.write_text(json.dumps(index))
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo")
    assert result.exit_code == 2 and victim in result.output and "missing" in result.output


def _armed_pickle(path: Path, marker: Path) -> None:
    class Bomb:
        def __reduce__(self):
            return (marker.write_text, ("boom",))

    torch.save({"x": Bomb()}, path)


def test_pickle_beside_the_weights_is_never_loaded_and_not_carried_over(raw_copy: Path, tmp_path: Path) -> None:
    """validate only warns about a pickle next to safetensors shards (loaders ignore it): convert converts the
    tree, leaves the pickle out and says so in its summary and manifest."""
    marker = tmp_path / "unpickled"
    _armed_pickle(raw_copy / "dit" / "pytorch_model.bin", marker)
    _armed_pickle(raw_copy / "scheduler" / "extra.pt", marker)
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo")
    assert result.exit_code == 0, result.output
    assert "not carried over: dit/pytorch_model.bin (a pickle file" in result.output
    skipped = {entry["path"] for entry in json.loads((tmp_path / "fv" / "conversion.json").read_text())["skipped"]}
    assert {"dit/pytorch_model.bin", "scheduler/extra.pt"} <= skipped
    assert not list((tmp_path / "fv").rglob("*.bin")) and not list((tmp_path / "fv").rglob("*.pt"))
    assert not marker.exists()


def test_pickle_in_place_of_the_weights_is_refused_and_never_loaded(raw_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    (raw_copy / "text_encoder" / "model.safetensors").unlink()
    _armed_pickle(raw_copy / "text_encoder" / "pytorch_model.bin", marker)
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo")
    assert result.exit_code == 2 and "never loaded" in result.output and "pytorch_model.bin" in result.output
    assert not marker.exists() and not (tmp_path / "fv").exists()


def test_lora_for_unknown_module_is_refused(raw_copy: Path, tmp_path: Path) -> None:
    path = raw_copy / "lora" / "cfg_step_lora.safetensors"
    state = load_file(path)
    name = "lora___lorahyphen___blocks___lorahyphen___9___lorahyphen___attn___lorahyphen___qkv"
    state[f"{name}.lora_down.weight"] = torch.zeros(8, 128)
    state[f"{name}.lora_up.weight"] = torch.zeros(384, 8)
    state[f"{name}.alpha_scale"] = torch.tensor(0.5)
    save_file(state, path)
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo")
    assert result.exit_code == 2 and "blocks.9.attn.qkv" in result.output


def test_single_up_lora_on_fused_qkv_shares_the_down_projection(raw_copy: Path, tmp_path: Path) -> None:
    """An n=1 LoRA on qkv (FastVideo's converter slices lora_down wrongly here) converts exactly."""
    path = raw_copy / "lora" / "cfg_step_lora.safetensors"
    state = load_file(path)
    name = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    for j in range(3):
        del state[f"{name}.lora_up.blocks.{j}.weight"]
    generator = torch.Generator().manual_seed(5)
    state[f"{name}.lora_down.weight"] = torch.randn(8, 128, generator=generator)
    state[f"{name}.lora_up.weight"] = torch.randn(384, 8, generator=generator)
    save_file(state, path)
    _convert(raw_copy, tmp_path / "fv", "fastvideo")
    source = _upstream_deltas(path)
    converted = _fastvideo_deltas(tmp_path / "fv" / "lora" / "distilled" / "cfg_step_lora.safetensors", list(source))
    torch.testing.assert_close(converted["blocks.0.attn.qkv"], source["blocks.0.attn.qkv"], rtol=1e-12, atol=1e-15)
    _convert(tmp_path / "fv", tmp_path / "back", "raw")
    back = load_file(tmp_path / "back" / "lora" / "cfg_step_lora.safetensors")
    assert set(back) == set(state) and all(bitwise_equal(back[k], state[k]) for k in state)


def test_symlink_outside_the_tree_is_refused(raw_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (raw_copy / "vae" / "extra.json").symlink_to(outside)
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo")
    assert result.exit_code == 2 and "outside the tree" in result.output and "--follow-symlinks" in result.output
    assert run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo", "-q", "--follow-symlinks").exit_code == 0


def test_same_layout_without_a_change_is_refused(tiny_raw: Path, tmp_path: Path) -> None:
    result = run_cli("convert", tiny_raw, tmp_path / "again", "--to", "raw")
    assert result.exit_code == 2 and "already in the raw layout" in result.output
