"""The reference DiT end to end on tiny checkpoint trees written here: layouts, KV cache, conditioning,
text padding, BSA, LoRA formats, loading errors, and weights/forward parity (passing and failing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from longcat_reference.bsa import BsaParams
from longcat_reference.dit import LongcatDiT
from longcat_reference.dit_parity import weights_parity
from longcat_reference.embeddings import caption_embedding
from longcat_reference.forward_parity import forward_parity
from longcat_reference.loading import apply_loras, load_dit, open_tree, read_lora
from longcat_reference.lora_layers import clear_loras
from safetensors.torch import load_file, save_file

from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core import jsonschemas, keymap
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.lora_format import encode_module as encode_module_name
from tests.helpers import run_cli

CONFIG = {
    "_class_name": "LongCatVideoTransformer3DModel", "hidden_size": 64, "depth": 2, "num_heads": 2,
    "caption_channels": 32, "adaln_tembed_dim": 32, "frequency_embedding_size": 256, "mlp_ratio": 4,
    "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2], "text_tokens_zero_pad": True,
    "enable_bsa": False, "bsa_params": None, "cp_split_hw": None,
}
FASTVIDEO_SUBDIRS = {"cfg_step_lora": "distilled", "refinement_lora": "refinement"}
CFG_STEP = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "ffn.w1", "ffn.w2", "ffn.w3")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- tiny trees -----------------------------------------------------------------------------------------

def raw_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = keymap.expand(CONFIG, "upstream").expected_shapes("upstream")
    return {key: torch.randn(shape, generator=gen) * (0.3 if len(shape) == 1 else 0.08)
            + (1.0 if key.endswith("norm.weight") else 0.0) for key, shape in sorted(shapes.items())}


def upstream_lora(targets: dict[str, int], rank: int, alpha_scale: float, seed: int) -> dict[str, torch.Tensor]:
    """targets: upstream module -> number of up blocks (1 = a single lora_up.weight)."""
    gen = torch.Generator().manual_seed(seed)
    linears = keymap.expand(CONFIG, "upstream").linears
    tensors = {}
    for module, blocks in targets.items():
        linear, name = linears[module], encode_module_name(module)
        tensors[f"{name}.lora_down.weight"] = torch.randn(blocks * rank, linear.in_features, generator=gen) * 0.1
        if blocks == 1:
            tensors[f"{name}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=gen) * 0.1
        for j in range(blocks if blocks > 1 else 0):
            up = torch.randn(linear.out_features // blocks, rank, generator=gen) * 0.1
            tensors[f"{name}.lora_up.blocks.{j}.weight"] = up
        tensors[f"{name}.alpha_scale"] = torch.tensor(alpha_scale)
    return tensors


def lora_targets() -> dict[str, dict[str, int]]:
    linears = keymap.expand(CONFIG, "upstream").linears
    blocks = [m for m in linears if m.startswith("blocks.")]
    cfg_step = {m: linears[m].lora_up_blocks for m in blocks if m.split(".", 2)[2] in CFG_STEP}
    refinement = {m: linears[m].lora_up_blocks for m in linears if m.startswith(("blocks.", "final_layer."))}
    refinement["blocks.1.attn.qkv"] = 1  # a single up-projection over a fused qkv is legal upstream
    refinement["t_embedder.mlp.0"] = 1  # and so is an embedder target
    return {"cfg_step_lora": cfg_step, "refinement_lora": refinement}


def write_raw_tree(root: Path) -> Path:
    dit_dir = root / "dit"
    dit_dir.mkdir(parents=True)
    (dit_dir / "config.json").write_text(json.dumps(CONFIG))
    weights = raw_weights()
    keys = sorted(weights)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
    for name, shard_keys in shards.items():
        save_file({k: weights[k] for k in shard_keys}, dit_dir / name)
    total = sum(value.numel() * value.element_size() for value in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (dit_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (root / "lora").mkdir()
    for seed, (name, targets) in enumerate(lora_targets().items()):
        rank, alpha_scale = (4, 0.5) if name == "cfg_step_lora" else (2, 1.0)
        save_file(upstream_lora(targets, rank, alpha_scale, seed + 10), root / "lora" / f"{name}.safetensors")
    return root


def to_fastvideo_lora(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split an upstream-format LoRA into FastVideo targets (test-side conversion, independent of the converter)."""
    linears = keymap.expand(CONFIG, "upstream").linears
    out: dict[str, torch.Tensor] = {}
    modules = {key.split(".", 1)[0] for key in tensors}
    for encoded in sorted(modules):
        linear = linears[encoded.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")]
        down, scale = tensors[f"{encoded}.lora_down.weight"], float(tensors[f"{encoded}.alpha_scale"])
        ups = [tensors[k] for k in sorted(t for t in tensors if t.startswith(f"{encoded}.lora_up."))]
        targets, n = linear.fastvideo, len(ups)
        rank = down.shape[0] // n
        for part, target in enumerate(targets):
            if n == len(targets):  # one up block per target: the matching rank slice of down
                a, b = down[part * rank:(part + 1) * rank], ups[part]
            elif len(targets) == 1:  # several blocks, one target: block-diagonal B over the whole down
                a, b = down, torch.block_diag(*ups)
            else:  # one up over a fused output: whole down, a row slice of up
                rows = linear.out_features // len(targets)
                a, b = down, ups[0][part * rows:(part + 1) * rows]
            out[f"{target}.lora_A"], out[f"{target}.lora_B"] = a.clone(), b.clone()
            out[f"{target}.lora_alpha"] = torch.tensor(scale * a.shape[0])
    return out


def write_fastvideo_tree(raw_root: Path, root: Path, mutate_weights=None, mutate_loras=None) -> Path:
    (root / "transformer").mkdir(parents=True)
    config = keymap.convert_config(CONFIG, "upstream", "fastvideo")
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    weights = raw_weights()
    out = {}
    for rule in keymap.expand(CONFIG, "upstream").params:
        for key, part in zip(rule.fastvideo, weights[rule.upstream].chunk(rule.parts, dim=0), strict=True):
            out[key] = part.clone()
    if mutate_weights:
        mutate_weights(out)
    save_file(out, root / "transformer" / "model.safetensors")
    for path in sorted((raw_root / "lora").glob("*.safetensors")):
        converted = to_fastvideo_lora(load_file(path))
        if mutate_loras:
            mutate_loras(path.stem, converted)
        folder = root / "lora" / FASTVIDEO_SUBDIRS[path.stem]
        folder.mkdir(parents=True)
        save_file(converted, folder / path.name)
    return root


@pytest.fixture(scope="session")
def raw_tree(tmp_path_factory) -> Path:
    return write_raw_tree(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def fastvideo_tree(raw_tree, tmp_path_factory) -> Path:
    return write_fastvideo_tree(raw_tree, tmp_path_factory.mktemp("fastvideo"))


@pytest.fixture(scope="session")
def raw_model(raw_tree) -> LongcatDiT:
    return load_dit(raw_tree)


def inputs(seed: int = 1, frames: int = 4, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, frames, 4, 6, generator=gen)
    text = torch.randn(batch, 1, 8, 32, generator=gen)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return latents, text, mask


def case(report: dict, name: str) -> dict:
    (found,) = [entry for entry in report["cases"] if entry["name"] == name]
    return found


def assert_schema(report: dict) -> None:
    assert jsonschemas.schema_errors("parity-report", report) == []
    json.dumps(report, allow_nan=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- layouts ---------------------------------------------------------------------------------------------

def test_state_dict_keys_are_exactly_each_naming(raw_model, fastvideo_tree):
    for naming, model in (("upstream", raw_model), ("fastvideo", load_dit(fastvideo_tree))):
        expected = keymap.expand(CONFIG, "upstream").expected_shapes(naming)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert open_tree(fastvideo_tree).layout == "fastvideo"


def test_both_layouts_give_identical_outputs(raw_model, fastvideo_tree):
    fastvideo = load_dit(fastvideo_tree)
    latents, text, mask = inputs()
    t = torch.tensor([700.0, 250.0])
    frame_t = torch.tensor([[0.0, 0.0, 500.0, 500.0]] * 2)
    with torch.no_grad():
        for model_args in ((latents, t, text, mask), (latents, frame_t, text, mask, 2)):
            assert torch.equal(raw_model(*model_args), fastvideo(*model_args))
        cached = [m(latents[:, :, 2:], t, text, mask, kv_cache=m.build_kv_cache(latents[:1, :, :2]))
                  for m in (raw_model, fastvideo)]
    assert torch.equal(*cached)


# ---- conditioning, KV cache, text padding -------------------------------------------------------------------

def test_kv_cache_path_equals_full_conditioned_pass_for_noise_frames(raw_model):
    latents, text, mask = inputs()
    cond = 2
    t = torch.tensor([650.0, 300.0])
    frame_t = torch.cat([torch.zeros(2, cond), t[:, None].expand(2, 2)], dim=1)
    with torch.no_grad():
        full = raw_model(latents, frame_t, text, mask, num_cond_latents=cond)
        per_sample_cache = raw_model.build_kv_cache(latents[:, :, :cond])
        cached = raw_model(latents[:, :, cond:], t, text, mask, kv_cache=per_sample_cache)
        shared = latents.clone()
        shared[1, :, :cond] = shared[0, :, :cond]
        full_shared = raw_model(shared, frame_t, text, mask, num_cond_latents=cond)
        batch_one = raw_model(shared[:, :, cond:], t, text, mask, kv_cache=raw_model.build_kv_cache(shared[:1, :, :cond]))
    assert rel(cached, full[:, :, cond:]) < 1e-6
    assert rel(batch_one, full_shared[:, :, cond:]) < 1e-6


def test_conditioning_tokens_see_only_conditioning(raw_model):
    latents, text, mask = inputs()
    frame_t = torch.tensor([[0.0, 400.0, 400.0, 400.0]] * 2)
    other_noise = latents.clone()
    other_noise[:, :, 1:] = torch.randn_like(other_noise[:, :, 1:])
    with torch.no_grad():
        base = raw_model(latents, frame_t, text, mask, num_cond_latents=1)
        new_text = raw_model(latents, frame_t, text + 1.0, mask, num_cond_latents=1)
        new_noise = raw_model(other_noise, frame_t, text, mask, num_cond_latents=1)
        unconditioned = raw_model(latents, frame_t, text, mask)
    assert torch.equal(base[:, :, :1], new_text[:, :, :1])  # no cross-attention for conditioning tokens
    assert torch.equal(base[:, :, :1], new_noise[:, :, :1])  # and no attention to noise tokens
    assert not torch.allclose(base[:, :, 1:], new_text[:, :, 1:])
    assert not torch.allclose(base[:, :, :1], unconditioned[:, :, :1])


def test_text_padding_is_zeroed_after_projection_and_still_attended(raw_model):
    latents, text, mask = inputs()
    t = torch.tensor([500.0, 500.0])
    tokens, key_mask = caption_embedding(raw_model, text[:, 0], mask, zero_pad=True)
    assert key_mask is None and torch.equal(tokens[0, 5:], torch.zeros_like(tokens[0, 5:]))
    noisy_pad = text.clone()
    noisy_pad[0, 0, 5:] = 7.0
    zeroed_before = text.clone()
    zeroed_before[0, 0, 5:] = 0.0
    dropping = LongcatDiT({**CONFIG, "text_tokens_zero_pad": False})
    dropping.load_state_dict(raw_model.state_dict())
    with torch.no_grad():
        base = raw_model(latents, t, text, mask)
        assert torch.equal(base, raw_model(latents, t, noisy_pad, mask))  # padded inputs never matter
        assert not torch.allclose(base, raw_model(latents, t, zeroed_before, None))  # zeroing before is different
        assert not torch.allclose(base, dropping(latents, t, text, mask))  # dropping padded keys is different
        assert torch.equal(dropping(latents, t, text, mask), dropping(latents, t, noisy_pad, mask))


# ---- BSA in the model ----------------------------------------------------------------------------------------

def test_model_bsa_with_all_blocks_kept_equals_dense(raw_tree):
    model = load_dit(raw_tree)
    latents, text, mask = inputs()
    frame_t = torch.tensor([[0.0, 0.0, 600.0, 600.0]] * 2)
    with torch.no_grad():
        dense = [model(latents, frame_t, text, mask, num_cond_latents=2), model(latents, frame_t[:, 2], text, mask)]
        model.enable_bsa(BsaParams(sparsity=0.0, chunk_q=(2, 1, 3), chunk_k=(2, 1, 3)))
        sparse_all = [model(latents, frame_t, text, mask, num_cond_latents=2), model(latents, frame_t[:, 2], text, mask)]
        model.enable_bsa(BsaParams(sparsity=0.5, chunk_q=(2, 1, 3), chunk_k=(2, 1, 3)))
        sparse_half = model(latents, frame_t[:, 2], text, mask)
    for d, s in zip(dense, sparse_all, strict=True):
        assert rel(s, d) < 1e-5
    assert rel(sparse_half, dense[1]) > 1e-3


# ---- LoRA ------------------------------------------------------------------------------------------------------

def test_upstream_runtime_lora_matches_merged_fastvideo_lora(raw_model, raw_tree, fastvideo_tree):
    fastvideo = load_dit(fastvideo_tree)
    raw, converted = open_tree(raw_tree), open_tree(fastvideo_tree)
    latents, text, mask = inputs()
    t = torch.tensor([800.0, 100.0])
    with torch.no_grad():
        base = raw_model(latents, t, text, mask)
        for name in ("cfg_step_lora", "refinement_lora"):
            apply_loras(raw_model, [read_lora(raw, name)])
            apply_loras(fastvideo, [read_lora(converted, name)])
            runtime, merged = raw_model(latents, t, text, mask), fastvideo(latents, t, text, mask)
            clear_loras(raw_model)
            assert rel(runtime, base) > 1e-3, name  # the adapter does something
            assert rel(merged, runtime) < 1e-5, name
        assert torch.equal(raw_model(latents, t, text, mask), base)  # and switching it off restores the model


def test_loras_on_one_module_add_up(raw_model, raw_tree):
    tree = open_tree(raw_tree)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    role = "blocks.0.attn.qkv"  # targeted by both adapters
    with torch.no_grad():
        base = raw_model.linear(role, x)
        deltas = []
        for name in ("cfg_step_lora", "refinement_lora"):
            apply_loras(raw_model, [read_lora(tree, name)])
            deltas.append(raw_model.linear(role, x) - base)
        apply_loras(raw_model, [read_lora(tree, "cfg_step_lora"), read_lora(tree, "refinement_lora")])
        both = raw_model.linear(role, x) - base
        clear_loras(raw_model)
    assert min(float(d.abs().max()) for d in deltas) > 1e-3
    assert torch.allclose(both, deltas[0] + deltas[1], atol=1e-6)


# ---- dtypes --------------------------------------------------------------------------------------------------------

def test_bf16_model_runs_and_tracks_fp32(raw_tree, raw_model):
    model = load_dit(raw_tree, torch.bfloat16)
    assert model.dtype == torch.bfloat16
    latents, text, mask = inputs()
    t = torch.tensor([998.27, 11.87])
    with torch.no_grad():
        out = model(latents, t, text, mask)
        apply_loras(model, [read_lora(open_tree(raw_tree), "refinement_lora")])
        with_lora = model(latents, t, text, mask)
        clear_loras(model)
        reference = raw_model(latents, t.to(torch.bfloat16).float(), text, mask)
    assert out.dtype == torch.float32 and torch.isfinite(with_lora).all()
    assert rel(out, reference) < 2e-2


# ---- loading errors -----------------------------------------------------------------------------------------------

def _broken_copy(raw_tree: Path, tmp_path: Path, edit) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(raw_tree, root)
    shard = root / "dit" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    index_path = root / "dit" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: n for k, n in index["weight_map"].items() if not n.endswith("00001-of-00002.safetensors")}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    index["metadata"]["total_size"] = sum(value.numel() * value.element_size() for path in root.glob("dit/*.safetensors")
                                          for value in load_file(path).values())
    index_path.write_text(json.dumps(index))
    return root


def test_loading_reports_missing_unexpected_and_misshaped_keys(raw_tree, tmp_path):
    def edit(tensors):
        first = sorted(tensors)[0]
        del tensors[first]
        tensors["blocks.0.attn.extra.weight"] = torch.ones(2)
        square = next(k for k in sorted(tensors) if k.endswith("attn.proj.weight"))
        tensors[square] = tensors[square][:, :3].contiguous()

    root = _broken_copy(raw_tree, tmp_path, edit)
    with pytest.raises(LongcatError) as caught:
        load_dit(root)
    message = str(caught.value)
    assert "\n" not in message
    assert "1 missing (" in message and "1 unexpected (blocks.0.attn.extra.weight)" in message
    assert "1 with wrong shape" in message and "[64, 3] != [64, 64]" in message


def test_loading_refuses_a_stray_shard_and_an_unknown_tree(raw_tree, tmp_path):
    root = tmp_path / "stray"
    shutil.copytree(raw_tree, root)
    save_file({"blocks.0.attn.qkv.bias": torch.zeros(192)}, root / "dit" / "copy.safetensors")
    with pytest.raises(LongcatError, match=r"dit/copy\.safetensors: is not listed in diffusion_pytorch_model"):
        load_dit(root)  # the reader convert and validate use: one line naming the stray shard
    with pytest.raises(LongcatError, match="no LongCat-Video tree here") as refused:
        open_tree(tmp_path)
    assert "--layout" not in str(refused.value)  # run and parity have no such option
    (root / "dit" / "config.json").unlink()
    with pytest.raises(LongcatError, match="no DiT config: dit/config.json is missing"):
        open_tree(root)
    config = json.loads((raw_tree / "dit" / "config.json").read_text())
    (root / "dit" / "config.json").write_text(json.dumps({**config, "_class_name": "SomethingElse"}))
    with pytest.raises(LongcatError, match="does not describe LongCatVideoTransformer3DModel"):
        open_tree(root)


# ---- parity -----------------------------------------------------------------------------------------------------------

def test_parity_passes_on_a_faithful_copy(raw_tree, fastvideo_tree):
    weights = weights_parity(raw_tree, fastvideo_tree)
    assert weights["passed"], weights
    assert case(weights, "dit")["exact"] == case(weights, "dit")["checked"] == 10 + 27 * 2 + 4
    assert [entry["name"] for entry in weights["cases"]] == ["config", "dit", "lora:cfg_step_lora", "lora:refinement_lora"]
    assert max(case(weights, f"lora:{n}")["max_rel_fro"] for n in ("cfg_step_lora", "refinement_lora")) < 1e-12
    forward = forward_parity(raw_tree, fastvideo_tree)
    assert forward["passed"], forward
    names = [entry["name"] for entry in forward["cases"]]
    assert names == ["plain", "cond", "kvcache", "lora:cfg_step_lora", "lora:refinement_lora"]
    assert all(entry["rel_l2"] <= 1e-5 and entry["cosine"] > 0.999999 for entry in forward["cases"])
    assert_schema(weights)
    assert_schema(forward)
    bf16 = forward_parity(raw_tree, fastvideo_tree, cases=["plain", "lora:refinement_lora"], dtype="bfloat16")
    assert bf16["passed"] and bf16["threshold"] == 2e-2


def test_parity_accepts_raw_and_diffusers_targets(raw_tree, tmp_path):
    assert weights_parity(raw_tree, raw_tree)["passed"]
    result = forward_parity(raw_tree, raw_tree, cases=["plain"])
    assert result["passed"] and case(result, "plain")["max_abs"] == 0.0
    diffusers = tmp_path / "diffusers"
    shutil.copytree(raw_tree, diffusers)
    (diffusers / "dit").rename(diffusers / "transformer")
    assert open_tree(diffusers).layout == "diffusers"
    assert weights_parity(raw_tree, diffusers)["passed"]
    assert forward_parity(raw_tree, diffusers, cases=["kvcache", "lora"])["passed"]


def test_parity_of_a_bf16_copy_is_exact_after_cast_only_when_the_cast_is_declared(raw_tree, tmp_path):
    def to_bf16(weights):
        weights.update({key: value.to(torch.bfloat16) for key, value in weights.items()})

    def lora_to_bf16(name, lora):
        lora.update({key: value.to(torch.bfloat16) for key, value in lora.items() if not key.endswith("lora_alpha")})

    def truncated_bf16(weights):
        to_bf16(weights)
        bits = raw_weights()["blocks.0.ffn.w1.weight"].view(torch.int32) & -65536  # truncate instead of rounding
        weights["blocks.0.ffn.w1.weight"] = bits.view(torch.float32).to(torch.bfloat16)

    bf16 = write_fastvideo_tree(raw_tree, tmp_path / "bf16", mutate_weights=to_bf16, mutate_loras=lora_to_bf16)
    undeclared = weights_parity(raw_tree, bf16)  # no conversion.json: every dtype must be the source's
    dit = case(undeclared, "dit")
    assert not undeclared["passed"] and dit["mismatched"] == dit["checked"] and dit["equal_after_cast"] == 0
    assert "dtype BF16, expected F32" in dit["mismatches"][0]["problem"]
    assert not case(undeclared, "lora:cfg_step_lora")["passed"]
    report = weights_parity(raw_tree, bf16, dtype="bfloat16")
    assert report["passed"] and case(report, "dit")["equal_after_cast"] == case(report, "dit")["checked"]
    assert report["dtype_policy"] == {"dtype": "BF16", "keep_fp32": [], "origin": "dtype bfloat16 given by the caller"}
    assert_schema(report)
    assert forward_parity(raw_tree, bf16, cases=["plain", "cond"], dtype="bfloat16")["passed"]
    assert not forward_parity(raw_tree, bf16, cases=["plain"])["passed"]  # fp32 threshold sees the rounding
    sloppy = write_fastvideo_tree(raw_tree, tmp_path / "sloppy", mutate_weights=truncated_bf16,
                                  mutate_loras=lora_to_bf16)
    tensors = case(weights_parity(raw_tree, sloppy, dtype="bfloat16"), "dit")
    assert [m["key"] for m in tensors["mismatches"]] == ["blocks.0.ffn.w1.weight"]


# ---- parity against the dtype policy conversion.json records ---------------------------------------------------

@pytest.fixture(scope="module")
def converted_trees(tiny_raw, tmp_path_factory) -> dict[str, Path]:
    """Real conversions (with their manifests) of the complete tiny tree: dtypes kept, and bfloat16 with adaLN
    kept in float32."""
    root = tmp_path_factory.mktemp("converted")
    trees = {"keep": root / "keep", "bf16": root / "bf16"}
    convert(ConvertRequest(src=tiny_raw, dst=trees["keep"], to="fastvideo", quiet=True))
    convert(ConvertRequest(src=tiny_raw, dst=trees["bf16"], to="fastvideo", dtype="bfloat16", keep_fp32=("*adaln*",), quiet=True))
    return trees


def _resave(tree: Path, relative_glob: str, key: str, dtype: torch.dtype) -> None:
    """Re-save one tensor of a converted tree in another dtype (the rest of the file unchanged)."""
    (path,) = [p for p in tree.glob(relative_glob) if key in load_file(p)]
    tensors = load_file(path)
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_manifest(tree: Path, **policy) -> None:
    path = tree / "conversion.json"
    manifest = json.loads(path.read_text())
    manifest["dtype_policy"].update(policy)
    path.write_text(json.dumps(manifest))


DIT = "transformer/*.safetensors"
DISTILLED, REFINEMENT = "lora/distilled/*.safetensors", "lora/refinement/*.safetensors"
# (converted tree, change, failing cases, text of the first failure)
POLICY_CASES = [
    ("keep", None, [], None),
    ("bf16", None, [], None),
    # the reproduction: an fp32 tensor re-saved as F8_E4M3 is equal after a cast, but no cast was asked for
    ("keep", lambda t: _resave(t, DIT, "blocks.0.cross_attn.q_norm.weight", torch.float8_e4m3fn), ["dit"],
     "dtype F8_E4M3, expected F32"),
    ("keep", lambda t: _resave(t, DIT, "blocks.1.ffn.w2.weight", torch.bfloat16), ["dit"], "dtype BF16, expected F32"),
    ("keep", lambda t: _resave(t, DISTILLED, "blocks.0.cross_attn.to_k.lora_B", torch.bfloat16), ["lora:cfg_step_lora"],
     "dtype BF16, expected F32"),
    ("bf16", lambda t: _resave(t, DIT, "blocks.0.adaln_linear_1.weight", torch.bfloat16), ["dit"],
     "dtype BF16, expected F32"),  # --keep-fp32 '*adaln*' kept it in float32
    ("bf16", lambda t: _resave(t, DIT, "blocks.1.self_attn.to_v.weight", torch.float16), ["dit"],
     "dtype F16, expected BF16"),
    ("bf16", lambda t: _resave(t, REFINEMENT, "blocks.1.ffn.w1.lora_A", torch.float8_e5m2), ["lora:refinement_lora"],
     "dtype F8_E5M2, expected BF16"),
    ("keep", lambda t: _edit_manifest(t, dtype="F8_E4M3"), ["dit"], "dtype policy 'F8_E4M3' is not one convert writes"),
    ("keep", lambda t: _edit_manifest(t, dtype="BF16"), ["dit", "lora:cfg_step_lora", "lora:refinement_lora"],
     "dtype F32, expected BF16"),
    ("bf16", lambda t: _edit_manifest(t, keep_fp32=[]), ["dit", "lora:refinement_lora"],  # it has adaLN pieces
     "dtype F32, expected BF16"),
]


@pytest.mark.parametrize("tree, change, failing, text", POLICY_CASES)
def test_weights_parity_fails_every_dtype_the_policy_did_not_produce(converted_trees, tiny_raw, tmp_path, tree,
                                                                     change, failing, text):
    converted = Path(shutil.copytree(converted_trees[tree], tmp_path / tree))
    if change is not None:
        change(converted)
    report = weights_parity(tiny_raw, converted)
    assert_schema(report)
    assert sorted(c["name"] for c in report["cases"] if not c["passed"]) == failing
    assert report["passed"] == (not failing)
    if text is not None:
        first = case(report, failing[0])
        assert text in (first.get("error") or first["mismatches"][0]["problem"]), first
    if not failing and tree == "bf16":
        dit = case(report, "dit")
        assert dit["equal_after_cast"] > 0 and dit["exact"] > 0 and dit["equal_after_cast"] + dit["exact"] == dit["checked"]


def test_parity_cli_names_the_tensor_and_both_dtypes(converted_trees, tiny_raw, tmp_path):
    converted = Path(shutil.copytree(converted_trees["keep"], tmp_path / "keep"))
    _resave(converted, DIT, "blocks.0.cross_attn.q_norm.weight", torch.float8_e4m3fn)
    result = run_cli("parity", tiny_raw, converted)
    assert result.exit_code == 1 and "parity weights: FAIL" in result.output
    assert "blocks.0.cross_attn.q_norm.weight" in result.output and "dtype F8_E4M3, expected F32" in result.output
    clash = run_cli("parity", tiny_raw, converted, "--dtype", "bfloat16")
    assert clash.exit_code == 2 and "contradicts the dtype policy keep" in clash.output




def _swap_q_k(weights: dict) -> None:
    q, k = "blocks.0.self_attn.to_q.weight", "blocks.0.self_attn.to_k.weight"
    weights[q], weights[k] = weights[k], weights[q]


def _transpose_out(weights: dict) -> None:
    key = "blocks.1.cross_attn.to_out.weight"
    weights[key] = weights[key].T.contiguous()


def _drop_module(name: str, lora: dict) -> None:
    if name == "refinement_lora":
        for tail in ("lora_A", "lora_B", "lora_alpha"):
            del lora[f"blocks.1.cross_attn.to_out.{tail}"]


@pytest.mark.parametrize("mutation, expected", [
    ({"mutate_weights": _swap_q_k}, "holds the source rows meant for blocks.0.self_attn.to_k.weight"),
    ({"mutate_weights": _transpose_out}, "is the transpose of the source for blocks.1.cross_attn.to_out.weight"),
    ({"mutate_loras": _drop_module}, "blocks.1.cross_attn.proj"),
])
def test_parity_fails_loudly_on_a_wrong_copy(raw_tree, tmp_path, mutation, expected):
    broken = write_fastvideo_tree(raw_tree, tmp_path / "broken", **mutation)
    weights = weights_parity(raw_tree, broken)
    forward = forward_parity(raw_tree, broken)
    assert not weights["passed"] and not forward["passed"]
    assert expected in json.dumps(weights)
    assert_schema(weights)
    assert_schema(forward)
    failed = sorted(entry["name"] for entry in forward["cases"] if not entry["passed"])
    if "mutate_loras" in mutation:
        assert case(weights, "lora:refinement_lora")["missing"] == ["blocks.1.cross_attn.proj"]
        assert failed == ["lora:refinement_lora"]
    else:
        assert case(weights, "dit")["mismatched"] == (2 if mutation["mutate_weights"] is _swap_q_k else 1)
        assert failed == ["cond", "kvcache", "lora:cfg_step_lora", "lora:refinement_lora", "plain"]
        assert min(entry["rel_l2"] for entry in forward["cases"]) > 1e-3


def test_parity_catches_a_lora_scale_and_block_mix_up(raw_tree, tmp_path):
    def mutate(name, lora):
        if name == "cfg_step_lora":
            lora["blocks.0.ffn.w2.lora_alpha"] = lora["blocks.0.ffn.w2.lora_alpha"] + 0.5  # int() drops it
            a, b = "blocks.1.self_attn.to_k.lora_B", "blocks.1.self_attn.to_v.lora_B"
            lora[a], lora[b] = lora[b], lora[a]

    broken = write_fastvideo_tree(raw_tree, tmp_path / "scale", mutate_loras=mutate)
    report = case(weights_parity(raw_tree, broken), "lora:cfg_step_lora")
    assert not report["passed"]
    assert [m["module"] for m in report["mismatches"]] == ["blocks.1.attn.qkv"]
    alpha_only = write_fastvideo_tree(raw_tree, tmp_path / "alpha", mutate_loras=lambda n, lora: lora.update(
        {"blocks.0.ffn.w2.lora_alpha": lora["blocks.0.ffn.w2.lora_alpha"] * 1.5} if n == "cfg_step_lora" else {}))
    alpha_report = case(weights_parity(raw_tree, alpha_only), "lora:cfg_step_lora")
    assert [m["module"] for m in alpha_report["mismatches"]] == ["blocks.0.ffn.w2"]


def test_parity_reports_a_converted_tree_it_cannot_read_instead_of_raising(raw_tree, fastvideo_tree, tmp_path):
    broken = Path(shutil.copytree(fastvideo_tree, tmp_path / "broken"))
    shutil.copy(broken / "transformer" / "model.safetensors", broken / "transformer" / "copy.safetensors")
    weights = weights_parity(raw_tree, broken)
    dit = case(weights, "dit")
    assert not weights["passed"] and not dit["passed"]
    assert "is in 2 files: copy.safetensors, model.safetensors" in dit["error"]
    assert case(weights, "config")["passed"]  # the rest of the report is still made
    forward = forward_parity(raw_tree, broken, cases=["plain"])
    assert not forward["passed"] and "cannot load the converted DiT" in json.dumps(forward)
    assert_schema(weights)
    assert_schema(forward)


def test_parity_rejects_bad_arguments(raw_tree, fastvideo_tree):
    with pytest.raises(LongcatError, match="upstream names"):
        weights_parity(fastvideo_tree, raw_tree)
    with pytest.raises(LongcatError, match="unknown forward case"):
        forward_parity(raw_tree, fastvideo_tree, cases=["t2v"])
    with pytest.raises(LongcatError, match="unsupported dtype"):
        forward_parity(raw_tree, fastvideo_tree, dtype="int8")
    with pytest.raises(LongcatError, match="unsupported dtype"):
        weights_parity(raw_tree, fastvideo_tree, dtype="float8")
