"""Benchmark `longcat-convert convert --to fastvideo` against `cp -r` and a naive in-memory converter.

usage: python scripts/bench_convert.py [--depths 2,4,8] [--dtypes float32,bfloat16] [--workdir DIR]
                                       [--cache cold,warm] [--keep] [--skip-baseline] [--skip-sparse]
                                       [--configs 2:float32,4:bfloat16] [--repeat 3] [--deep-max-gb 10]
                                       [--pythonpath DIR]

For every (depth, dtype) it writes a synthetic raw DiT at the published width (hidden 4096, 32 heads,
5 GB shards + index; finite values from a random pattern), then runs, each as a subprocess:

  ours      longcat-convert convert SRC OUT --to fastvideo -q   (fsyncs every shard itself)
  cp        cp -r SRC OUT
  baseline  FastVideo-style: load_file every shard into one dict, rename + torch.chunk, one save_file

and records wall time, the `sync` that follows (so `durable` = wall + sync compares equal durability:
ours fsyncs, cp and the baseline leave dirty pages), and the peak RSS of the process tree
(/usr/bin/time -v, else os.wait4). With root and a writable /proc/sys/vm/drop_caches each run is
measured cold (caches dropped) and warm (source read once beforehand); otherwise every run is warm.
Each (configuration, cache) is measured --repeat times with ours and cp interleaved, their order
alternating from round to round (the disk of a shared machine drifts, and the first run after the
tree is written pays for its writeback); tables give the median, the targets compare medians, and the
spread of ours/cp over the rounds is printed. The baseline runs once per cache mode (it is slow and
needs the model twice in RAM).
It also times `inspect` / `validate` / `validate --deep` (validate only if the CLI has it) on the
source and converted trees, and header-only commands on a depth-48 bf16 tree of sparse files
(real headers, `truncate`d to full size: 6 shards, 1022 keys, 27 GB apparent, ~0 on disk).

One configuration is on disk at a time (source + one output); everything is deleted unless --keep.
Run `python scripts/bench_convert.py _baseline SRC DST` to run only the naive converter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from longcat_convert.core import keymap
from longcat_convert.core.dtypes import dtype_names
from longcat_convert.core.io import TensorEntry, encode_header, index_name, shard_name, write_index
from longcat_convert.sharding import group_into_shards
from longcat_convert.tiny_tree import TinySpec, dit_config

CLI = str(Path(sys.executable).with_name("longcat-convert"))
TIME = "/usr/bin/time"
SHARD_BYTES = 5 * 10**9
POOL_BYTES = 64 * 2**20
WRITE_BYTES = 16 * 2**20
DTYPES = dtype_names("float32", "bfloat16")
# clears the top exponent bit of every fp32 and bf16 element: |x| < 2, never inf or NaN
FINITE_MASK = np.uint32(0xBFFFBFFF)


# --------------------------------------------------------------------------------- synthetic trees


def real_config(depth: int) -> dict:
    """The published DiT config (hidden 4096, 32 heads, caption 4096, adaLN 512) at another depth."""
    spec = TinySpec(depth=depth, hidden=4096, num_heads=32, caption_channels=4096, adaln_tembed_dim=512)
    return dit_config(spec)


def tree_entries(config: dict, dtype: str) -> list[TensorEntry]:
    """Every upstream tensor in the block-major order the published checkpoint uses."""
    return [TensorEntry(r.upstream, dtype, r.shape) for r in keymap.expand(config, "upstream").params]


def shard_layout(entries: list[TensorEntry], max_bytes: int = SHARD_BYTES) -> list[tuple[str, list[TensorEntry]]]:
    by_name = {e.name: e for e in entries}
    groups = group_into_shards([(e.name, e.nbytes) for e in entries], max_bytes)
    prefix = keymap.load_map_document()["shard_prefix"]
    return [(shard_name(prefix, n, len(groups)), [by_name[k] for k in names]) for n, names in enumerate(groups, 1)]


class PatternSource:
    """Random finite values, generated once (64 MiB) and read at a different offset for every tensor."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        words = rng.integers(0, 2**32, size=POOL_BYTES // 4, dtype=np.uint32)
        words &= FINITE_MASK
        self.pool = memoryview(words.tobytes())
        self.rng = rng

    def chunks(self, nbytes: int) -> Iterator[memoryview]:
        position = int(self.rng.integers(0, POOL_BYTES // 4096)) * 4096
        while nbytes:
            size = min(nbytes, WRITE_BYTES, POOL_BYTES - position)
            yield self.pool[position:position + size]
            nbytes -= size
            position = (position + size) % POOL_BYTES


def write_shard(path: Path, entries: list[TensorEntry], source: PatternSource | None) -> int:
    """Header plus data; with no source the data is a hole (`truncate`), i.e. a sparse file."""
    header = encode_header(entries, {"format": "pt"})
    total = len(header) + sum(e.nbytes for e in entries)
    with open(path, "wb") as handle:
        handle.write(header)
        if source is None:
            handle.truncate(total)
            return total
        for entry in entries:
            for chunk in source.chunks(entry.nbytes):
                handle.write(chunk)
    return total


def build_raw_tree(root: Path, depth: int, dtype: str, *, sparse: bool = False, seed: int = 0) -> int:
    """A raw tree holding only dit/ (config, shards, index); returns the tensor bytes."""
    config = real_config(depth)
    entries = tree_entries(config, DTYPES[dtype])
    folder = root / "dit"
    folder.mkdir(parents=True)
    source = None if sparse else PatternSource(seed)
    layout = shard_layout(entries)
    weight_map: dict[str, str] = {}
    for file, shard in layout:
        write_shard(folder / file, shard, source)
        weight_map.update(dict.fromkeys((e.name for e in shard), file))
    total = sum(e.nbytes for e in entries)
    write_index(folder / index_name(keymap.load_map_document()["shard_prefix"]), weight_map, total)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return total


# ------------------------------------------------------------------------------ naive baseline


def baseline_convert(src: Path, dst: Path) -> None:
    """What FastVideo's converter does: everything in one dict, split with torch.chunk, one save_file."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "dit" / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted((src / "dit").glob("*.safetensors")):
        state.update(load_file(shard))
    converted: dict[str, torch.Tensor] = {}
    for rule in keymap.expand(config, "upstream").params:
        value = state[rule.upstream]
        parts = torch.chunk(value, rule.parts, dim=0) if rule.parts > 1 else (value,)
        converted.update(zip(rule.fastvideo, parts, strict=True))
    (dst / "transformer").mkdir(parents=True)
    save_file(converted, str(dst / "transformer" / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    wall: float
    sync: float
    rss_mb: float
    rc: int
    stderr: str = ""
    load: float = math.nan  # 1-minute load average when the run started (other work on the machine)

    @property
    def durable(self) -> float:
        return self.wall + self.sync


def sync_seconds() -> float:
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def warm(root: Path) -> None:
    """Read every file of `root` once so that it sits in the page cache."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as handle:
            while handle.read(WRITE_BYTES):
                pass


def _time_rss_kb(report: str) -> float:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    return float(match.group(1)) if match else math.nan


def measure(command: list[str], env: dict[str, str] | None = None) -> Run:
    """Wall time and peak RSS (KB from /usr/bin/time -v, else os.wait4) of one subprocess tree."""
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        use_time = os.access(TIME, os.X_OK)
        full = [TIME, "-v", "-o", report.name, *command] if use_time else command
        started = time.perf_counter()
        process = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        rss_kb = _time_rss_kb(report.read()) if use_time else float(usage.ru_maxrss)
    return Run(wall, sync_seconds(), rss_kb / 1024, process.returncode, stderr.strip()[-400:], load)


def commands(method: str, src: Path, out: Path) -> list[str]:
    if method == "ours":
        return [CLI, "convert", str(src), str(out), "--to", "fastvideo", "-q"]
    if method == "cp":
        return ["cp", "-r", str(src), str(out)]
    return [sys.executable, os.path.abspath(__file__), "_baseline", str(src), str(out)]


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def cli_has(command: str) -> bool:
    result = subprocess.run([CLI, "--help"], capture_output=True, text=True, check=False)
    return re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE) is not None


# --------------------------------------------------------------------------------- the matrix


@dataclass
class Row:
    depth: int
    dtype: str
    method: str
    cache: str
    nbytes: int
    run: Run
    round: int = 0


@dataclass
class Summary:
    """The runs of one (depth, dtype, method, cache): medians, and the spread of durable time."""

    depth: int
    dtype: str
    method: str
    cache: str
    nbytes: int
    runs: list[Run]

    @property
    def wall(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    @property
    def sync(self) -> float:
        return statistics.median(r.sync for r in self.runs)

    @property
    def durable(self) -> float:
        return statistics.median(r.durable for r in self.runs)

    @property
    def rss_mb(self) -> float:
        return max(r.rss_mb for r in self.runs)

    @property
    def load(self) -> float:
        return max(r.load for r in self.runs)


def summarize(rows: list[Row]) -> list[Summary]:
    groups: dict[tuple[int, str, str, str], Summary] = {}
    for row in rows:
        key = (row.depth, row.dtype, row.method, row.cache)
        if key not in groups:
            groups[key] = Summary(row.depth, row.dtype, row.method, row.cache, row.nbytes, [])
        groups[key].runs.append(row.run)
    return list(groups.values())


def paired_ratios(rows: list[Row], depth: int, dtype: str, cache: str) -> list[float]:
    """ours/cp durable time within each round (the two ran minutes apart at most)."""
    def by_round(method: str) -> dict[int, Run]:
        return {r.round: r.run for r in rows if (r.depth, r.dtype, r.cache, r.method) == (depth, dtype, cache, method)}
    ours, cp = by_round("ours"), by_round("cp")
    return [ours[k].durable / cp[k].durable for k in sorted(ours.keys() & cp.keys())]


@dataclass
class Bench:
    args: argparse.Namespace
    rows: list[Row] = field(default_factory=list)
    tools: list[tuple[str, str, Run]] = field(default_factory=list)  # (tree, command, run)
    notes: list[str] = field(default_factory=list)
    can_drop: bool = False
    has_validate: bool = False

    def env(self) -> dict[str, str] | None:
        """--pythonpath puts another copy of longcat_convert first (e.g. the code before a change)."""
        if not self.args.pythonpath:
            return None
        return {**os.environ, "PYTHONPATH": os.pathsep.join([self.args.pythonpath, os.environ.get("PYTHONPATH", "")])}

    def modes(self) -> list[str]:
        wanted = self.args.cache.split(",")
        return [m for m in wanted if m == "warm" or self.can_drop]

    def methods(self) -> list[str]:
        return ["ours", "cp"] + ([] if self.args.skip_baseline else ["baseline"])

    def run_config(self, depth: int, dtype: str) -> None:
        work = Path(self.args.workdir)
        src, out = work / f"raw-d{depth}-{dtype}", work / f"out-d{depth}-{dtype}"
        remove(src)
        remove(out)
        started = time.perf_counter()
        nbytes = build_raw_tree(src, depth, dtype, seed=depth)
        built = time.perf_counter() - started
        flushed = sync_seconds()
        log(f"depth {depth} {dtype}: built {nbytes / 1e9:.2f} GB in {built:.1f} s (+ sync {flushed:.1f} s)")
        baseline = "baseline" in self.methods() and self.baseline_fits(nbytes)
        try:
            for mode in self.modes():
                for round_ in range(self.args.repeat):
                    order = ["ours", "cp"] if round_ % 2 == 0 else ["cp", "ours"]
                    for method in order + (["baseline"] if baseline and round_ == 0 else []):
                        self.run_one(depth, dtype, method, mode, nbytes, src, out, round_)
                        if method == "ours" and mode == self.modes()[-1] and round_ == self.args.repeat - 1:
                            self.run_tools(f"d{depth} {dtype}", src, out, deep=nbytes <= self.args.deep_max_gb * 1e9)
                        remove(out)
        finally:
            if not self.args.keep:
                remove(src)
                remove(out)

    def baseline_fits(self, nbytes: int) -> bool:
        available = mem_available()
        if 2.2 * nbytes < available:
            return True
        self.notes.append(f"baseline skipped at {nbytes / 1e9:.1f} GB: it needs ~2x the model in RAM")
        return False

    def run_one(self, depth: int, dtype: str, method: str, mode: str, nbytes: int, src: Path, out: Path,
                round_: int) -> None:
        if mode == "cold":
            drop_caches()
        else:
            warm(src)
        run = measure(commands(method, src, out), self.env() if method == "ours" else None)
        if run.rc != 0:
            self.notes.append(f"{method} d{depth} {dtype} {mode} exited {run.rc}: {run.stderr}")
        self.rows.append(Row(depth, dtype, method, mode, nbytes, run, round_))
        log(f"  {method:8s} {mode} #{round_ + 1}: {run.wall:6.1f} s + sync {run.sync:5.1f} s, peak RSS {run.rss_mb:7.0f} MB"
            f"{'' if run.rc == 0 else f'  (exit {run.rc})'}")

    def run_tools(self, label: str, src: Path, out: Path, deep: bool) -> None:
        for tree_name, path in (("raw", src), ("fastvideo", out)):
            if not path.exists():
                continue
            for name, command in self.tool_commands(path, deep):
                self.record_tool(f"{label} {tree_name}", name, command)

    def tool_commands(self, path: Path, deep: bool = True) -> list[tuple[str, list[str]]]:
        result = [("inspect", [CLI, "inspect", str(path)])]
        if self.has_validate:
            result.append(("validate", [CLI, "validate", str(path)]))
            if deep:
                result.append(("validate --deep", [CLI, "validate", "--deep", str(path)]))
        return result

    def record_tool(self, tree: str, name: str, command: list[str]) -> None:
        run = measure(command, self.env())
        self.tools.append((tree, name, run))
        log(f"  {name:16s} {tree:22s} {run.wall:6.2f} s, peak RSS {run.rss_mb:6.0f} MB (exit {run.rc})")

    def run_sparse(self) -> None:
        root = Path(self.args.workdir) / "sparse-d48-bfloat16"
        remove(root)
        nbytes = build_raw_tree(root, 48, "bfloat16", sparse=True)
        files = sorted((root / "dit").glob("*.safetensors"))
        keys = len(json.loads(next((root / "dit").glob("*.index.json")).read_text())["weight_map"])
        used = sum(p.stat().st_blocks * 512 for p in files)
        log(f"depth 48 bfloat16 (sparse): {len(files)} shards, {keys} keys, {nbytes / 1e9:.1f} GB apparent, "
            f"{used / 1e6:.1f} MB on disk")
        try:
            for name, command in self.tool_commands(root, deep=False):
                self.record_tool("d48 bf16 sparse", name, command)
            dry = [CLI, "convert", str(root), str(root.with_name("never-written")), "--to", "fastvideo", "--dry-run"]
            self.record_tool("d48 bf16 sparse", "convert --dry-run", dry)
            for name, seconds in in_process_timings(root, self.has_validate):
                self.tools.append(("d48 bf16 sparse", f"{name} (in-process)", Run(seconds, 0.0, math.nan, 0)))
                log(f"  {name + ' (in-process)':28s} {seconds:6.3f} s")
        finally:
            if not self.args.keep:
                remove(root)


def in_process_timings(root: Path, has_validate: bool) -> list[tuple[str, float]]:
    """The header work without interpreter start-up and imports (torch alone takes ~1.7 s here)."""
    from longcat_convert.core.tree import read_tree
    from longcat_convert.inspect_tree import describe_path

    calls = [("read_tree", lambda: read_tree(root)), ("inspect", lambda: describe_path(root, None))]
    if has_validate:
        from longcat_convert.validation.run import validate_tree

        calls.append(("validate", lambda: validate_tree(root)))
    timings = []
    for name, call in calls:
        samples = []
        for _ in range(3):
            started = time.perf_counter()
            call()
            samples.append(time.perf_counter() - started)
        timings.append((name, statistics.median(samples)))
    return timings


def mem_available() -> int:
    """MemAvailable (free + reclaimable page cache), in bytes."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------- reporting


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def results_table(bench: Bench) -> list[str]:
    summaries = summarize(bench.rows)
    cps = {(g.depth, g.dtype, g.cache): g for g in summaries if g.method == "cp"}
    header = (f"{'depth':>5} {'dtype':9} {'method':9} {'cache':5} {'runs':>4} {'bytes':>9} {'wall s':>7} {'sync s':>7} "
              f"{'durable':>8} {'GB/s':>6} {'x cp':>6} {'x cp+sync':>9} {'spread':>11} {'peak RSS':>10} {'load':>5}")
    lines = [header, "-" * len(header)]
    for g in summaries:
        cp = cps.get((g.depth, g.dtype, g.cache))
        ratio = f"{g.wall / cp.wall:6.2f}" if cp else f"{'-':>6}"
        durable_ratio = f"{g.durable / cp.durable:9.2f}" if cp else f"{'-':>9}"
        pairs = paired_ratios(bench.rows, g.depth, g.dtype, g.cache) if g.method == "ours" else []
        spread = f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else "-"
        lines.append(f"{g.depth:>5} {g.dtype:9} {g.method:9} {g.cache:5} {len(g.runs):>4} {fmt_bytes(g.nbytes):>9} "
                     f"{g.wall:7.1f} {g.sync:7.1f} {g.durable:8.1f} {g.nbytes / 1e9 / g.durable:6.2f} {ratio} "
                     f"{durable_ratio} {spread:>11} {g.rss_mb:7.0f} MB {g.load:5.1f}")
    return lines


def growth_table(bench: Bench) -> list[str]:
    """Per method/dtype/cache: how median wall and peak RSS move as the depth grows."""
    lines = [f"{'method':9} {'dtype':9} {'cache':5} {'depths':>10} {'wall s':>18} {'s/GB':>12} {'peak RSS MB':>22} "
             f"{'RSS MB/block':>12}"]
    groups: dict[tuple[str, str, str], list[Summary]] = {}
    for g in summarize(bench.rows):
        groups.setdefault((g.method, g.dtype, g.cache), []).append(g)
    for (method, dtype, cache), rows in groups.items():
        rows.sort(key=lambda r: r.depth)
        first, last = rows[0], rows[-1]
        per_block = ((last.rss_mb - first.rss_mb) / (last.depth - first.depth)
                     if last.depth != first.depth else math.nan)
        walls = " → ".join(f"{r.wall:.1f}" for r in rows)
        per_gb = " → ".join(f"{r.wall / (r.nbytes / 1e9):.1f}" for r in rows)
        rss = " → ".join(f"{r.rss_mb:.0f}" for r in rows)
        depths = ",".join(str(r.depth) for r in rows)
        lines.append(f"{method:9} {dtype:9} {cache:5} {depths:>10} {walls:>18} {per_gb:>12} {rss:>22} {per_block:12.1f}")
    return lines


def tools_table(bench: Bench) -> list[str]:
    lines = [f"{'tree':24} {'command':28} {'wall s':>7} {'peak RSS':>10} {'exit':>4}"]
    for tree, name, run in bench.tools:
        rss = f"{run.rss_mb:7.0f} MB" if not math.isnan(run.rss_mb) else f"{'-':>10}"
        lines.append(f"{tree:24} {name:28} {run.wall:7.2f} {rss} {run.rc:>4}")
    return lines


def targets(bench: Bench) -> list[str]:
    summaries = summarize(bench.rows)
    ours = [g for g in summaries if g.method == "ours"]
    base = [g for g in summaries if g.method == "baseline"]
    cps = {(g.depth, g.dtype, g.cache): g for g in summaries if g.method == "cp"}
    lines = []
    if ours:
        peak = max(g.rss_mb for g in ours)
        spread = peak - min(min(r.rss_mb for r in g.runs) for g in ours)
        lines.append(f"ours peak RSS <= 512 MB: {'MET' if peak <= 512 else 'MISSED'} (max {peak:.0f} MB)")
        lines.append(f"ours RSS flat in depth: spread {spread:.0f} MB across all runs")
        paired = [(g, cps[(g.depth, g.dtype, g.cache)]) for g in ours if (g.depth, g.dtype, g.cache) in cps]
        if paired:
            ratios = [g.wall / cp.wall for g, cp in paired]
            durable = [g.durable / cp.durable for g, cp in paired]
            lines.append(f"wall <= 1.5x cp -r (process wall, medians): {'MET' if max(ratios) <= 1.5 else 'MISSED'} "
                         f"(ratios {min(ratios):.2f}..{max(ratios):.2f})")
            lines.append(f"wall <= 1.5x cp -r (durable, both + sync, medians): "
                         f"{'MET' if max(durable) <= 1.5 else 'MISSED'} (ratios {min(durable):.2f}..{max(durable):.2f})")
    for kind, runs in (("CLI, incl. start-up", [r for t, n, r in bench.tools if t.startswith("d48") and n == "validate"]),
                       ("in-process", [r for t, n, r in bench.tools if t.startswith("d48") and n == "validate (in-process)"])):
        if runs:
            worst = max(r.wall for r in runs)
            lines.append(f"header-only validate < 1 s at depth 48 ({kind}): {'MET' if worst < 1 else 'MISSED'} ({worst:.2f} s)")
    if base:
        peaks: dict[int, float] = {}
        for g in base:
            peaks[g.nbytes] = max(peaks.get(g.nbytes, 0.0), g.rss_mb)
        lines.append("baseline RSS grows with the model: " + ", ".join(
            f"{fmt_bytes(n)} → {rss:.0f} MB" for n, rss in sorted(peaks.items())))
    return lines


def report(bench: Bench) -> None:
    if any(n.startswith("validate") and r.rc == 1 for _, n, r in bench.tools):
        bench.notes.append("validate exits 1 on these trees only because they hold dit/ alone (text_encoder, tokenizer, "
                           "vae and scheduler are reported missing); the timings are unaffected")
    sections = [("results (medians over runs; bytes = DiT tensor bytes; durable = wall + the sync after it; "
                 "spread = lowest-highest ours/cp durable ratio within a round)", results_table(bench)),
                ("growth with depth", growth_table(bench)),
                ("inspect / validate (subprocess wall includes interpreter start and imports)", tools_table(bench)),
                ("targets", targets(bench))]
    for title, lines in sections:
        print(f"\n== {title}")
        print("\n".join(lines))
    if bench.notes:
        print("\n== notes")
        print("\n".join(f"- {n}" for n in bench.notes))


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="2,4,8", help="comma-separated DiT depths (default 2,4,8)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--configs", help="explicit DEPTH:DTYPE list instead of depths × dtypes, e.g. 2:float32,4:bfloat16")
    parser.add_argument("--workdir", default="/tmp/longcat-bench", help="where trees are written (and deleted)")
    parser.add_argument("--cache", default="cold,warm", help="cold and/or warm (cold needs root)")
    parser.add_argument("--keep", action="store_true", help="keep the trees written")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the naive in-memory converter")
    parser.add_argument("--skip-sparse", action="store_true", help="skip the sparse depth-48 header-only checks")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of ours and cp per configuration and cache mode (default 3; medians reported)")
    parser.add_argument("--deep-max-gb", type=float, default=10.0,
                        help="run `validate --deep` only on trees up to this size (it reads every byte; default 10)")
    parser.add_argument("--pythonpath", help="prepend this to PYTHONPATH for our commands (benchmark other code)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.configs:
        args.dtypes = ",".join(sorted({c.split(":")[1] for c in args.configs.split(",")}))
    unknown = set(args.dtypes.split(",")) - set(DTYPES)
    if unknown:
        parser.error(f"unknown dtypes {sorted(unknown)}")
    return args


def check_disk(args: argparse.Namespace, configs: list[tuple[int, str]]) -> None:
    """The largest configuration needs its source plus one output at a time."""
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    need = max(2 * sum(e.nbytes for e in tree_entries(real_config(d), DTYPES[t])) for d, t in configs)
    free = shutil.disk_usage(args.workdir).free
    log(f"disk: {free / 1e9:.0f} GB free in {args.workdir}, largest configuration needs {need / 1e9:.1f} GB")
    if need > 0.9 * free:
        sys.exit(f"not enough disk space in {args.workdir}: need {need / 1e9:.1f} GB, have {free / 1e9:.1f} GB")


def main(argv: list[str]) -> None:
    if argv[:1] == ["_baseline"]:
        baseline_convert(Path(argv[1]), Path(argv[2]))
        return
    args = parse_args(argv)
    if args.configs:
        configs = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.configs.split(",")]
    else:
        configs = [(int(d), t) for t in args.dtypes.split(",") for d in args.depths.split(",")]
    check_disk(args, configs)
    bench = Bench(args)
    bench.can_drop = "cold" in args.cache and drop_caches()
    bench.has_validate = cli_has("validate")
    if not bench.can_drop:
        bench.notes.append("page cache could not be dropped (or was not asked to be): all runs are warm-cache")
    if not bench.has_validate:
        bench.notes.append("`longcat-convert validate` does not exist yet: validate timings skipped")
    log(f"cache modes: {', '.join(bench.modes())}; validate: {'yes' if bench.has_validate else 'not available'}; "
        f"RSS via {'/usr/bin/time -v' if os.access(TIME, os.X_OK) else 'os.wait4'}")
    started = time.perf_counter()
    for depth, dtype in configs:
        bench.run_config(depth, dtype)
    if not args.skip_sparse:
        bench.run_sparse()
    report(bench)
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
