"""LoRA adapters from headers (plus their 0-d alpha scalars): modules, ranks, alphas, and defects.

upstream format (raw, diffusers): lora/<name>.safetensors with `lora___lorahyphen___<module>` keys.
fastvideo format: lora/<subfolder>/<name>.safetensors with `<fastvideo module>.lora_A/.lora_B/.lora_alpha`.
The key grammar and its defects are `longcat_convert.core.lora_format`'s; here they become findings, with what FastVideo's
int(lora_alpha)/rank makes of each alpha. Unlike the loaders, every defect is collected: nothing is skipped
silently.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..core import keymap
from ..core.io import SafetensorsHeader
from ..core.io.pickles import is_pickle_name, pickle_message
from ..core.lora_format import (
    LoraModule,
    ParsedLora,
    fastvideo_represents,
    fused_targets,
    parse,
    target_problems,
)
from .context import Context
from .weights import DtypeExpectations, check_dtypes, read_header_or_report

BLOCK_INDEX = re.compile(r"\.\d+\.")


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


def _facts(name: str, rel: str, lora: ParsedLora) -> AdapterFacts:
    tensors = lora.header.tensors.values()
    facts = AdapterFacts(name, rel, lora.format, len(tensors), len(lora.modules),
                         dtypes=dict(Counter(i.dtype for i in tensors).most_common()),
                         bytes=sum(i.nbytes for i in tensors))
    for module in lora.modules.values():
        family = BLOCK_INDEX.sub(".{i}.", module.name, count=1) if module.name.startswith("blocks.") else module.name
        facts.targets[family] = facts.targets.get(family, 0) + 1
        if module.rank is not None:
            facts.ranks[module.rank] = facts.ranks.get(module.rank, 0) + 1
    facts.alphas = sorted(set(lora.alphas.values()))
    return facts


def _upstream_alpha(ctx: Context, rel: str, module: LoraModule, scale: float,
                    linears: dict[str, keymap.LinearModule] | None) -> float:
    """The lora_alpha a FastVideo conversion stores for the module's first target; flags scales FastVideo's
    int(lora_alpha)/rank cannot carry (non-integer, or truncating to 0, which it reads as full strength)."""
    n, rank = module.n_blocks, module.rank
    linear = linears.get(module.name) if linears else None
    try:
        ranks = [p.rank for p in fused_targets(linear.out_features, n, len(linear.fastvideo), rank)] if linear else []
    except ValueError:  # the shape is reported as a defect of its own
        ranks = []
    ranks = ranks or [n * rank]
    if scale < 0:
        ctx.findings.warning("lora", "lora_alpha_value", f"module {module.name}: alpha_scale is {scale}, the adapter "
                             "inverts its effect", rel, module.alpha)
    unrepresented = sorted({r for r in ranks if not fastvideo_represents(scale, r)})
    if unrepresented:
        a_rank = unrepresented[0]
        alpha = scale * a_rank
        zero = " (0 means 'no alpha' to FastVideo: scale 1)" if not int(alpha) else ""
        ctx.findings.warning("lora", "lora_non_integer_alpha", f"module {module.name}: alpha_scale {scale:g} x rank "
                             f"{a_rank} = {alpha:g}; FastVideo applies int(lora_alpha)/rank = {int(alpha)}/{a_rank}{zero}, "
                             f"not {scale:g}, so a FastVideo conversion needs --lora-alpha-fix rescale", rel, module.alpha)
    return scale * ranks[0]


def _fastvideo_alpha(ctx: Context, rel: str, module: LoraModule, alpha: float) -> None:
    """An error when FastVideo's int(lora_alpha) changes the scale the file states."""
    if alpha == int(alpha) and int(alpha):
        return
    rank_text = module.rank if module.rank is not None else "rank"
    effective = (f"{int(alpha)}/{rank_text}" if int(alpha)
                 else "1.0 (int(alpha) is 0, which FastVideo reads as 'no scaling')")
    ctx.findings.error("lora", "lora_non_integer_alpha", f"{module.alpha} is {alpha:g}: FastVideo scales by "
                       f"int(lora_alpha)/rank = {effective} instead of {alpha:g}/{rank_text}", rel, module.alpha)


def _fastvideo_alphas(ctx: Context, rel: str, lora: ParsedLora, expanded: keymap.ExpandedMap | None) -> list[float]:
    """The lora_alpha values FastVideo would apply int() to, each checked."""
    values = set()
    for module in lora.modules.values():
        alpha = lora.alphas.get(module.alpha)
        if alpha is None:
            continue
        if lora.format == "fastvideo":
            _fastvideo_alpha(ctx, rel, module, alpha)
            values.add(alpha)
        elif module.rank is not None:
            values.add(_upstream_alpha(ctx, rel, module, alpha, expanded.linears if expanded else None))
    return sorted(values)


def check_lora_folder(ctx: Context, layout: dict, expanded: keymap.ExpandedMap | None,
                      policy: DtypeExpectations) -> None:
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
        checked = _check_adapter(ctx, path, header, layout, expanded)
        if checked is not None:
            facts, lora = checked
            adapters.append(facts.to_json())
            weights = {k: (path.name, i) for k, i in header.tensors.items() if k not in lora.alpha_keys}
            check_dtypes(ctx, "lora", path.parent, weights, policy, what="tensors of the adapter")
    ctx.components["lora"] = {"path": ctx.rel(folder), "adapters": adapters}


def _check_adapter(ctx: Context, path: Path, header: SafetensorsHeader, layout: dict,
                   expanded: keymap.ExpandedMap | None) -> tuple[AdapterFacts, ParsedLora] | None:
    lora = parse(header)
    rel = ctx.rel(path)
    if lora.format not in (None, layout["lora_format"]):
        consequence = ("FastVideo matches none of its keys and silently loads nothing" if layout["lora_format"] ==
                       "fastvideo" else "the upstream loader cannot read it")
        article = "an" if lora.format == "upstream" else "a"
        ctx.findings.error("lora", "lora_format", f"is {article} {lora.format}-format LoRA where this layout expects "
                           f"the {layout['lora_format']} format: {consequence} (convert it)", rel)
    problems = lora.problems + (target_problems(lora, expanded) if expanded and lora.format else [])
    for problem in problems:
        ctx.findings.add(problem.severity, "lora", problem.kind, problem.message, rel, problem.key)
    if lora.format is None:
        return None
    facts = _facts(path.stem, rel, lora)
    facts.fastvideo_alphas = _fastvideo_alphas(ctx, rel, lora, expanded)
    return facts, lora


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
