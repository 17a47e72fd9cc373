"""Replay the upstream oracle cases through the reference runner's upstream-layout model.

usage: python scripts/check_reference_upstream.py ORACLE_PT RAW_TREE [--tol 1e-5]

ORACLE_PT and RAW_TREE come from ../shared/oracle/make_upstream_tiny.py, which runs the real
upstream LongCat-Video DiT. Every case (plain CFG batch with padded text, conditioned, KV cache, each
LoRA) must reach relative L2 error <= tol in fp32; the KV cache itself is compared too.
Prints one line per case and PASS or FAIL; exits 0 on PASS, 1 on FAIL, 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from longcat_reference.dit import KVCache, LongcatDiT
from longcat_reference.loading import Tree, apply_loras, load_dit, open_tree, read_lora
from longcat_reference.lora_layers import clear_loras
from longcat_reference.metrics import compare_outputs

from longcat_convert.core.errors import LongcatError


def replay(dit: LongcatDiT, tree: Tree, name: str, case: dict) -> tuple[torch.Tensor, list[str]]:
    """Our output for one oracle case, plus notes on anything else compared along the way."""
    inputs, notes = case["inputs"], []
    clear_loras(dit)
    if name == "kvcache":
        cache = dit.build_kv_cache(inputs["cond_latents"])
        notes.append(cache_note(cache, case["kv_cache"]))
        output = dit(inputs["noise_latents"], inputs["timestep"], inputs["encoder_hidden_states"],
                     inputs["encoder_attention_mask"], kv_cache=cache)
        return output, notes
    if name.startswith("lora:"):
        apply_loras(dit, [read_lora(tree, name.split(":", 1)[1])])
    output = dit(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                 inputs["encoder_attention_mask"], num_cond_latents=inputs.get("num_cond_latents", 0))
    clear_loras(dit)
    return output, notes


def cache_note(cache: KVCache, upstream: dict) -> str:
    worst = 0.0
    for index, (keys, values) in upstream.items():
        layer = cache.layers[index]
        worst = max(worst, float((layer.keys - keys).abs().max()), float((layer.values - values).abs().max()))
    return f"kv cache max abs diff {worst:.3e} over {len(upstream)} blocks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("oracle", help="oracle .pt written by make_upstream_tiny.py")
    parser.add_argument("raw_tree", help="raw tree written by make_upstream_tiny.py")
    parser.add_argument("--tol", type=float, default=1e-5, help="relative L2 tolerance (fp32)")
    args = parser.parse_args(argv)
    try:
        oracle = torch.load(args.oracle, weights_only=False)
        tree = open_tree(args.raw_tree)
        dit = load_dit(tree, torch.float32)
    except (LongcatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passed = True
    with torch.no_grad():
        for name, case in oracle["cases"].items():
            output, notes = replay(dit, tree, name, case)
            metrics = {key: math.nan if value is None else value  # None: not finite
                       for key, value in compare_outputs(output, case["output"]).items()}
            ok = metrics["rel_l2"] <= args.tol
            passed &= ok
            extra = "".join(f"; {note}" for note in notes)
            print(f"{name}: rel_l2={metrics['rel_l2']:.3e} max_abs={metrics['max_abs']:.3e} "
                  f"cosine={metrics['cosine']:.9f} {'ok' if ok else 'FAIL'}{extra}")
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
