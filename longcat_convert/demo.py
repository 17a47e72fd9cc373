"""`demo`: tiny tree → convert (fastvideo, diffusers) → reverse → validate → parity, one summary table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .convert import ConvertRequest, convert
from .errors import LongcatError
from .io import read_bytes, read_header, tensor_range
from .tiny import build_tiny_tree


@dataclass
class StepResult:
    step: str
    passed: bool
    detail: str
    seconds: float


def tensors_bitwise_equal(a: Path, b: Path, pattern: str, by_file: bool) -> tuple[int, list[str]]:
    """Compare every tensor of the files matching `pattern` under two folders, byte for byte.

    by_file: tensors are matched by (file name, key), e.g. LoRA adapters; otherwise by key alone, so a
    sharded checkpoint compares equal to the same tensors sharded differently."""
    def collect(folder: Path) -> dict[tuple[str, str], tuple]:
        found = {}
        for path in sorted(folder.glob(pattern)):
            header = read_header(path)
            for key, info in header.tensors.items():
                found[(path.name if by_file else "", key)] = (info.dtype, info.shape,
                                                               read_bytes(tensor_range(header, key)))
        return found

    left, right = collect(a), collect(b)
    differing = sorted(f"{file}:{key}" for file, key in set(left) | set(right) if left.get((file, key)) != right.get((file, key)))
    return len(left), differing


class Demo:
    def __init__(self, workdir: Path, echo: Callable[[str], None]):
        self.workdir = workdir
        self.echo = echo
        self.results: list[StepResult] = []

    def step(self, name: str, action: Callable[[], str]) -> bool:
        started = time.perf_counter()
        try:
            detail, passed = action(), True
        except LongcatError as exc:
            detail, passed = exc.one_line(), False
        except AssertionError as exc:
            detail, passed = str(exc), False
        result = StepResult(name, passed, detail, time.perf_counter() - started)
        self.results.append(result)
        self.echo(f"{'PASS' if passed else 'FAIL'}  {name:<44} {result.seconds:6.1f} s  {detail}")
        return passed

    def tree(self, name: str) -> Path:
        return self.workdir / name

    def run(self) -> bool:
        for dtype in ("float32", "bfloat16"):
            raw = self.tree(f"raw-{dtype}")
            if not self.step(f"tiny ({dtype}, LoRAs on every Linear)", lambda raw=raw, dtype=dtype: self._tiny(raw, dtype)):
                continue
            self.step(f"validate --deep raw ({dtype})", lambda raw=raw: self._validate(raw))
            for layout in ("fastvideo", "diffusers"):
                converted = self.tree(f"{layout}-{dtype}")
                if not self.step(f"convert raw -> {layout} ({dtype})",
                                 lambda raw=raw, converted=converted, layout=layout: self._convert(raw, converted, layout)):
                    continue
                self.step(f"validate --deep {layout} ({dtype})", lambda converted=converted: self._validate(converted))
                self.step(f"parity weights raw vs {layout} ({dtype})",
                          lambda raw=raw, converted=converted: self._parity_weights(raw, converted))
                self.step(f"parity forward raw vs {layout} ({dtype})",
                          lambda raw=raw, converted=converted, dtype=dtype: self._parity_forward(raw, converted, dtype))
                if dtype == "float32":
                    self.step(f"parity task, every task, raw vs {layout}",
                              lambda raw=raw, converted=converted: self._parity_tasks(raw, converted))
                back = self.tree(f"{layout}-{dtype}-back")
                self.step(f"convert {layout} -> raw, bitwise equal ({dtype})",
                          lambda raw=raw, converted=converted, back=back: self._round_trip(raw, converted, back))
        return all(r.passed for r in self.results)

    def _validate(self, tree: Path) -> str:
        from .validate import ValidateOptions, validate_tree

        report = validate_tree(tree, ValidateOptions(deep=True))
        errors = [f["message"] for f in report["findings"] if f["severity"] == "error"]
        assert report["valid"], f"{len(errors)} errors, e.g. {errors[0] if errors else '?'}"
        hashes = report["deep_scan"]["hashed_against_manifest"]
        return f"valid, {report['counts']['warning']} warnings" + (f", {hashes} manifest hashes verified" if hashes else "")

    def _parity_weights(self, raw: Path, converted: Path) -> str:
        from longcat_reference.parity import weights_parity

        report = weights_parity(raw, converted)
        failed = [case["name"] for case in report["cases"] if not case["passed"]]
        assert report["passed"], f"weights differ in {failed}"
        dit = next(case for case in report["cases"] if case["name"] == "dit")
        loras = sum(case["name"].startswith("lora:") for case in report["cases"])
        return f"{dit['checked']} tensors equal; {loras} LoRAs' deltas equal"

    def _parity_forward(self, raw: Path, converted: Path, dtype: str) -> str:
        from longcat_reference.parity import forward_parity

        report = forward_parity(raw, converted, dtype=dtype)
        worst = max(case.get("rel_l2", float("inf")) for case in report["cases"])
        assert report["passed"], f"forward outputs differ (worst rel L2 {worst:.2e})"
        return f"{len(report['cases'])} cases, worst rel L2 {worst:.1e}"

    def _tiny(self, raw: Path, dtype: str) -> str:
        build_tiny_tree(raw, seed=7, dtype=dtype, lora_targets="all", overwrite=True)
        return str(raw)

    def _convert(self, raw: Path, converted: Path, layout: str) -> str:
        manifest = convert(ConvertRequest(raw, converted, layout, overwrite=True, quiet=True))
        checks = ", ".join(f"{c['adapter']} Δ rel {c['max_rel_error']:.0e}" for c in manifest["lora_checks"])
        return f"{len(manifest['tensors'])} tensors; LoRA {checks}"

    def _round_trip(self, raw: Path, converted: Path, back: Path) -> str:
        convert(ConvertRequest(converted, back, "raw", overwrite=True, quiet=True))
        total = 0
        for folder, by_file in (("dit", False), ("lora", True)):
            count, differing = tensors_bitwise_equal(raw / folder, back / folder, "*.safetensors", by_file)
            assert not differing, f"{len(differing)} tensors differ, e.g. {differing[0]}"
            total += count
        return f"{total} tensors identical"

    def _parity_tasks(self, raw: Path, converted: Path) -> str:
        from longcat_reference.pipeline.parity import task_parity

        report = task_parity(raw, converted)
        failed = [case["name"] for case in report["cases"] if not case["passed"]]
        assert report["passed"], f"tasks differ: {failed[:4]}"
        worst = max((case.get("rel_l2") or 0.0) for case in report["cases"])
        tasks = sorted({case["name"].split(":")[0] for case in report["cases"]})
        return f"{len(tasks)} tasks ({', '.join(tasks)}), worst rel L2 {worst:.1e}"

    def table(self) -> list[str]:
        passed = sum(r.passed for r in self.results)
        return [f"demo: {passed}/{len(self.results)} steps passed in {sum(r.seconds for r in self.results):.0f} s "
                f"(work folder {self.workdir})"]
