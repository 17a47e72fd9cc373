"""LoRA adapters from headers (plus their 0-d alpha scalars): modules, ranks, alphas, and defects.

upstream format (raw, diffusers): lora/<name>.safetensors with `lora___lorahyphen___<module>` keys.
fastvideo format: lora/<subfolder>/<name>.safetensors with `<fastvideo module>.lora_A/.lora_B/.lora_alpha`.
Unlike the loaders, every defect is collected: nothing is skipped silently.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import keymap
from ..io import SafetensorsHeader, TensorInfo
from ..io.pickles import is_pickle_name, pickle_message
from ..lora import (
    ALPHA_SUFFIXES,
    FASTVIDEO_TAILS,
    PREFIX,
    alpha_problem,
    decode_alpha,
    decode_module,
    encode_module,
    fastvideo_represents,
    fused_targets,
)
from .tree import Context
from .weights import DtypePolicy, check_dtypes, read_header_or_report

UP_BLOCK = re.compile(r"^lora_up\.blocks\.(\d+)\.weight$")
UPSTREAM_TAILS = "lora_down.weight, lora_up.weight, lora_up.blocks.N.weight or alpha_scale"
FASTVIDEO_PREFIX = "diffusion_model."  # FastVideo strips it, and a trailing `.weight`, before matching
BLOCK_INDEX = re.compile(r"\.\d+\.")


@dataclass
class UpstreamParts:
    down: TensorInfo | None = None
    up: TensorInfo | None = None
    blocks: dict[int, TensorInfo] = field(default_factory=dict)
    alpha: TensorInfo | None = None


@dataclass
class FastVideoParts:
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    alpha: TensorInfo | None = None


@dataclass
class AdapterFacts:
    name: str
    file: str
    format: str
    keys: int
    modules: int = 0
    ranks: dict[int, int] = field(default_factory=dict)  # rank -> modules
    alphas: list[float] = field(default_factory=list)  # distinct stored alpha_scale / lora_alpha values
    fastvideo_alphas: list[float] = field(default_factory=list)  # lora_alpha FastVideo applies int() to
    targets: dict[str, int] = field(default_factory=dict)  # module family (blocks.{i}.…) -> modules
    dtypes: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    def to_json(self) -> dict:
        return {"name": self.name, "file": self.file, "format": self.format, "keys": self.keys,
                "modules": self.modules, "ranks": {str(r): n for r, n in sorted(self.ranks.items())},
                "alphas": self.alphas, "fastvideo_alphas": self.fastvideo_alphas, "targets": self.targets,
                "dtypes": self.dtypes, "bytes": self.bytes}


class AdapterChecker:
    """Checks one adapter file; `linears` maps module names in the file's naming to (module, part)."""

    def __init__(self, ctx: Context, path: Path, header: SafetensorsHeader, fmt: str,
                 expanded: keymap.ExpandedMap | None):
        self.ctx, self.path, self.header, self.format = ctx, path, header, fmt
        self.rel = ctx.rel(path)
        self.expanded = expanded
        self.facts = AdapterFacts(path.stem, self.rel, fmt, len(header.tensors),
                                  dtypes=dict(Counter(i.dtype for i in header.tensors.values()).most_common()),
                                  bytes=sum(i.nbytes for i in header.tensors.values()))

    def error(self, kind: str, message: str, key: str | None = None) -> None:
        self.ctx.findings.error("lora", kind, message, self.rel, key)

    def warning(self, kind: str, message: str, key: str | None = None) -> None:
        self.ctx.findings.warning("lora", kind, message, self.rel, key)

    def alpha_value(self, info: TensorInfo) -> float | None:
        upstream = self.format == "upstream"
        problem = alpha_problem(info.dtype, info.shape, None, upstream)
        if problem is not None:
            self.error("lora_shape", f"{info.name} {problem}", info.name)
            return None
        value = decode_alpha(self.header, info.name)
        problem = alpha_problem(info.dtype, info.shape, value, upstream)
        if problem is not None:
            self.error("lora_alpha_value", f"{info.name} {problem}", info.name)
            return None
        return value

    def note_module(self, module: str, rank: int | None) -> None:
        self.facts.modules += 1
        family = BLOCK_INDEX.sub(".{i}.", module, count=1) if module.startswith("blocks.") else module
        self.facts.targets[family] = self.facts.targets.get(family, 0) + 1
        if rank is not None:
            self.facts.ranks[rank] = self.facts.ranks.get(rank, 0) + 1

    def finish(self, alphas: set[float], fastvideo_alphas: set[float]) -> AdapterFacts:
        self.facts.alphas = sorted(alphas)
        self.facts.fastvideo_alphas = sorted(fastvideo_alphas)
        return self.facts


def file_format(header: SafetensorsHeader) -> str | None:
    names = list(header.tensors)
    if names and all(n.startswith(PREFIX) for n in names):
        return "upstream"
    if names and all(_fastvideo_split(n) is not None for n in names):
        return "fastvideo"
    return None


def _fastvideo_split(key: str) -> tuple[str, str] | None:
    """(module, tail) of a FastVideo LoRA key the way FastVideo reads it, or None."""
    if key.startswith(FASTVIDEO_PREFIX):
        key = key[len(FASTVIDEO_PREFIX):]
    if key.endswith(".weight"):
        key = key[: -len(".weight")]
    module, _, tail = key.rpartition(".")
    return (module, tail) if module and tail in FASTVIDEO_TAILS else None


def check_upstream_adapter(checker: AdapterChecker) -> AdapterFacts:
    modules: dict[str, UpstreamParts] = {}
    for key, info in checker.header.tensors.items():
        encoded, _, tail = key.partition(".")
        module = decode_module(encoded)
        block = UP_BLOCK.match(tail)
        if module is None or tail not in ("lora_down.weight", "lora_up.weight", "alpha_scale") and not block:
            checker.error("lora_bad_key", f"key {key} is not <encoded module>.{{{UPSTREAM_TAILS}}} "
                          "(FastVideo's converter drops such keys without a word)", key)
            continue
        parts = modules.setdefault(module, UpstreamParts())
        if block:
            parts.blocks[int(block.group(1))] = info
        else:
            setattr(parts, {"lora_down.weight": "down", "lora_up.weight": "up", "alpha_scale": "alpha"}[tail], info)
    linears = checker.expanded.linears if checker.expanded else None
    alphas, fastvideo_alphas = set(), set()
    ranks: dict[str, int] = {}
    for module, parts in modules.items():
        rank = _check_upstream_module(checker, module, parts, linears)
        checker.note_module(module, rank)
        if rank is not None:
            ranks[module] = rank
        if parts.alpha is not None:
            scale = checker.alpha_value(parts.alpha)
            if scale is not None:
                alphas.add(scale)
                if rank is not None:
                    fastvideo_alphas.add(_check_upstream_alpha(checker, module, parts, scale, rank, linears))
        else:
            checker.error("lora_missing_alpha", f"module {module} has no alpha_scale: the upstream loader refuses "
                          "the file (strict load); FastVideo's converter would silently use scale 1.0",
                          f"{encode_module(module)}.alpha_scale")
    _check_single_rank(checker, ranks)
    return checker.finish(alphas, fastvideo_alphas)


def _check_upstream_module(checker: AdapterChecker, module: str, parts: UpstreamParts,
                           linears: dict[str, keymap.LinearModule] | None) -> int | None:
    """Structure and shapes of one module; its rank when it can be told."""
    key = parts.down.name if parts.down else f"{module} (encoded)"
    linear = None
    if linears is not None:
        linear = linears.get(module)
        if linear is None:
            checker.error("lora_unknown_module", f"targets {module}, which is not a Linear of the DiT "
                          "(the upstream loader skips it and then fails its strict load)", key)
    missing = [n for n, v in (("lora_down.weight", parts.down), ("lora_up", parts.up or parts.blocks)) if not v]
    if missing:
        checker.error("lora_incomplete", f"module {module} has no {' and no '.join(missing)}", key)
        return None
    if parts.up is not None and parts.blocks:
        checker.error("lora_shape", f"module {module} has both lora_up.weight and lora_up.blocks.*", key)
        return None
    if parts.blocks and sorted(parts.blocks) != list(range(len(parts.blocks))):
        checker.error("lora_shape", f"module {module} up blocks are numbered {sorted(parts.blocks)}, not "
                      f"0..{len(parts.blocks) - 1}", key)
        return None
    ups = [parts.up] if parts.up is not None else [parts.blocks[j] for j in sorted(parts.blocks)]
    down = parts.down
    if len(down.shape) != 2 or any(len(u.shape) != 2 for u in ups):
        checker.error("lora_shape", f"module {module}: lora_down {list(down.shape)} and lora_up "
                      f"{[list(u.shape) for u in ups]} must be matrices", key)
        return None
    n, rank, rows = len(ups), ups[0].shape[1], ups[0].shape[0]
    if any(u.shape != ups[0].shape for u in ups):
        checker.error("lora_shape", f"module {module}: up blocks differ in shape {[list(u.shape) for u in ups]}", key)
        return None
    if down.shape[0] != n * rank:
        checker.error("lora_rank_mismatch", f"module {module}: lora_down has {down.shape[0]} rows but {n} up "
                      f"block(s) of rank {rank} need {n * rank}", key)
        return None
    if linear is not None:
        if down.shape[1] != linear.in_features:
            checker.error("lora_shape", f"module {module}: lora_down {list(down.shape)} expects {down.shape[1]} "
                          f"input features, the Linear has {linear.in_features}", key)
        if n * rows != linear.out_features:
            checker.error("lora_shape", f"module {module}: {n} up block(s) of {rows} rows give {n * rows} outputs, "
                          f"the Linear has {linear.out_features}", key)
        parts_out = len(linear.fastvideo)
        if n > 1 and parts_out > 1 and n != parts_out:
            checker.warning("lora_block_split", f"module {module}: {n} up blocks do not line up with its "
                            f"{parts_out} fused parts ({', '.join(t.rsplit('.', 1)[-1] for t in linear.fastvideo)})",
                            key)
    return rank


def _check_upstream_alpha(checker: AdapterChecker, module: str, parts: UpstreamParts, scale: float, rank: int,
                          linears: dict[str, keymap.LinearModule] | None) -> float:
    """The lora_alpha a FastVideo conversion stores for the module's first target; flags scales FastVideo's
    int(lora_alpha)/rank cannot carry (non-integer, or truncating to 0, which it reads as full strength)."""
    n = len(parts.blocks) or 1
    linear = linears.get(module) if linears else None
    try:
        ranks = [p.rank for p in fused_targets(linear.out_features, n, len(linear.fastvideo), rank)] if linear else []
    except ValueError:  # the shape is reported as a defect of its own
        ranks = []
    ranks = ranks or [n * rank]
    if scale < 0:
        checker.warning("lora_alpha_value", f"module {module}: alpha_scale is {scale}, the adapter inverts its "
                        "effect", parts.alpha.name)
    unrepresented = sorted({r for r in ranks if not fastvideo_represents(scale, r)})
    if unrepresented:
        a_rank = unrepresented[0]
        alpha = scale * a_rank
        zero = " (0 means 'no alpha' to FastVideo: scale 1)" if not int(alpha) else ""
        checker.warning("lora_non_integer_alpha", f"module {module}: alpha_scale {scale:g} x rank {a_rank} = "
                        f"{alpha:g}; FastVideo applies int(lora_alpha)/rank = {int(alpha)}/{a_rank}{zero}, not "
                        f"{scale:g}, so a FastVideo conversion needs --lora-alpha-fix rescale", parts.alpha.name)
    return scale * ranks[0]


def _check_single_rank(checker: AdapterChecker, ranks: dict[str, int]) -> None:
    if len(set(ranks.values())) < 2:
        return
    census = Counter(ranks.values())
    common, count = census.most_common(1)[0]
    for module, rank in ranks.items():
        if rank != common:
            checker.error("lora_rank_mismatch", f"module {module} has rank {rank} while {count} of {len(ranks)} "
                          f"modules have rank {common}: upstream's load_lora builds every module with one rank, "
                          "so its strict load fails", module)


def check_fastvideo_adapter(checker: AdapterChecker) -> AdapterFacts:
    modules: dict[str, FastVideoParts] = {}
    for key, info in checker.header.tensors.items():
        split = _fastvideo_split(key)
        if split is None:
            checker.error("lora_bad_key", f"key {key} does not end in lora_A, lora_B or lora_alpha "
                          "(FastVideo ignores it without a message)", key)
            continue
        module, tail = split
        setattr(modules.setdefault(module, FastVideoParts()), {"lora_A": "a", "lora_B": "b", "lora_alpha": "alpha"}[tail],
                info)
    targets = checker.expanded.linear_by_fastvideo() if checker.expanded else None
    alphas: set[float] = set()
    for module, parts in modules.items():
        rank = _check_fastvideo_module(checker, module, parts, targets)
        checker.note_module(module, rank)
        if parts.alpha is None:
            checker.error("lora_missing_alpha", f"module {module} has no lora_alpha: FastVideo then uses scale 1.0",
                          f"{module}.lora_A")
            continue
        alpha = checker.alpha_value(parts.alpha)
        if alpha is None:
            continue
        alphas.add(alpha)
        if alpha != int(alpha) or not int(alpha):
            rank_text = rank if rank is not None else "rank"
            effective = (f"{int(alpha)}/{rank_text}" if int(alpha)
                         else "1.0 (int(alpha) is 0, which FastVideo reads as 'no scaling')")
            checker.error("lora_non_integer_alpha", f"{parts.alpha.name} is {alpha:g}: FastVideo scales by "
                          f"int(lora_alpha)/rank = {effective} instead of {alpha:g}/{rank_text}", parts.alpha.name)
    return checker.finish(alphas, alphas)


def _check_fastvideo_module(checker: AdapterChecker, module: str, parts: FastVideoParts,
                            targets: dict[str, tuple[keymap.LinearModule, int]] | None) -> int | None:
    key = (parts.a or parts.b or parts.alpha).name
    target = None
    if targets is not None:
        target = targets.get(module)
        if target is None:
            checker.error("lora_unknown_module", f"targets {module}, which is not a Linear of FastVideo's DiT "
                          "(FastVideo ignores such keys without a message)", key)
    missing = [n for n, v in (("lora_A", parts.a), ("lora_B", parts.b)) if v is None]
    if missing:
        checker.error("lora_incomplete", f"module {module} has no {' and no '.join(missing)} (FastVideo disables "
                      "LoRA on that layer)", key)
        return None
    a, b = parts.a.shape, parts.b.shape
    if len(a) != 2 or len(b) != 2:
        checker.error("lora_shape", f"module {module}: lora_A {list(a)} and lora_B {list(b)} must be matrices", key)
        return None
    if a[0] != b[1]:
        checker.error("lora_rank_mismatch", f"module {module}: lora_A {list(a)} has rank {a[0]} but lora_B "
                      f"{list(b)} has rank {b[1]}", key)
        return None
    if target is not None:
        linear, _ = target
        out = linear.out_features // len(linear.fastvideo)
        if a[1] != linear.in_features or b[0] != out:
            checker.error("lora_shape", f"module {module}: lora_B·lora_A is {b[0]}x{a[1]}, the layer is "
                          f"{out}x{linear.in_features}", key)
    return a[0]


def check_lora_folder(ctx: Context, layout: dict, expanded: keymap.ExpandedMap | None,
                      policy: DtypePolicy) -> None:
    folder = ctx.root / layout["lora_dir"]
    if not folder.is_dir():
        ctx.findings.info("lora", "missing_component", f"{layout['lora_dir']}/ does not exist: no LoRA adapter "
                          "to check")
        return
    adapters = []
    for path in _adapter_files(ctx, folder, layout):
        header = read_header_or_report(ctx, "lora", path)
        if header is None:
            continue
        ctx.headers[ctx.rel(path)] = header
        facts = _check_adapter(ctx, path, header, layout, expanded)
        if facts is not None:
            adapters.append(facts.to_json())
            weights = {k: (path.name, i) for k, i in header.tensors.items() if not k.endswith(ALPHA_SUFFIXES)}
            check_dtypes(ctx, "lora", path.parent, weights, policy, what="tensors of the adapter")
    ctx.components["lora"] = {"path": ctx.rel(folder), "adapters": adapters}


def _check_adapter(ctx: Context, path: Path, header: SafetensorsHeader, layout: dict,
                   expanded: keymap.ExpandedMap | None) -> AdapterFacts | None:
    fmt = file_format(header)
    rel = ctx.rel(path)
    if fmt is None:
        ctx.findings.error("lora", "lora_bad_key", "is neither an upstream LongCat LoRA (lora___lorahyphen___… "
                           "keys) nor a FastVideo LoRA (…lora_A / lora_B / lora_alpha keys)", rel)
        return None
    if fmt != layout["lora_format"]:
        consequence = ("FastVideo matches none of its keys and silently loads nothing" if layout["lora_format"] ==
                       "fastvideo" else "the upstream loader cannot read it")
        article = "an" if fmt == "upstream" else "a"
        ctx.findings.error("lora", "lora_format", f"is {article} {fmt}-format LoRA where this layout expects the "
                           f"{layout['lora_format']} format: {consequence} (convert it)", rel)
    checker = AdapterChecker(ctx, path, header, fmt, expanded)
    return check_upstream_adapter(checker) if fmt == "upstream" else check_fastvideo_adapter(checker)


def _adapter_files(ctx: Context, folder: Path, layout: dict) -> list[Path]:
    """Adapter files where the layout's loader looks for them; misplaced ones are reported and still checked."""
    subdirs = layout["lora_subdirs"]
    nested = layout["lora_format"] == "fastvideo"
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            found.extend(_accept(ctx, entry))
            if entry.name.endswith(".safetensors") and nested:
                ctx.findings.warning("lora", "lora_placement", "FastVideo takes an adapter folder "
                                     f"(lora/<name>/); expected lora/{subdirs.get(entry.stem, entry.stem)}/"
                                     f"{entry.name}", ctx.rel(entry))
        elif entry.is_dir():
            files = _files_below(entry)
            adapters = [p for f in files for p in _accept(ctx, f)]
            found.extend(adapters)
            for path in adapters:
                if path.parent != entry:
                    ctx.findings.warning("lora", "lora_placement", f"is nested below {ctx.rel(entry)}/, where no "
                                         "loader looks (convert still converts it, keeping its folders)",
                                         ctx.rel(path))
            if not nested and adapters:
                ctx.findings.warning("lora", "lora_placement", "the upstream loader takes lora/<name>.safetensors, "
                                     "not a subfolder", ctx.rel(entry))
            if nested and len(adapters) > 1:
                ctx.findings.warning("lora", "lora_placement", f"holds {len(adapters)} adapters; FastVideo loads one "
                                     "of them, picked by file name heuristics", ctx.rel(entry))
            for path in adapters if nested else []:
                expected = subdirs.get(path.stem, path.stem)
                if entry.name != expected:
                    ctx.findings.warning("lora", "lora_placement", f"the converter puts {path.name} in "
                                         f"lora/{expected}/", ctx.rel(path))
    return found


def _files_below(folder: Path) -> list[Path]:
    """Every file below `folder`, at any depth (symlink loops were refused before any check ran)."""
    return sorted(Path(d) / name for d, _, names in os.walk(folder, followlinks=True) for name in names
                  if (Path(d) / name).is_file())


def _accept(ctx: Context, path: Path) -> list[Path]:
    if is_pickle_name(path):
        ctx.findings.error("lora", "pickle_file", pickle_message(path), ctx.rel(path))
        return []
    return [path] if path.name.endswith(".safetensors") else []
