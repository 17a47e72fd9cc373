"""Run UPSTREAM's LongCat-Video-Avatar DiT and the reference avatar DiT on the same tiny weights; compare.

usage (from the repo, in the project venv):
    python scripts/check_avatar_upstream.py [--work DIR] [--tol 1e-5] [--bf16-tol 2e-2]
        [--upstream-python ~/.cache/longcat-oracle/venv/bin/python] [--upstream-src ~/.cache/longcat-oracle/longcat]

The script runs itself with `--upstream` in the upstream venv. That process builds tiny
`LongCatVideoAvatarTransformer3DModel`s with random weights (v1.0-shaped: 12 × 768 wav2vec2 features; v1.5-shaped:
5 × 1280 Whisper features, without and with `audio_prenorm`), saves each with upstream's `save_pretrained` to
WORK/<variant>/dit, quantises the v1.5 one with upstream's `quantize_model` + `save_quantized_state_dict` to
WORK/<variant>/int8, reloads that with upstream's `load_quantized_dit`, runs every case and writes inputs and
outputs to WORK/cases.pt. This process then loads `longcat_reference.avatar` from the same folders
(`load_avatar_dit`, `load_avatar_int8`), replays the cases and prints rel L2 / max abs per case.
A case passes at rel L2 <= --tol (fp32) or --bf16-tol (the INT8 model as upstream loads it, in bf16).
Exit 0 when all pass, 1 otherwise, 2 on bad input.

Cases per variant: at2v (CFG-sized batch of 2, padded text, nc = 0), ai2v (nc = 1, per-frame timesteps),
multi2 (two speakers + background masks, nc = 1), multi3 (three audio streams, four masks: background at 100),
vc (continuation without cache: reference latent placed at ref_img_index, nc = 3, mask_frame_range masking part
of the noise frames), vc-kv (the same with a KV cache built by upstream's cache call) and multi-vc-kv (two
speakers, continuation with KV cache). v1.5 variant also: at2v and multi2 with an upstream-format LoRA on every
Linear (audio modules included; upstream's load_lora/enable_loras against our runtime LoRA); INT8: at2v and multi2
in bf16 (the model as upstream's loader returns it) and in fp32 (after `.float()`), and at2v in fp32 with the LoRA
on top of the quantised Linears. Also (bounded by --bf16-tol) our v1.5 model run in bf16 against upstream's fp32
outputs: upstream's bf16 GPU semantics (CUDA-only autocast islands) cannot run on the CPU.

CPU shims for the upstream side (our own code, installed only in the --upstream process):
* modules the DiT imports but never calls on its forward path are stubbed when missing: the Triton BSA kernel
  module, and librosa / imageio / pyloudnorm / scipy.signal / torchvision (imported by
  `audio_process/torch_utils.py` for the audio front end and video saving);
* a stand-in `xformers.ops.memory_efficient_attention(q, k, v, attn_bias=None)` on [B, M, H, K] tensors that is
  torch SDPA with the default 1/sqrt(K) scale (what xformers computes, without attention bias; a bias raises);
  each block's self-attention (`avatar.attention.Attention`) and audio cross-attention
  (`SingleStreamAttention`) get `enable_xformers = True`, so upstream's own code runs unchanged and calls the
  stand-in. Why: without a flash-attn / xformers flag `Attention._process_attn` raises, and
  `SingleStreamAttention._process_cross_attn` silently skips the attention (its output is proj(q_linear input)).
  Upstream's flash-attn path is the same exact softmax attention with softmax_scale = head_dim^-1/2;
* text cross-attention (`modules.attention.MultiHeadCrossAttention._process_cross_attn`, varlen flash-attn
  upstream) replaced by SDPA per sample over that sample's valid text tokens (as the project's base oracle);
* `audio_process.torch_utils.torch_gc` (calls torch.cuda.ipc_collect) a no-op, and the `torch.compile`d
  `calculate_x_ref_attn_map` replaced by its own undecorated Python function (same code, eager);
* `cp_split_hw=[1, 1]` (no context parallelism); the saved configs carry `null` as the published ones do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

HOME = Path(os.environ.get("ORACLE_HOME") or Path.home() / ".cache" / "longcat-oracle")
BASE = dict(in_channels=16, out_channels=16, hidden_size=64, depth=2, num_heads=4, caption_channels=32,
            mlp_ratio=4, adaln_tembed_dim=32, frequency_embedding_size=256, text_tokens_zero_pad=True,
            audio_window=5, intermediate_dim=32, output_dim=24, context_tokens=4, vae_scale=4,
            class_range=24, class_interval=4)
VARIANTS = {
    "v1.0": dict(BASE, audio_block=12, audio_channel=768, audio_prenorm=False),
    "v1.5": dict(BASE, audio_block=5, audio_channel=1280, audio_prenorm=False),
    "v1.5-prenorm": dict(BASE, audio_block=5, audio_channel=1280, audio_prenorm=True),
}
INT8_VARIANT = "v1.5"
H = W = 8  # latent size: 4 x 4 tokens per frame
TEXT = 7
LORA_RANK, HYPHEN = 4, "___lorahyphen___"
REF_INDEX, MASK_RANGE = 3, 1  # continuation: ref at RoPE position 3; noise frames 0..2 of 4 do not see it


# ==== upstream side (upstream venv) =============================================================================

def install_upstream(src: Path) -> dict:
    """Import upstream from `src` with the CPU shims above; returns the classes and functions the cases use."""
    sys.path.insert(0, str(src))
    import diffusers  # noqa: F401  (first: their availability checks must see the real packages, not the stubs)
    import transformers  # noqa: F401

    for name in ("librosa", "imageio", "pyloudnorm", "torchvision", "scipy", "scipy.signal",
                 "longcat_video.block_sparse_attention.bsa_interface"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.flash_attn_bsa_3d = None
            sys.modules[name] = stub
            if "." in name:
                setattr(sys.modules[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1], stub)
    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):
        if attn_bias is not None:
            raise NotImplementedError("the xformers stand-in takes no attention bias")
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2))
        return out.transpose(1, 2)

    ops.memory_efficient_attention = memory_efficient_attention
    xformers.ops = ops
    sys.modules["xformers"], sys.modules["xformers.ops"] = xformers, ops

    from longcat_video.audio_process import torch_utils
    from longcat_video.modules import attention, quantization
    from longcat_video.modules.avatar.longcat_video_dit_avatar import LongCatVideoAvatarTransformer3DModel

    def text_cross_attention(self, x, cond, kv_seqlen):
        batch, tokens, channels = x.shape
        q = self.q_linear(x).view(1, -1, self.num_heads, self.head_dim)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        outs, offset = [], 0
        for b in range(batch):
            qb = q[0, b * tokens:(b + 1) * tokens].transpose(0, 1)
            kb = k[0, offset:offset + kv_seqlen[b]].transpose(0, 1)
            vb = v[0, offset:offset + kv_seqlen[b]].transpose(0, 1)
            offset += kv_seqlen[b]
            outs.append(torch.nn.functional.scaled_dot_product_attention(qb, kb, vb).transpose(0, 1))
        return self.proj(torch.stack(outs, 0).reshape(batch, tokens, channels))

    attention.MultiHeadCrossAttention._process_cross_attn = text_cross_attention
    torch_utils.torch_gc = lambda: None
    torch_utils.calculate_x_ref_attn_map = torch_utils.calculate_x_ref_attn_map.__wrapped__
    return {"model": LongCatVideoAvatarTransformer3DModel, "quantization": quantization}


def use_standin(model) -> None:
    for block in model.blocks:
        block.attn.enable_xformers = True
        block.audio_cross_attn.enable_xformers = True


def build_variant(up: dict, name: str, config: dict, work: Path, gen: torch.Generator):
    model = up["model"](**config, cp_split_hw=[1, 1]).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            scale = 0.3 if p.ndim == 1 else min(0.08, 2.0 / p.shape[-1] ** 0.5)
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "norm" in key and p.ndim == 1 and
                                                                 key.endswith("weight") else 0.0))
    folder = work / name / "dit"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="2MB")
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text())
    saved["cp_split_hw"] = None
    config_path.write_text(json.dumps(saved, indent=2))
    use_standin(model)
    return model


def split_count(module_name: str) -> int:
    """Up blocks of each LoRA target: the row blocks of fused projections and modulations, as upstream splits them."""
    last = module_name.rsplit(".", 2)
    if module_name.endswith("attn.qkv"):
        return 3
    if module_name.endswith("kv_linear"):
        return 2
    if module_name.startswith("final_layer.adaLN"):
        return 2
    if last[-2:] == ["adaLN_modulation", "1"]:
        return 3 if "audio_adaLN" in module_name else 6
    return 1


def make_lora(model, path: Path, gen: torch.Generator) -> None:
    """An upstream-format adapter on every Linear of the avatar DiT (audio modules, embedders and final layer
    included), rank LORA_RANK, alpha_scale 0.5."""
    from safetensors.torch import save_file

    state = {}
    for name, module in model.named_modules():
        if module.__class__.__name__ != "Linear":
            continue
        encoded = "lora" + HYPHEN + name.replace(".", HYPHEN)
        n = split_count(name)
        state[f"{encoded}.lora_down.weight"] = torch.randn(n * LORA_RANK, module.in_features, generator=gen) * 0.05
        if n == 1:
            state[f"{encoded}.lora_up.weight"] = torch.randn(module.out_features, LORA_RANK, generator=gen) * 0.05
        for block in range(n if n > 1 else 0):
            state[f"{encoded}.lora_up.blocks.{block}.weight"] = torch.randn(module.out_features // n, LORA_RANK,
                                                                            generator=gen) * 0.05
        state[f"{encoded}.alpha_scale"] = torch.tensor(0.5)
    save_file(state, str(path))


def run_with_lora(model, path: Path, case: dict) -> torch.Tensor:
    """Upstream's own adapter runtime: load_lora + enable_loras (the demo's call for dmd_lora), then the case."""
    model.load_lora(str(path), "dmd", multiplier=1.0, lora_network_dim=LORA_RANK, lora_network_alpha=LORA_RANK / 2)
    model.enable_loras(["dmd"])
    try:
        return run_upstream_case(model, case)
    finally:
        model.disable_all_loras()


def make_int8(up: dict, model, name: str, work: Path):
    """Upstream's quantiser and writer on a copy of the fp32 model, then upstream's INT8 loader."""
    import copy

    quantization = up["quantization"]
    quantized = quantization.quantize_model(copy.deepcopy(model))
    quantization.save_quantized_state_dict(quantized, str(work / name / "int8"),
                                           config_source_dir=str(work / name / "dit"))
    loaded = quantization.load_quantized_dit(str(work / name), subfolder="int8", cp_split_hw=[1, 1])
    use_standin(loaded)
    return loaded


def case_inputs(config: dict, gen: torch.Generator) -> dict:
    """Seeded inputs of every case for one variant (audio shapes follow the variant's encoder)."""
    feat = (config["audio_window"], config["audio_block"], config["audio_channel"])

    def audio(speakers: int, latent_frames: int) -> torch.Tensor:
        return torch.randn(speakers, 1 + config["vae_scale"] * (latent_frames - 1), *feat, generator=gen)

    def latents(batch: int, frames: int) -> torch.Tensor:
        return torch.randn(batch, 16, frames, H, W, generator=gen)

    def text(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.ones(batch, TEXT, dtype=torch.long)
        mask[0, 5:] = 0
        return torch.randn(batch, 1, TEXT, config["caption_channels"], generator=gen), mask

    def masks(classes: int) -> torch.Tensor:
        m = torch.zeros(classes, 2 * H * 8, 2 * W * 8)  # pixel-sized masks, nearest-resized by the DiT
        m[0, :, : W * 8] = 1
        m[1, :, W * 8:] = 1
        m[2] = 1 - m[0] - m[1]
        m[2, : H * 4] = 1
        for extra in range(3, classes):
            m[extra, extra * 8:(extra + 4) * 8, 16:64] = 1
        return m

    cases: dict[str, dict] = {}
    y, ym = text(2)
    cases["at2v"] = dict(hidden_states=latents(2, 3), timestep=torch.tensor([700.0, 300.0]), text=y, mask=ym,
                         audio_embs=audio(2, 3))
    y, ym = text(1)
    cond_t = torch.tensor([[0.0, 450.0, 450.0]])
    cases["ai2v"] = dict(hidden_states=latents(1, 3), timestep=cond_t, text=y, mask=ym, audio_embs=audio(1, 3),
                         num_cond_latents=1)
    cases["multi2"] = dict(hidden_states=latents(1, 3), timestep=cond_t, text=y, mask=ym, audio_embs=audio(2, 3),
                           num_cond_latents=1, ref_target_masks=masks(3))
    cases["multi3"] = dict(hidden_states=latents(1, 3), timestep=cond_t, text=y, mask=ym, audio_embs=audio(3, 3),
                           num_cond_latents=1, ref_target_masks=masks(4))
    vc_t = torch.tensor([[0.0, 0.0, 0.0, 600.0, 600.0, 600.0, 600.0]])
    continuation = dict(num_ref_latents=1, ref_img_index=REF_INDEX, mask_frame_range=MASK_RANGE)
    cases["vc"] = dict(hidden_states=latents(1, 7), timestep=vc_t, text=y, mask=ym, audio_embs=audio(1, 6),
                       num_cond_latents=3, **continuation)
    cases["vc-kv"] = dict(hidden_states=latents(1, 7), timestep=torch.tensor([600.0]), text=y, mask=ym,
                          audio_embs=audio(1, 6), num_cond_latents=3, kv_cache=True, **continuation)
    cases["multi-vc-kv"] = dict(hidden_states=latents(1, 7), timestep=torch.tensor([600.0]), text=y, mask=ym,
                                audio_embs=audio(2, 6), num_cond_latents=3, kv_cache=True,
                                ref_target_masks=masks(3), **continuation)
    return cases


def run_upstream_case(model, case: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    extra = {k: case[k] for k in ("num_ref_latents", "ref_img_index", "mask_frame_range", "ref_target_masks")
             if k in case}
    nc = case.get("num_cond_latents", 0)
    text, mask, audio = case["text"].to(dtype), case["mask"], case["audio_embs"].to(dtype)
    if not case.get("kv_cache"):
        return model(case["hidden_states"].to(dtype), case["timestep"], text, mask, num_cond_latents=nc,
                     audio_embs=audio, **extra)
    cond, noise = case["hidden_states"][:, :, :nc].to(dtype), case["hidden_states"][:, :, nc:].to(dtype)
    _, cache = model(cond, torch.zeros(cond.shape[0]), text, mask, num_cond_latents=nc, return_kv=True,
                     skip_crs_attn=True, audio_embs=audio, num_ref_latents=extra["num_ref_latents"],
                     ref_img_index=extra["ref_img_index"])
    return model(noise, case["timestep"], text, mask, num_cond_latents=nc, kv_cache_dict=cache,
                 audio_embs=audio, **extra)


def upstream_main(work: Path, src: Path) -> None:
    up = install_upstream(src)
    gen = torch.Generator().manual_seed(20260101)
    results: dict = {}
    with torch.no_grad():
        for name, config in VARIANTS.items():
            model = build_variant(up, name, config, work, gen)
            cases = case_inputs(config, gen)
            for case_name, case in cases.items():
                results[f"{name}/{case_name}"] = dict(variant=name, kind="dit", dtype="float32", inputs=case,
                                                      output=run_upstream_case(model, case))
            if name == INT8_VARIANT:
                lora = work / name / "lora.safetensors"
                make_lora(model, lora, gen)
                for case_name in ("at2v", "multi2"):
                    results[f"{name}/lora/{case_name}"] = dict(
                        variant=name, kind="dit", dtype="float32", lora=True, inputs=cases[case_name],
                        output=run_with_lora(model, lora, cases[case_name]))
                int8 = make_int8(up, model, name, work)
                for case_name in ("at2v", "multi2"):
                    results[f"{name}/int8-bf16/{case_name}"] = dict(
                        variant=name, kind="int8", dtype="bfloat16", inputs=cases[case_name],
                        output=run_upstream_case(int8, cases[case_name], torch.bfloat16).float())
                int8.float()  # the same INT8 buffers, non-quantised tensors and biases as exact fp32 values
                for case_name in ("at2v", "multi2"):
                    results[f"{name}/int8-fp32/{case_name}"] = dict(
                        variant=name, kind="int8", dtype="float32", inputs=cases[case_name],
                        output=run_upstream_case(int8, cases[case_name]))
                results[f"{name}/int8-fp32/lora/at2v"] = dict(
                    variant=name, kind="int8", dtype="float32", lora=True, inputs=cases["at2v"],
                    output=run_with_lora(int8, lora, cases["at2v"]))
    torch.save(results, work / "cases.pt")


# ==== our side (project venv) ===================================================================================

def replay(model, case: dict, dtype: torch.dtype) -> torch.Tensor:
    extra = {k: case[k] for k in ("num_ref_latents", "ref_img_index", "mask_frame_range", "ref_target_masks")
             if k in case}
    nc = case.get("num_cond_latents", 0)
    if not case.get("kv_cache"):
        return model(case["hidden_states"], case["timestep"], case["text"], case["mask"], num_cond_latents=nc,
                     audio_embs=case["audio_embs"], **extra)
    cond, noise = case["hidden_states"][:, :, :nc], case["hidden_states"][:, :, nc:]
    cache = model.build_kv_cache(cond, extra["num_ref_latents"], extra["ref_img_index"])
    return model(noise, case["timestep"], case["text"], case["mask"], audio_embs=case["audio_embs"],
                 kv_cache=cache, **extra)


def compare(work: Path, tol: float, bf16_tol: float) -> bool:
    from longcat_reference.avatar import load_avatar_dit, load_avatar_int8
    from longcat_reference.lora_layers import clear_loras, enable_runtime_loras, read_upstream_lora
    from longcat_reference.metrics import compare_outputs

    results = torch.load(work / "cases.pt", weights_only=True)
    for name in [n for n in results if n.split("/", 1)[0] == INT8_VARIANT and n.count("/") == 1]:
        # our bf16 model (the published dtype, GPU semantics) against upstream's fp32 output: a bound, not parity
        results[name.replace("/", "/ours-bf16/")] = dict(results[name], dtype="bfloat16")
    models: dict = {}
    passed = True
    with torch.no_grad():
        for name, result in results.items():
            dtype = getattr(torch, result["dtype"])
            key = (result["variant"], result["kind"], result["dtype"])
            if key not in models:
                folder = work / result["variant"] / ("dit" if result["kind"] == "dit" else "int8")
                loader = load_avatar_dit if result["kind"] == "dit" else load_avatar_int8
                models[key] = loader(folder, dtype)
            model = models[key]
            if result.get("lora"):
                lora = work / result["variant"] / "lora.safetensors"
                enable_runtime_loras(model, [read_upstream_lora(lora)], 1.0, lora)
            output = replay(model, result["inputs"], dtype)
            clear_loras(model)
            metrics = compare_outputs(output, result["output"])
            limit = tol if dtype == torch.float32 else bf16_tol
            ok = metrics["rel_l2"] is not None and metrics["rel_l2"] <= limit
            passed &= ok
            print(f"{name:28s} {result['dtype']:8s} rel_l2={metrics['rel_l2']:.3e} max_abs={metrics['max_abs']:.3e} "
                  f"cosine={metrics['cosine']:.9f} |ref|={float(result['output'].abs().mean()):.3f} "
                  f"{'ok' if ok else 'FAIL'}")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the tiny trees and cases (default: a temporary one)")
    parser.add_argument("--tol", type=float, default=1e-5, help="relative L2 tolerance, fp32 cases")
    parser.add_argument("--bf16-tol", type=float, default=2e-2, help="relative L2 tolerance, bf16 cases")
    parser.add_argument("--upstream-python", type=Path, default=HOME / "venv" / "bin" / "python")
    parser.add_argument("--upstream-src", type=Path, default=HOME / "longcat")
    parser.add_argument("--upstream", type=Path, help=argparse.SUPPRESS)  # internal: the upstream-side run
    args = parser.parse_args(argv)
    if args.upstream is not None:
        upstream_main(args.upstream, args.upstream_src)
        return 0
    if not (args.upstream_src / "longcat_video" / "modules" / "avatar").is_dir():
        print(f"error: {args.upstream_src}: not a LongCat-Video checkout with the avatar modules", file=sys.stderr)
        return 2
    if not args.upstream_python.is_file():
        print(f"error: {args.upstream_python}: no upstream venv python (see ../shared/oracle/README.md)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="avatar-oracle-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        command = [str(args.upstream_python), __file__, "--upstream", str(work), "--upstream-src",
                   str(args.upstream_src)]
        if subprocess.run(command, check=False).returncode != 0:
            print("error: the upstream side failed (output above)", file=sys.stderr)
            return 2
        passed = compare(work, args.tol, args.bf16_tol)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
