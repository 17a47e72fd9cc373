"""Benchmark streamed forward parity of a full-size DiT on a small machine (issue 15's figures).

usage: python scripts/bench_streamed_parity.py [--depth 48] [--dtype bfloat16] [--tokens 24] [--corrupt-block 37]
                                               [--max-memory 4GB] [--workdir DIR] [--keep]

1. `longcat-convert tiny RAW --full-size --depth D --dtype T` (published shapes, rank-128 LoRAs), then
   `longcat-convert convert RAW FV --to fastvideo`; free space is checked first (both trees at once).
2. Cold read: caches dropped (root and /proc/sys/vm/drop_caches, else the files' pages are evicted with
   posix_fadvise), every DiT shard and LoRA file of both trees read once: the disk's share of the work.
3. `parity RAW FV --level forward --dtype T --max-memory M --tokens N` cold, as a subprocess: wall time,
   peak RSS (/usr/bin/time -v), PASS, the mode chosen, and the report's own split (reading vs compute).
   Target: PASS, RSS <= 4 GB, wall <= 1.5 x (cold read + compute).
4. Block C of FV gets self_attn.to_k and to_v exchanged in place (bytes swapped inside the shard), and the
   parity runs again: FAIL, first divergence = block C.
Everything made is deleted unless --keep. Prints a Markdown table and writes bench_streamed_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_convert import CLI, drop_caches, measure, sync_seconds  # noqa: E402

from longcat_convert.core.io import read_header  # noqa: E402
from longcat_convert.core.io.reader import tensor_range  # noqa: E402
from longcat_convert.sharding import parse_size  # noqa: E402
from longcat_convert.tiny_tree import FULL_SIZE, SPACE_MARGIN, TinySpec, tree_bytes  # noqa: E402

READ_BYTES = 16 * 2**20
# converted refinement LoRA params (weights.md §1: 1,558,323,200) minus the source's (802,299,904)
REFINEMENT_GROWTH = {"bfloat16": 2 * 756_023_296, "float32": 4 * 756_023_296}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def weight_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.safetensors") if p.parts[-2] in {"dit", "transformer"}
                  or "lora" in p.relative_to(root).parts)


def evict(roots: list[Path]) -> str:
    """Make the next read of `roots` come from the disk."""
    if drop_caches():
        return "drop_caches"
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return "posix_fadvise"


def cold_read_seconds(roots: list[Path]) -> tuple[float, int]:
    files = [path for root in roots for path in weight_files(root)]
    started, total = time.perf_counter(), 0
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(READ_BYTES):
                total += len(chunk)
    return time.perf_counter() - started, total


def swap_k_v(tree: Path, block: int) -> str:
    """Exchange blocks.<block>.self_attn.to_k.* and to_v.* in place (same shapes, same dtype: swap the bytes)."""
    prefix = f"blocks.{block}.self_attn."
    for path in sorted((tree / "transformer").glob("*.safetensors")):
        header = read_header(path)
        if prefix + "to_k.weight" not in header.tensors:
            continue
        with open(path, "r+b") as handle:
            for param in ("weight", "bias"):
                k_range = tensor_range(header, prefix + f"to_k.{param}")
                v_range = tensor_range(header, prefix + f"to_v.{param}")
                handle.seek(k_range.offset)
                k_bytes = handle.read(k_range.length)
                handle.seek(v_range.offset)
                v_bytes = handle.read(v_range.length)
                handle.seek(k_range.offset)
                handle.write(v_bytes)
                handle.seek(v_range.offset)
                handle.write(k_bytes)
            handle.flush()
            os.fsync(handle.fileno())
        return path.name
    raise SystemExit(f"no {prefix}to_k.weight in {tree}/transformer")


def run_parity(raw: Path, converted: Path, args: argparse.Namespace, report: Path) -> dict:
    command = [CLI, "parity", str(raw), str(converted), "--level", "forward", "--dtype", args.dtype,
               "--max-memory", args.max_memory, "--tokens", str(args.tokens), "--report", str(report), "-q"]
    run = measure(command)
    found = json.loads(report.read_text())
    timing = found.get("timing", {})
    return {"wall_s": run.wall, "rss_mb": run.rss_mb, "exit": run.rc, "passed": found["passed"],
            "mode": found["memory"]["mode"], "first_divergence": found.get("first_divergence"),
            "read_s": timing.get("read_seconds"), "compute_s": timing.get("compute_seconds"),
            "cases": {case["name"]: case.get("rel_l2") for case in found["cases"]}}


def build_trees(raw: Path, converted: Path, args: argparse.Namespace, results: dict) -> None:
    log(f"writing the full-size raw tree (depth {args.depth}, {args.dtype}) to {raw}")
    build = measure([CLI, "tiny", str(raw), "--full-size", "--depth", str(args.depth), "--dtype", args.dtype, "-q"])
    assert build.rc == 0, build.stderr
    results["generate"] = {"wall_s": build.wall, "rss_mb": build.rss_mb}
    log(f"converting to fastvideo: {converted}")
    conv = measure([CLI, "convert", str(raw), str(converted), "--to", "fastvideo", "-q"])
    assert conv.rc == 0, conv.stderr
    results["convert"] = {"wall_s": conv.wall, "rss_mb": conv.rss_mb}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=48)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--corrupt-block", type=int, default=37)
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", type=Path, help="a work folder kept from an earlier run (raw/ and fv/ uncorrupted): "
                        "skip writing and converting")
    args = parser.parse_args(argv)
    if not 0 <= args.corrupt_block < args.depth:
        raise SystemExit(f"--corrupt-block must be in 0..{args.depth - 1}")
    parse_size(args.max_memory)
    spec = TinySpec(depth=args.depth, dtype=args.dtype, full_size=True, **FULL_SIZE)
    # raw + converted, and FastVideo's refinement LoRA is larger (block-diagonal B for the fused projections)
    need = 2 * tree_bytes(spec) / SPACE_MARGIN + REFINEMENT_GROWTH[args.dtype] + 10**9
    free = shutil.disk_usage(args.workdir).free
    if need > free and args.reuse is None:
        raise SystemExit(f"needs ~{need / 1e9:.0f} GB free in {args.workdir}, {free / 1e9:.0f} GB are")
    work = args.reuse or Path(tempfile.mkdtemp(prefix="bench-streamed-", dir=args.workdir))
    raw, converted = work / "raw", work / "fv"
    results: dict = {"depth": args.depth, "dtype": args.dtype, "tokens": args.tokens, "max_memory": args.max_memory,
                     "cpus": os.cpu_count(), "load_at_start": os.getloadavg()[0]}
    try:
        if args.reuse is None:
            build_trees(raw, converted, args, results)
        sync_seconds()
        results["evict"] = evict([raw, converted])
        read_s, read_bytes = cold_read_seconds([raw, converted])
        results["cold_read"] = {"seconds": read_s, "bytes": read_bytes}
        log(f"cold read of both trees: {read_bytes / 1e9:.1f} GB in {read_s:.0f} s")
        evict([raw, converted])
        log("streamed parity, cold")
        results["parity"] = run_parity(raw, converted, args, work / "parity.json")
        log(json.dumps(results["parity"]))
        results["corrupted_file"] = swap_k_v(converted, args.corrupt_block)
        evict([raw, converted])
        log(f"streamed parity with block {args.corrupt_block} corrupted")
        results["corrupted"] = run_parity(raw, converted, args, work / "corrupted.json")
        log(json.dumps(results["corrupted"]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, args)
    Path("bench_streamed_parity.json").write_text(json.dumps(results, indent=2) + "\n")


def print_table(results: dict, args: argparse.Namespace) -> None:
    parity, corrupted, read_s = results["parity"], results["corrupted"], results["cold_read"]["seconds"]
    if parity["compute_s"] is None:
        print(f"parity ran in {parity['mode']} mode (the model fits --max-memory): {json.dumps(parity)}")
        return
    bound = read_s + parity["compute_s"]
    print(f"| streamed forward parity, depth {args.depth} {args.dtype}, {args.tokens} tokens, "
          f"--max-memory {args.max_memory} | figure |\n|---|---|")
    print(f"| cold read of both trees ({results['cold_read']['bytes'] / 1e9:.1f} GB) | {read_s:.0f} s |")
    print(f"| parity wall (mode {parity['mode']}) | {parity['wall_s']:.0f} s; its own split: reading "
          f"{parity['read_s']:.0f} s, compute {parity['compute_s']:.0f} s |")
    print(f"| wall / (cold read + compute) | {parity['wall_s'] / bound:.2f} (target <= 1.5) |")
    print(f"| peak RSS | {parity['rss_mb'] / 1024:.2f} GB (target <= 4 GB) |")
    print(f"| verdict | {'PASS' if parity['passed'] else 'FAIL'}, max case rel L2 "
          f"{max(v or 0 for v in parity['cases'].values()):.1e} |")
    print(f"| block {args.corrupt_block} to_k/to_v swapped | {'FAIL' if not corrupted['passed'] else 'PASS (!)'}, "
          f"first divergence: {corrupted['first_divergence']}, {corrupted['wall_s']:.0f} s, "
          f"RSS {corrupted['rss_mb'] / 1024:.2f} GB |")
    if "generate" in results:
        print(f"| generate / convert | {results['generate']['wall_s']:.0f} s / {results['convert']['wall_s']:.0f} s "
              f"(RSS {results['convert']['rss_mb']:.0f} MB) |")


if __name__ == "__main__":
    main(sys.argv[1:])
