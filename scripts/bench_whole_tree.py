"""Benchmark converting a whole tree at real shapes (DiT + UMT5-XXL-shaped text encoder + the real Wan VAE) against
`cp -r` + sync of the same tree (issue 15's figures).

usage: python scripts/bench_whole_tree.py [--depth 24] [--dtype bfloat16] [--workdir DIR] [--repeat 1] [--keep]
                                         [--reuse DIR] [--methods ours,cp,ours-hard]

The tree: `longcat-convert tiny --full-size` (the DiT at the published width with --depth blocks, rank-128 LoRAs),
whose tiny text encoder and VAE are replaced by
  text_encoder/  UMT5-XXL encoder shapes (d_model 4096, d_ff 10240, 24 layers, 64 heads, vocab 256384; 5.68B
                 params), random values written one tensor at a time in 5 GB shards with an index; the key set is
                 what transformers' save_pretrained writes (taken from the tiny encoder, shapes from the real
                 config on the meta device)
  vae/           diffusers AutoencoderKLWan with its default (Wan 2.1) config: base_dim 96, 2 res blocks
all in --dtype (one dtype for the whole tree, as a converted tree must be). Disk needs the tree twice (source and
one output); the depth is the knob (depth 48 in bf16 with the encoder is ~42 GB, twice that with its copy).

Runs, caches dropped before each (root), each followed by `sync` (counted):
  ours       longcat-convert convert SRC OUT --to fastvideo -q            (--link auto: copies on ext4)
  ours-hard  ... --link hardlink                                          (components not copied, still hashed)
  cp         cp -r SRC OUT
Targets: ours <= 1.2 x cp (wall + sync), ours peak RSS <= 512 MB. Everything is deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import CLI, drop_caches, measure, remove  # noqa: E402

from longcat_convert.core import progress  # noqa: E402
from longcat_convert.core.dtypes import torch_dtype  # noqa: E402
from longcat_convert.core.io import read_header  # noqa: E402
from longcat_convert.tiny_tree import FULL_SIZE, TinySpec, tree_bytes, write_sharded  # noqa: E402

UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
            "num_decoder_layers": 24, "num_heads": 64}
UMT5_XXL_PARAMS = 5_680_000_000  # rough, for the disk check
TEXT_ENCODER_SHARD = 5 * 10**9  # transformers' default max_shard_size
DTYPES = ("float32", "bfloat16")
BLOCK = re.compile(r"block\.\d+\.")
WAN_VAE = {"base_dim": 96, "num_res_blocks": 2}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_text_encoder(folder: Path, dtype: str, seed: int) -> int:
    """Replace the tiny encoder in `folder` by one of UMT5-XXL's shapes; returns its parameter count."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    keys = sorted({key for path in folder.glob("*.safetensors") for key in read_header(path).tensors})
    config = UMT5Config.from_pretrained(folder)
    for name, value in UMT5_XXL.items():
        setattr(config, name, value)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in UMT5EncoderModel(config).state_dict().items()}
    patterns = {BLOCK.sub("block.N.", key) for key in keys}  # the tiny encoder has 2 blocks, XXL 24
    keys = sorted(key for key in shapes if BLOCK.sub("block.N.", key) in patterns)
    shutil.rmtree(folder)
    folder.mkdir()
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)

    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key.endswith("layer_norm.weight"):
            return torch.ones(shape)
        fan_in = shape[0] if key.endswith("relative_attention_bias.weight") else shape[-1]
        return torch.randn(shape, generator=generator).mul_(1.0 if "embed" in key or "shared" in key else fan_in**-0.5)

    planned = [(key, shapes[key], torch_dtype(dtype, DTYPES)) for key in keys]
    write_sharded(folder, "model", planned, make, TEXT_ENCODER_SHARD)
    return sum(math.prod(shape) for _, shape, _ in planned)


def write_vae(folder: Path, dtype: str) -> int:
    from diffusers import AutoencoderKLWan

    config = json.loads((folder / "config.json").read_text())
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    model = AutoencoderKLWan(**{**kwargs, **WAN_VAE}).to(torch_dtype(dtype, DTYPES)).eval()
    shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def build(root: Path, depth: int, dtype: str) -> dict:
    started = time.perf_counter()
    run = measure([CLI, "tiny", str(root), "--full-size", "--depth", str(depth), "--dtype", dtype, "-q"])
    if run.rc:
        raise SystemExit(run.stderr)
    with progress.reporting(False):
        encoder = write_text_encoder(root / "text_encoder", dtype, seed=1)
    vae = write_vae(root / "vae", dtype)
    check = measure([CLI, "validate", str(root), "-q"])
    if check.rc:
        raise SystemExit(f"the synthetic tree does not validate: {check.stderr}")
    return {"build_s": time.perf_counter() - started, "text_encoder_params": encoder, "vae_params": vae, **describe(root)}


def describe(root: Path) -> dict:
    sizes = {sub.name: sum(p.stat().st_size for p in sub.rglob("*") if p.is_file()) for sub in root.iterdir()}
    return {"bytes": sizes, "total_bytes": sum(sizes.values())}


def run(method: str, src: Path, out: Path) -> dict:
    command = {"ours": [CLI, "convert", str(src), str(out), "--to", "fastvideo", "-q"],
               "ours-hard": [CLI, "convert", str(src), str(out), "--to", "fastvideo", "-q", "--link", "hardlink"],
               "cp": ["cp", "-r", str(src), str(out)]}[method]
    cold = drop_caches()
    log(f"{method}: {' '.join(command)}")
    result = measure(command)
    if result.rc:
        raise SystemExit(f"{method} failed: {result.stderr}")
    remove(out)
    return {"method": method, "cold": cold, "wall_s": result.wall, "sync_s": result.sync,
            "durable_s": result.durable, "rss_mb": result.rss_mb, "load": result.load}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", type=Path, help="a work folder kept (--keep) from an earlier run; its raw/ is not rebuilt")
    parser.add_argument("--methods", default="ours,cp,ours-hard", help="comma-separated subset of ours,cp,ours-hard")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - {"ours", "cp", "ours-hard"}:
        raise SystemExit(f"--methods takes ours, cp and ours-hard, not {args.methods!r}")
    element = 2 if args.dtype == "bfloat16" else 4
    spec = TinySpec(depth=args.depth, dtype=args.dtype, full_size=True, **FULL_SIZE)
    need = 2.1 * (tree_bytes(spec) + UMT5_XXL_PARAMS * element)
    free = shutil.disk_usage(args.workdir).free
    if need > free and args.reuse is None:
        raise SystemExit(f"needs ~{need / 1e9:.0f} GB free in {args.workdir}, {free / 1e9:.0f} GB are; lower --depth")
    if args.reuse is not None and not (args.reuse / "raw").is_dir():
        raise SystemExit(f"--reuse {args.reuse}: no raw/ tree there")
    work = args.reuse or Path(tempfile.mkdtemp(prefix="bench-whole-", dir=args.workdir))
    src, out = work / "raw", work / "out"
    results: dict = {"depth": args.depth, "dtype": args.dtype, "runs": []}
    try:
        if args.reuse is None:
            log(f"building the whole tree at real shapes in {src}")
            results["tree"] = build(src, args.depth, args.dtype)
        else:
            results["tree"] = describe(src)
        remove(out)
        log(json.dumps(results["tree"]))
        for round_number in range(args.repeat):
            order = methods if round_number % 2 == 0 else methods[1:2] + methods[:1] + methods[2:]
            for method in order:
                results["runs"].append({**run(method, src, out), "round": round_number})
                log(json.dumps(results["runs"][-1]))
    finally:
        if not args.keep and args.reuse is None:
            shutil.rmtree(work, ignore_errors=True)
    Path("bench_whole_tree.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    def median(method: str, field: str) -> float:
        values = sorted(r[field] for r in results["runs"] if r["method"] == method)
        return values[len(values) // 2]

    tree = results["tree"]
    print(f"| whole tree, depth {results['depth']} {results['dtype']} ({tree['total_bytes'] / 1e9:.1f} GB: "
          + ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in sorted(tree["bytes"].items()) if v > 1e8)
          + ") | wall + sync | peak RSS |\n|---|---|---|")
    for method in [m for m in ("ours", "ours-hard", "cp") if any(r["method"] == m for r in results["runs"])]:
        print(f"| {method} | {median(method, 'durable_s'):.0f} s | {median(method, 'rss_mb'):.0f} MB |")
    if {"ours", "cp"} <= {r["method"] for r in results["runs"]}:
        print(f"| ours / cp | {median('ours', 'durable_s') / median('cp', 'durable_s'):.2f} (target <= 1.2) | |")


if __name__ == "__main__":
    main(sys.argv[1:])
