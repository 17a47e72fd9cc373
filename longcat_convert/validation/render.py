"""The human summary: one line per component, findings grouped by component and kind, never a wall of keys."""

from __future__ import annotations

import re
from collections import Counter

from ..core.dtypes import friendly
from ..core.lora_format import part_name
from ..core.text_format import human_bytes
from .findings import KINDS

COMPONENT_ORDER = ("tree", "model_index", "dit", "lora", "text_encoder", "tokenizer", "vae", "scheduler", "manifest")
BLOCK_INDEX = re.compile(r"^blocks\.\d+\.")
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def render_summary(report: dict, shown: int = 5) -> str:
    lines = [f"LongCat-Video tree {report['root']}",
             f"layout: {report['layout']['name']} ({report['layout']['reason']})"]
    rows = _component_lines(report["components"])
    width = max([13] + [len(name) + 1 for name, _ in rows])
    lines += ["components:"] + [f"  {name:<{width}}{text}" for name, text in rows]
    if report.get("deep_scan"):
        deep = report["deep_scan"]
        lines.append(f"deep scan: {deep['tensors']} tensors in {deep['files']} files ({human_bytes(deep['bytes'])}), "
                     f"{deep['nan_inf_tensors']} with NaN/Inf, {deep['all_zero_tensors']} all-zero, "
                     f"{deep['hashed_against_manifest']} hashes compared with the manifest")
    lines += _finding_lines(report["findings"], shown)
    counts = report["counts"]
    verdict = "VALID" if report["valid"] else "INVALID"
    lines.append(f"result: {verdict}: {counts['error']} errors, {counts['warning']} warnings "
                 f"({report['elapsed_seconds']:.2f} s)")
    return "\n".join(lines)


def _component_lines(components: dict) -> list[tuple[str, str]]:
    ordered = sorted(components, key=lambda c: COMPONENT_ORDER.index(c) if c in COMPONENT_ORDER else 99)
    return [(name, _describe(name, components[name])) for name in ordered]


def _describe(name: str, facts: dict) -> str:
    if name == "lora":
        adapters = facts.get("adapters", [])
        return "; ".join(_describe_adapter(a) for a in adapters) or "no adapters"
    if name == "tokenizer":
        return ", ".join(facts.get("files", [])) or "no files"
    if name == "model_index":
        return f"{facts.get('class_name')}: {', '.join(facts.get('components', []))}"
    if name == "scheduler":
        config = facts.get("config", {})
        return f"{config.get('class_name')}, shift {config.get('shift')}"
    if "tensors" not in facts:
        return facts.get("config", {}).get("class_name") or "not checked"
    text = (f"{facts['path']}/: {len(facts['files'])} file(s), {facts['tensors']} tensors"
            + (f" ({facts['expected_tensors']} expected)" if "expected_tensors" in facts else "")
            + f", {human_bytes(facts['bytes'])}, {_dtypes(facts['dtypes'])}")
    config = facts.get("config", {})
    if config.get("class_name"):
        text += f", {config['class_name']}"
    return text


def _describe_adapter(adapter: dict) -> str:
    ranks = "/".join(adapter["ranks"]) or "?"
    alphas = "/".join(f"{a:g}" for a in adapter["alphas"]) or "?"
    return (f"{adapter['name']} ({adapter['format']}, {adapter['modules']} modules, rank {ranks}, "
            f"{part_name(adapter['format'], 'alpha')} {alphas}, {_dtypes(adapter['dtypes'])})")


def _dtypes(census: dict) -> str:
    return "/".join(friendly(d) for d in census) or "no dtype"


def _finding_lines(findings: list[dict], shown: int) -> list[str]:
    if not findings:
        return ["findings: none"]
    counts = Counter(f["severity"] for f in findings)
    lines = [f"findings: {counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes"]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for finding in findings:
        groups.setdefault((finding["component"], finding["kind"], finding["severity"]), []).append(finding)

    kinds = list(KINDS)

    def order(group: tuple[str, str, str]) -> tuple:
        component, kind, severity = group
        position = COMPONENT_ORDER.index(component) if component in COMPONENT_ORDER else 99
        return SEVERITY_ORDER[severity], position, kinds.index(kind)

    for group in sorted(groups, key=order):
        component, kind, severity = group
        items = groups[group]
        lines.append(f"  {component}: {KINDS[kind]} ({len(items)} {severity}{'s' if len(items) > 1 else ''})")
        for finding in items[:shown]:
            where = f"{finding['file']}: " if finding.get("file") else ""
            lines.append(f"    {severity:<7} {where}{finding['message']}")
        if len(items) > shown:
            lines.append(f"    ... and {len(items) - shown} more{_patterns(items)}")
    return lines


def _patterns(items: list[dict]) -> str:
    """The commonest key patterns (block indices folded), so 1000 missing keys read as a few lines."""
    keys = [f["key"] for f in items if f.get("key")]
    if not keys:
        return ""
    patterns = Counter(BLOCK_INDEX.sub("blocks.{i}.", key) for key in keys).most_common(3)
    return "; by pattern: " + ", ".join(f"{p} x{n}" for p, n in patterns)
