"""The import direction between the project's layers, read from the source with ast.

    layer 0  longcat_convert.core        read and describe trees (no torch at import)
    layer 1  longcat_reference           the reference runner (reference/)
    layer 2  longcat_convert.*           the converter, the validator and the tools built on them
    layer 3  longcat_convert.cli         the command line: parses, calls, prints

A module may import its own layer and those below it, never one above (imports inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"longcat_convert": REPO / "longcat_convert", "longcat_reference": REPO / "reference"}
LAYER_NAMES = ("core", "reference runner", "converter and validator", "command line")


def layer(module: str) -> int | None:
    """The layer of a project module; None for anything else (the standard library, torch, …)."""
    top = module.split(".")[0]
    if top == "longcat_reference":
        return 1
    if top != "longcat_convert":
        return None
    if module == "longcat_convert" or module.startswith("longcat_convert.core"):
        return 0  # the package's __init__ defines only __version__
    if module == "longcat_convert.cli" or module.startswith("longcat_convert.cli."):
        return 3
    return 2


def project_modules() -> dict[str, Path]:
    found = {}
    for top, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = [top, *path.relative_to(base).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def upward_imports() -> list[str]:
    modules = project_modules()
    problems = []
    for module, path in sorted(modules.items()):
        own = layer(module)
        for line, target in imported_modules(module, path):
            if target not in modules:
                continue  # an attribute imported from a module, or not ours
            theirs = layer(target)
            if theirs is not None and theirs > own:
                problems.append(f"{path.relative_to(REPO)}:{line}: {module} ({LAYER_NAMES[own]}) imports "
                                f"{target} ({LAYER_NAMES[theirs]})")
    return problems


def test_no_module_imports_a_layer_above_its_own() -> None:
    problems = upward_imports()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module, expected", [
    ("longcat_convert.core.tree", 0), ("longcat_convert.core.io.reader", 0), ("longcat_reference.dit", 1),
    ("longcat_reference.pipeline.t2v", 1), ("longcat_convert.plan", 2), ("longcat_convert.validation.run", 2),
    ("longcat_convert.cli.run_task", 3), ("longcat_convert.cli", 3), ("torch", None)])
def test_layers_are_assigned_by_package(module: str, expected: int | None) -> None:
    assert layer(module) == expected


def test_the_checker_sees_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A core module importing the converter, written into a copy of the package, is reported."""
    copy = tmp_path / "longcat_convert"
    (copy / "core").mkdir(parents=True)
    (copy / "__init__.py").write_text("")
    (copy / "core" / "__init__.py").write_text("")
    (copy / "plan.py").write_text("")
    (copy / "core" / "tree.py").write_text("def f():\n    from ..plan import plan_conversion\n")
    monkeypatch.setitem(PACKAGES, "longcat_convert", copy)
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    monkeypatch.setitem(PACKAGES, "longcat_reference", tmp_path / "absent")
    assert upward_imports() == ["longcat_convert/core/tree.py:2: longcat_convert.core.tree (core) imports "
                                "longcat_convert.plan (converter and validator)"]
