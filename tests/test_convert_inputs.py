"""Inputs an adversarial user gives `convert` (and `validate`): every file accounted for, one symlink policy,
LoRA scales at the edges, and config values bounded by the files before any work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_convert.core.lora_format import fastvideo_scale
from tests.helpers import run_cli

CFG = "lora/cfg_step_lora.safetensors"


def _convert(src: Path, dst: Path, *args: str):
    result = run_cli("convert", src, dst, *args)
    assert "Traceback" not in result.output
    return result


def _refused(result, dst: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0, result.output
    assert all(word in result.output for word in words), result.output
    assert not dst.exists()


# --- every file accounted for ---------------------------------------------------------------------------------


def _decorate(tree: Path) -> None:
    """Files FastVideo's script and our old reader silently dropped."""
    (tree / "dit" / "NOTES.txt").write_text("trained on 8 nodes\n")
    (tree / "lora" / "README.md").write_text("two adapters\n")
    (tree / "lora" / "v2").mkdir()
    shutil.copy(tree / CFG, tree / "lora" / "v2" / "extra_lora.safetensors")
    (tree / "README.md").write_text("LongCat-Video\n")
    (tree / ".gitattributes").write_text("*.safetensors filter=lfs\n")


def _accounted(src: Path, manifest: dict) -> set[str]:
    """Source files the manifest says it converted, copied, rewrote or left out."""
    seen = {s["file"] for t in manifest["tensors"] for s in t["sources"]}
    seen |= {f["source"] for f in manifest["files"] if "source" in f}
    seen |= {k["path"] for k in manifest["skipped"]}
    dit = "dit" if (src / "dit").is_dir() else "transformer"
    seen |= {f"{dit}/config.json", "model_index.json"} | {p.relative_to(src).as_posix()
                                                           for p in (src / dit).glob("*.index.json")}
    return seen


@pytest.mark.parametrize("target", ["fastvideo", "diffusers"])
def test_every_source_file_is_converted_copied_or_listed(raw_copy: Path, tmp_path: Path, target: str) -> None:
    _decorate(raw_copy)
    dst = tmp_path / "out"
    result = _convert(raw_copy, dst, "--to", target)
    assert result.exit_code == 0, result.output
    manifest = json.loads((dst / "conversion.json").read_text())
    files = {p.relative_to(raw_copy).as_posix() for p in raw_copy.rglob("*") if p.is_file()}
    assert files <= _accounted(raw_copy, manifest)
    assert (dst / "transformer" / "NOTES.txt").read_text() == "trained on 8 nodes\n"
    assert (dst / "lora" / "README.md").read_text() == "two adapters\n"
    assert (dst / "README.md").is_file() and not (dst / ".gitattributes").exists()
    assert "not carried over: .gitattributes" in result.output
    nested = dst / "lora" / "v2" / ("extra_lora/extra_lora.safetensors" if target == "fastvideo" else "extra_lora.safetensors")
    assert nested.is_file() and any(c["target"].endswith("extra_lora.safetensors") for c in manifest["lora_checks"])
    assert run_cli("validate", dst).exit_code == 0


def test_nested_adapters_and_extras_survive_a_round_trip(raw_copy: Path, tmp_path: Path) -> None:
    _decorate(raw_copy)
    assert _convert(raw_copy, tmp_path / "fv", "--to", "fastvideo", "-q").exit_code == 0
    assert _convert(tmp_path / "fv", tmp_path / "back", "--to", "raw", "-q").exit_code == 0
    back = tmp_path / "back"
    assert (back / "dit" / "NOTES.txt").is_file() and (back / "lora" / "README.md").is_file()
    for name in ("cfg_step_lora.safetensors", "v2/extra_lora.safetensors"):
        original, returned = load_file(raw_copy / "lora" / name), load_file(back / "lora" / name)
        assert original.keys() == returned.keys()
        assert all(torch.equal(original[k], returned[k]) for k in original)


def test_a_pickle_anywhere_in_the_lora_folder_is_refused(raw_copy: Path, tmp_path: Path) -> None:
    (raw_copy / "lora" / "extra").mkdir()
    (raw_copy / "lora" / "extra" / "evil.pt").write_bytes(b"\x80\x04K\x01.")
    _refused(_convert(raw_copy, tmp_path / "out", "--to", "fastvideo"), tmp_path / "out", "lora/extra/evil.pt",
             "never loaded")
    assert run_cli("validate", raw_copy).exit_code == 1


# --- one symlink policy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["vae", "dit", "lora", "text_encoder"])
def test_a_folder_symlinked_outside_the_source_is_refused_unless_followed(raw_copy: Path, tmp_path: Path,
                                                                          folder: str) -> None:
    outside = tmp_path / "elsewhere" / folder
    outside.parent.mkdir()
    shutil.move(raw_copy / folder, outside)
    os.symlink(outside, raw_copy / folder)
    _refused(_convert(raw_copy, tmp_path / "out", "--to", "fastvideo"), tmp_path / "out", f"{folder}:", "outside")
    result = _convert(raw_copy, tmp_path / "out", "--to", "fastvideo", "--follow-symlinks", "-q")
    assert result.exit_code == 0, result.output
    produced = tmp_path / "out" / ("transformer" if folder == "dit" else folder)
    assert produced.is_dir() and not produced.is_symlink() and any(produced.iterdir())
    assert run_cli("validate", tmp_path / "out").exit_code == 0


def test_a_file_symlinked_inside_the_source_is_copied_as_a_file(raw_copy: Path, tmp_path: Path) -> None:
    (raw_copy / "scheduler" / "real.json").write_text("{}\n")
    os.symlink("real.json", raw_copy / "scheduler" / "alias.json")
    assert _convert(raw_copy, tmp_path / "out", "--to", "fastvideo", "-q").exit_code == 0
    alias = tmp_path / "out" / "scheduler" / "alias.json"
    assert alias.is_file() and not alias.is_symlink() and alias.read_text() == "{}\n"


# --- LoRA scales at the edges ---------------------------------------------------------------------------------


def _set_alpha(tree: Path, value: torch.Tensor, module: str = "blocks.0.attn.proj") -> None:
    path = tree / CFG
    state = load_file(path)
    key = next(k for k in state if k.endswith("alpha_scale") and module.replace(".", "___lorahyphen___") in k)
    state[key] = value
    save_file(state, path)


def test_fastvideo_scale_models_its_merge_rule() -> None:
    """layers/lora/linear.py merges with int(alpha)/rank, and scale 1 when int(alpha) is 0."""
    assert fastvideo_scale(64.0, 128) == 0.5
    assert fastvideo_scale(0.0, 8) == 1.0 and fastvideo_scale(0.9, 8) == 1.0 and fastvideo_scale(-0.9, 8) == 1.0
    assert fastvideo_scale(2.7, 8) == 2 / 8 and fastvideo_scale(-4.0, 8) == -0.5


def test_zero_alpha_is_refused_or_written_so_fastvideo_applies_zero(raw_copy: Path, tmp_path: Path) -> None:
    _set_alpha(raw_copy, torch.tensor(0.0))
    _refused(_convert(raw_copy, tmp_path / "fv", "--to", "fastvideo"), tmp_path / "fv", "truncates to 0",
             "--lora-alpha-fix rescale")
    result = _convert(raw_copy, tmp_path / "fv", "--to", "fastvideo", "--lora-alpha-fix", "rescale", "-q")
    assert result.exit_code == 0, result.output
    state = load_file(tmp_path / "fv" / "lora" / "distilled" / "cfg_step_lora.safetensors")
    alpha, b, a = (state[f"blocks.0.self_attn.to_out.lora_{x}"] for x in ("alpha", "B", "A"))
    applied = fastvideo_scale(float(alpha), a.shape[0]) * (b.double() @ a.double())
    assert float(applied.abs().max()) == 0.0


def test_negative_integer_alpha_converts_exactly(raw_copy: Path, tmp_path: Path) -> None:
    _set_alpha(raw_copy, torch.tensor(-0.5))  # -0.5 · rank 8 = -4, which int() keeps
    assert _convert(raw_copy, tmp_path / "fv", "--to", "fastvideo", "-q").exit_code == 0
    alpha = load_file(tmp_path / "fv" / "lora" / "distilled" / "cfg_step_lora.safetensors")[
        "blocks.0.self_attn.to_out.lora_alpha"]
    assert float(alpha) == -4.0


BAD_ALPHAS = {
    "nan": torch.tensor(math.nan), "inf": torch.tensor(math.inf), "-inf": torch.tensor(-math.inf),
    "float8": torch.tensor(0.5).to(torch.float8_e4m3fn), "int64": torch.tensor(1), "empty": torch.zeros(0),
    "matrix": torch.full((1, 1), 0.5),
}


@pytest.mark.parametrize("name", sorted(BAD_ALPHAS))
def test_unusable_alpha_is_one_line_in_validate_and_convert(raw_copy: Path, tmp_path: Path, name: str) -> None:
    _set_alpha(raw_copy, BAD_ALPHAS[name])
    validated = run_cli("validate", raw_copy)
    assert validated.exit_code == 1 and "Traceback" not in validated.output and "alpha_scale" in validated.output
    for target in ("fastvideo", "diffusers"):
        _refused(_convert(raw_copy, tmp_path / target, "--to", target), tmp_path / target, "alpha_scale")


def test_rank_zero_adapter_is_one_line_in_validate_and_convert(raw_copy: Path, tmp_path: Path) -> None:
    state = load_file(raw_copy / CFG)
    prefix = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___proj"
    state[f"{prefix}.lora_down.weight"] = torch.zeros(0, state[f"{prefix}.lora_down.weight"].shape[1])
    state[f"{prefix}.lora_up.weight"] = torch.zeros(state[f"{prefix}.lora_up.weight"].shape[0], 0)
    save_file(state, raw_copy / CFG)
    validated = run_cli("validate", raw_copy)
    assert validated.exit_code == 1 and "Traceback" not in validated.output
    _refused(_convert(raw_copy, tmp_path / "fv", "--to", "fastvideo"), tmp_path / "fv", "rank")


def test_differing_target_scales_fold_into_the_up_blocks(tiny_raw: Path, tmp_path: Path) -> None:
    """FastVideo allows to_q/to_k/to_v of one fused Linear to carry different alphas; upstream has one."""
    assert _convert(tiny_raw, tmp_path / "fv", "--to", "fastvideo", "-q").exit_code == 0
    path = tmp_path / "fv" / "lora" / "distilled" / "cfg_step_lora.safetensors"
    state = load_file(path)
    state["blocks.1.self_attn.to_k.lora_alpha"] = state["blocks.1.self_attn.to_k.lora_alpha"] * 4
    save_file(state, path, metadata={"format": "pt"})
    _refused(_convert(tmp_path / "fv", tmp_path / "raw", "--to", "raw"), tmp_path / "raw", "different scales",
             "--lora-alpha-fix rescale")
    result = _convert(tmp_path / "fv", tmp_path / "raw", "--to", "raw", "--lora-alpha-fix", "rescale")
    assert result.exit_code == 0 and "LoRA cfg_step_lora" in result.output and "OK" in result.output, result.output


def test_fastvideo_keys_are_read_as_fastvideo_reads_them(tiny_raw: Path, tmp_path: Path) -> None:
    """FastVideo strips `diffusion_model.` and `.weight` from every key: validate accepts such an adapter, so convert
    must too (back to the source bit for bit); two keys naming one part are refused by both."""
    assert _convert(tiny_raw, tmp_path / "fv", "--to", "fastvideo", "-q").exit_code == 0
    (tmp_path / "fv" / "conversion.json").unlink()  # it records the keys as convert wrote them
    path = tmp_path / "fv" / "lora" / "distilled" / "cfg_step_lora.safetensors"
    state = {f"diffusion_model.{key}.weight": value for key, value in load_file(path).items()}
    save_file(state, path)
    assert run_cli("validate", tmp_path / "fv").exit_code == 0
    assert _convert(tmp_path / "fv", tmp_path / "raw", "--to", "raw", "-q").exit_code == 0
    back, source = load_file(tmp_path / "raw" / CFG), load_file(tiny_raw / CFG)
    assert back.keys() == source.keys() and all(torch.equal(back[k], source[k]) for k in source)

    save_file({**state, "blocks.0.ffn.w1.lora_A": state["diffusion_model.blocks.0.ffn.w1.lora_A.weight"].clone()}, path)
    validated = run_cli("validate", tmp_path / "fv")
    assert validated.exit_code == 1 and "are the same part of module blocks.0.ffn.w1" in validated.output
    _refused(_convert(tmp_path / "fv", tmp_path / "raw2", "--to", "raw"), tmp_path / "raw2", "the same part")


# --- bounds before work -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("depth", 100_000), ("depth", 10**8), ("hidden_size", 2**40)])
def test_absurd_config_values_fail_at_once(raw_copy: Path, tmp_path: Path, field: str, value: int) -> None:
    path = raw_copy / "dit" / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    if field == "hidden_size":
        config["caption_channels"] = value
    path.write_text(json.dumps(config))
    validated = run_cli("validate", raw_copy)
    assert validated.exit_code == 1 and "weight files hold" in validated.output
    _refused(_convert(raw_copy, tmp_path / "out", "--to", "fastvideo"), tmp_path / "out", "dit/config.json",
             "weight files hold")


def test_a_text_encoder_claiming_a_billion_layers_is_reported_without_counting_them(raw_copy: Path) -> None:
    path = raw_copy / "text_encoder" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_layers": 10**9}))
    validated = run_cli("validate", raw_copy)
    assert validated.exit_code == 1 and "num_layers is 1000000000" in validated.output


@pytest.mark.parametrize("text", ["[" * 50_000 + "]" * 50_000, '{"depth": NaN}', '{"a": Infinity}', "1" * 5000,
                                  "\xff\xfe", ""])
@pytest.mark.parametrize("config", ["dit/config.json", "vae/config.json", "scheduler/scheduler_config.json"])
def test_hostile_json_is_one_line(raw_copy: Path, tmp_path: Path, text: str, config: str) -> None:
    (raw_copy / config).write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
    validated = run_cli("validate", raw_copy)
    assert validated.exit_code == 1 and "Traceback" not in validated.output and config in validated.output
    _refused(_convert(raw_copy, tmp_path / "out", "--to", "fastvideo"), tmp_path / "out", config)


# --- DiT-only trees -----------------------------------------------------------------------------------------------


def test_a_dit_only_tree_is_valid_with_a_warning_and_converts(raw_copy: Path, tmp_path: Path) -> None:
    """Someone who downloaded only dit/ and lora/ (the oracle builds such trees) can convert them; a tree missing
    only some shared components is still broken (the corpus's 'missing component')."""
    for name in ("text_encoder", "tokenizer", "vae", "scheduler"):
        shutil.rmtree(raw_copy / name)
    validated = run_cli("validate", raw_copy)
    assert validated.exit_code == 0 and "a DiT-only tree" in validated.output, validated.output
    for target in ("fastvideo", "diffusers"):
        assert _convert(raw_copy, tmp_path / target, "--to", target, "-q").exit_code == 0
        assert run_cli("validate", tmp_path / target).exit_code == 0
    shutil.rmtree(raw_copy / "lora")
    (raw_copy / "vae").mkdir()
    assert run_cli("validate", raw_copy).exit_code == 1
