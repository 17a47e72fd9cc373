"""Load a diffusers-layout tree with the UPSTREAM LongCat-Video class and check it computes exactly what
the raw tree computes (and what the oracle recorded). Not a CI test: it needs the upstream code.

usage (in the oracle venv, see ../shared/oracle/README.md):
    $V/venv/bin/python scripts/check_diffusers_upstream.py RAW_TREE DIFFUSERS_TREE ORACLE_PT [--oracle-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("diffusers", type=Path)
    parser.add_argument("oracle", type=Path)
    parser.add_argument("--oracle-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "oracle",
                        help="folder holding upstream_env.py (default: ../shared/oracle next to the repo)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.oracle_dir))
    import upstream_env  # noqa: F401  (CPU shims for the upstream attention)
    from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel

    from_raw = LongCatVideoTransformer3DModel.from_pretrained(args.raw, subfolder="dit", cp_split_hw=[1, 1]).eval()
    from_diffusers = LongCatVideoTransformer3DModel.from_pretrained(args.diffusers, subfolder="transformer",
                                                                    cp_split_hw=[1, 1]).eval()
    oracle = torch.load(args.oracle)
    ok = True
    with torch.no_grad():
        for name in ("t2v", "cond1"):
            inputs = oracle["cases"][name]["inputs"]
            call = dict(num_cond_latents=inputs.get("num_cond_latents", 0))
            a = from_raw(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                         inputs["encoder_attention_mask"], **call)
            b = from_diffusers(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                               inputs["encoder_attention_mask"], **call)
            ref = oracle["cases"][name]["output"]
            identical = torch.equal(a, b)
            rel = float((b - ref).norm() / ref.norm())
            print(f"{name}: raw vs diffusers identical={identical}  diffusers vs oracle rel_l2={rel:.3e}")
            ok &= identical and rel < 1e-5
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
