"""Check a `longcat-convert tiny --variant avatar-v1.0|avatar-v1.5` tree with the UPSTREAM code the avatar demos use.
Not a CI test (it needs upstream's code, in the oracle venv).

* every DiT folder: upstream's LongCatVideoAvatarTransformer3DModel built from config.json (minus the fields
  upstream's int8 loader drops), strict load_state_dict;
* 1.5: `load_quantized_dit` loads base_model_int8/ (strict), and upstream's own `quantize_model` run on the
  base_model weights gives bitwise the int8 weights, scales and biases we wrote; our dequantisation
  (`longcat_convert.core.int8.dequantize_rows`, imported from PROJECT) equals QuantizedLinear's weight in fp32
  and bf16; the dmd LoRA loads with the demo's `load_lora(..., lora_network_dim=128, lora_network_alpha=64)`;
  WhisperModel.from_pretrained + AutoFeatureExtractor; scheduler shift 7;
* 1.0: upstream's Wav2Vec2ModelWrapper(device='cpu') loads chinese-wav2vec2-base/pytorch_model.bin with no
  missing key, and its tensors equal model.safetensors.

* with --converted DIR (a `convert --to diffusers` output): upstream's class loads transformer/ (and
  transformer_multi/) with from_pretrained, tensors equal to the files; AutoModel + AutoFeatureExtractor load
  audio_encoder/.

usage: $V/venv/bin/python scripts/check_tiny_avatar_upstream.py DST [--converted DIR ...] [--oracle-dir DIR]
       (DST as given to `longcat-convert tiny --variant ...`)
"""

from __future__ import annotations

import argparse
import glob
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

PROJECT = Path(__file__).resolve().parents[1]
NON_CTOR = ("_class_name", "_diffusers_version", "architectures", "model_max_length")


def stub_missing(*names: str) -> None:
    """Upstream's audio helpers import librosa/pyloudnorm at module level; the loaders checked here use neither."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)  # probed by transformers/diffusers
            sys.modules[name] = stub


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(glob.glob(str(folder / "*.safetensors"))):
        state.update(load_file(path))
    return state


def build(model_class, folder: Path):
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in NON_CTOR}
    config["cp_split_hw"] = [1, 1]
    return model_class(**config).eval()


def check_dits(tree: Path, model_class) -> bool:
    ok = True
    for folder in ("avatar_single", "avatar_multi", "base_model"):
        if not (tree / folder).is_dir():
            continue
        model = build(model_class, tree / folder)
        state = load_folder(tree / folder)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        print(f"{folder}: strict load of {len(state)} tensors OK")
        ok &= len(state) == len(model.state_dict())
    return ok


def check_int8(tree: Path, model_class) -> bool:
    from longcat_video.modules import quantization

    sys.path.insert(0, str(PROJECT))
    from longcat_convert.core.int8 import dequantize_rows

    loaded = quantization.load_quantized_dit(str(tree), subfolder="base_model_int8", cp_split_hw=[1, 1])
    stored = load_folder(tree / "base_model_int8")
    print(f"base_model_int8: load_quantized_dit strict load of {len(stored)} tensors OK")
    model = build(model_class, tree / "base_model")
    model.load_state_dict(load_folder(tree / "base_model"), strict=True)
    theirs = quantization.quantize_model(model).state_dict()
    ok = True
    quantized = {key.removesuffix(".weight_int8") for key in stored if key.endswith(".weight_int8")}
    compared = [key for key in stored if key.endswith((".weight_int8", ".weight_scale"))
                or (key.endswith(".bias") and key.removesuffix(".bias") in quantized)]
    for key in compared:
        same = theirs[key].dtype == stored[key].dtype and torch.equal(theirs[key], stored[key])
        if not same:
            print(f"  differs from upstream's quantize_model: {key}")
        ok &= same
    print(f"{len(compared)} int8 weights, scales, biases vs upstream quantize_model: "
          f"{'bitwise equal' if ok else 'DIFFER'}")
    for module in loaded.modules():
        if isinstance(module, quantization.QuantizedLinear):
            bias, module.bias = module.bias, None
            for dtype in (torch.float32, torch.bfloat16):
                upstream_weight = module(torch.eye(module.in_features, dtype=dtype)).T
                ok &= torch.equal(upstream_weight, dequantize_rows(module.weight_int8, module.weight_scale, dtype))
            module.bias = bias
    print(f"dequantisation vs QuantizedLinear's weight (fp32, bf16): {'bitwise equal' if ok else 'DIFFER'}")
    return ok


def check_v15_components(tree: Path, model_class) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoFeatureExtractor, WhisperModel

    model = build(model_class, tree / "base_model")
    model.load_state_dict(load_folder(tree / "base_model"), strict=True)
    model.load_lora(str(tree / "lora" / "dmd_lora.safetensors"), "dmd", multiplier=1.0, lora_network_dim=128,
                    lora_network_alpha=64)
    model.enable_loras(["dmd"])
    print("dmd LoRA: upstream load_lora(dim 128, alpha 64) + enable_loras OK")
    whisper = WhisperModel.from_pretrained(str(tree / "whisper-large-v3")).eval()
    extractor = AutoFeatureExtractor.from_pretrained(str(tree / "whisper-large-v3"))
    features = extractor(torch.zeros(16000).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    states = whisper.encoder(features, output_hidden_states=True).hidden_states
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tree), subfolder="scheduler")
    config = json.loads((tree / "base_model" / "config.json").read_text())
    print(f"whisper: {len(states)} hidden states of width {states[-1].shape[-1]}; scheduler shift "
          f"{scheduler.config.shift}")
    return len(states) == 33 and states[-1].shape[-1] == config["audio_channel"] and scheduler.config.shift == 7.0


def check_wav2vec2(tree: Path) -> bool:
    from longcat_video.audio_process.wav2vec2 import Wav2Vec2ModelWrapper

    folder = tree / "chinese-wav2vec2-base"
    try:
        model = Wav2Vec2ModelWrapper(str(folder), device="cpu").model
    except AttributeError as exc:  # the wrapper calls a transformers 4.x private API
        print(f"wav2vec2: upstream's wrapper does not run with this transformers ({exc}); doing its load by hand")
        model = wrapper_load_by_hand(folder)
    theirs = model.state_dict()
    ours = load_file(str(folder / "model.safetensors"))
    meta = [k for k, v in theirs.items() if v.is_meta]
    same = set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    print(f"wav2vec2: {len(theirs)} tensors loaded, {len(meta)} left on meta, "
          f"equal to model.safetensors: {same}")
    config = json.loads((tree / "avatar_single" / "config.json").read_text())
    return not meta and same and model.config.num_hidden_layers == config["audio_block"]


def wrapper_load_by_hand(folder: Path):
    """What Wav2Vec2ModelWrapper does: config.json, torch.load of pytorch_model.bin (our own file, written by
    `longcat-convert tiny`), strip 'wav2vec2.', load_state_dict(strict=False) into a meta-built Wav2Vec2Model."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config.from_pretrained(str(folder), local_files_only=True)
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {k.replace("wav2vec2.", ""): v for k, v in state.items()}
    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    print(f"  missing {len(missing)}, unexpected {len(unexpected)}")
    return model.eval()


def check_converted(tree: Path, model_class) -> bool:
    """A `convert --to diffusers` output of an avatar tree, loaded the diffusers way: from_pretrained per
    component subfolder; every DiT tensor equal to the file's."""
    from transformers import AutoFeatureExtractor, AutoModel

    ok = True
    for folder in ("transformer", "transformer_multi"):
        if not (tree / folder).is_dir():
            continue
        model = model_class.from_pretrained(str(tree), subfolder=folder, cp_split_hw=[1, 1])
        state, stored = model.state_dict(), load_folder(tree / folder)
        same = set(state) == set(stored) and all(torch.equal(state[k], stored[k].to(state[k].dtype)) for k in stored)
        print(f"{folder}: from_pretrained, {len(state)} tensors equal to the files: {same}")
        ok &= same
    encoder = AutoModel.from_pretrained(str(tree), subfolder="audio_encoder")
    extractor = AutoFeatureExtractor.from_pretrained(str(tree), subfolder="audio_encoder")
    print(f"audio_encoder: {type(encoder).__name__} + {type(extractor).__name__}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--converted", type=Path, action="append", default=[],
                        help="also a `convert --to diffusers` output of one of the avatar trees (repeatable)")
    parser.add_argument("--oracle-dir", type=Path, default=PROJECT.parents[1] / "shared" / "oracle")
    args = parser.parse_args()
    sys.path.insert(0, str(args.oracle_dir))
    # Before the stubs: transformers and diffusers probe optional packages when they import their models.
    import diffusers  # noqa: F401
    import transformers.models.wav2vec2.modeling_wav2vec2  # noqa: F401
    import upstream_env  # noqa: F401
    from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperModel  # noqa: F401

    stub_missing("librosa", "pyloudnorm", "imageio", "torchvision", "scipy", "scipy.signal")
    from longcat_video.modules.avatar.longcat_video_dit_avatar import LongCatVideoAvatarTransformer3DModel

    ok = True
    if (args.dst / "LongCat-Video-Avatar-1.5").is_dir():
        tree = args.dst / "LongCat-Video-Avatar-1.5"
        ok &= check_dits(tree, LongCatVideoAvatarTransformer3DModel)
        ok &= check_int8(tree, LongCatVideoAvatarTransformer3DModel)
        ok &= check_v15_components(tree, LongCatVideoAvatarTransformer3DModel)
    if (args.dst / "LongCat-Video-Avatar").is_dir():
        tree = args.dst / "LongCat-Video-Avatar"
        ok &= check_dits(tree, LongCatVideoAvatarTransformer3DModel)
        ok &= check_wav2vec2(tree)
    for converted in args.converted:
        ok &= check_converted(converted, LongCatVideoAvatarTransformer3DModel)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
