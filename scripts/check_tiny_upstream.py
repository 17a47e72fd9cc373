"""Check that a `longcat-convert tiny` tree loads with the UPSTREAM classes the demos use: the DiT
strictly (no missing or unexpected key), both LoRAs with the upstream loader, and the other components
with AutoTokenizer / UMT5EncoderModel / AutoencoderKLWan / FlowMatchEulerDiscreteScheduler. Not a CI test.

usage (in the oracle venv): $V/venv/bin/python scripts/check_tiny_upstream.py TINY_TREE [--oracle-dir DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", type=Path)
    parser.add_argument("--oracle-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "oracle")
    args = parser.parse_args()
    sys.path.insert(0, str(args.oracle_dir))
    import upstream_env  # noqa: F401
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    config = json.loads((args.tree / "dit" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["cp_split_hw"] = [1, 1]
    model = LongCatVideoTransformer3DModel(**config).eval()
    state = {}
    for path in glob.glob(str(args.tree / "dit" / "*.safetensors")):
        state.update(load_file(path))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    print(f"DiT: strict load of {len(state)} tensors OK")
    for adapter, rank in (("cfg_step_lora", 8), ("refinement_lora", 4)):
        model.load_lora(str(args.tree / "lora" / f"{adapter}.safetensors"), adapter, lora_network_dim=rank,
                        lora_network_alpha=rank / 2)
        model.enable_loras([adapter])
        model.disable_all_loras()
        print(f"LoRA {adapter}: upstream load_lora + enable OK")
    x = torch.randn(1, 16, 2, 8, 8)
    y = torch.randn(1, 1, 8, config["caption_channels"])
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), y, torch.ones(1, 8, dtype=torch.long))
    print(f"DiT forward: {tuple(out.shape)} finite={bool(torch.isfinite(out).all())}")
    tokenizer = AutoTokenizer.from_pretrained(args.tree, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(args.tree, subfolder="text_encoder")
    vae = AutoencoderKLWan.from_pretrained(args.tree, subfolder="vae")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.tree, subfolder="scheduler")
    ids = tokenizer(["a cat"], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    hidden = encoder(ids.input_ids, ids.attention_mask).last_hidden_state
    print(f"tokenizer+text encoder: {tuple(hidden.shape)}; vae z_dim {vae.config.z_dim}; scheduler shift "
          f"{scheduler.config.shift}")
    ok = hidden.shape[-1] == config["caption_channels"] and vae.config.z_dim == config["in_channels"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
