"""`demo`: tiny tree → convert (fastvideo, diffusers) → reverse → validate → parity, then the same for a tiny
LongCat-Video-Avatar 1.5 tree plus its INT8 round trip, one summary table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .conversion import ConvertRequest, convert
from .core import progress
from .core.errors import LongcatError
from .core.io import read_bytes, read_header, read_tensor, tensor_range
from .tiny_avatar import AVATAR_REPOS, build_tiny_avatar
from .tiny_tree import build_tiny_tree


class StepFailed(Exception):
    """A demo step whose check did not hold (a FAIL row, not a crash; unlike `assert`, survives python -O)."""


def _require(condition: bool, failure: str) -> None:
    if not condition:
        raise StepFailed(failure)


@dataclass
class StepResult:
    step: str
    verdict: str  # PASS, FAIL or SKIP (a step it needs failed)
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


@dataclass(frozen=True)
class Step:
    name: str
    action: Callable[[], str]
    needs: str | None = None  # the step that must have passed first


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


def _one(folder: Path, key: str):
    """One tensor of a sharded folder, found through the headers."""
    for path in sorted(folder.glob("*.safetensors")):
        header = read_header(path)
        if key in header.tensors:
            return read_tensor(header, key)
    raise StepFailed(f"{key} is not in {folder}")


class Demo:
    def __init__(self, workdir: Path, echo: Callable[[str], None], kept: bool = True):
        """kept: whether `workdir` outlives the demo (the summary says where the trees are, or that they are gone)."""
        self.workdir = workdir
        self.echo = echo
        self.kept = kept
        self.results: list[StepResult] = []

    def tree(self, name: str) -> Path:
        return self.workdir / name

    def plan(self) -> list[Step]:
        """Every step, in order, each with the step it builds on."""
        steps: list[Step] = []
        for dtype in ("float32", "bfloat16"):
            raw = self.tree(f"raw-{dtype}")
            tiny = f"tiny ({dtype}, LoRAs on every Linear)"
            steps.append(Step(tiny, lambda raw=raw, dtype=dtype: self._tiny(raw, dtype)))
            steps.append(Step(f"validate --deep raw ({dtype})", lambda raw=raw: self._validate(raw), tiny))
            for layout in ("fastvideo", "diffusers"):
                converted, back = self.tree(f"{layout}-{dtype}"), self.tree(f"{layout}-{dtype}-back")
                made = f"convert raw -> {layout} ({dtype})"
                steps.append(Step(made, lambda raw=raw, c=converted, layout=layout: self._convert(raw, c, layout), tiny))
                steps.append(Step(f"validate --deep {layout} ({dtype})", lambda c=converted: self._validate(c), made))
                steps.append(Step(f"parity weights raw vs {layout} ({dtype})",
                                  lambda raw=raw, c=converted: self._parity_weights(raw, c), made))
                steps.append(Step(f"parity forward raw vs {layout} ({dtype})",
                                  lambda raw=raw, c=converted, dtype=dtype: self._parity_forward(raw, c, dtype), made))
                if dtype == "float32":
                    steps.append(Step(f"parity task, every task, raw vs {layout}",
                                      lambda raw=raw, c=converted: self._parity_tasks(raw, c), made))
                steps.append(Step(f"round trip {layout} -> raw ({dtype})",
                                  lambda raw=raw, c=converted, back=back: self._round_trip(raw, c, back), made))
        return steps + self._avatar_steps()

    def _avatar_steps(self) -> list[Step]:
        """LongCat-Video-Avatar 1.5: tiny tree (with the base tree beside it) → validate → convert → parity (weights,
        forward with the dmd LoRA) → round trip, and the INT8 round trip (quantise as upstream does, dequantise as
        its QuantizedLinear does) with parity of each half."""
        avatar = self.tree("avatar") / AVATAR_REPOS["avatar-v1.5"]
        dif, back = self.tree("avatar-diffusers"), self.tree("avatar-diffusers-back")
        int8, dequantized = self.tree("avatar-int8"), self.tree("avatar-int8-dequantized")
        tiny, made = "tiny avatar-v1.5 (base tree beside it)", "convert avatar raw -> diffusers"
        quantized = "convert avatar --to raw --to-int8"
        return [
            Step(tiny, lambda: str(build_tiny_avatar(self.tree("avatar"), "avatar-v1.5", seed=7, overwrite=True))),
            Step("validate --deep avatar raw", lambda: self._validate(avatar), tiny),
            Step(made, lambda: self._convert(avatar, dif, "diffusers"), tiny),
            Step("validate --deep avatar diffusers", lambda: self._validate(dif), made),
            Step("parity weights avatar raw vs diffusers", lambda: self._parity_weights(avatar, dif), made),
            Step("parity forward avatar raw vs diffusers (+ dmd LoRA)",
                 lambda: self._parity_forward(avatar, dif, "float32"), made),
            Step("round trip avatar diffusers -> raw", lambda: self._avatar_round_trip(avatar, dif, back), made),
            Step(quantized, lambda: self._to_int8(avatar, int8), tiny),
            Step("parity weights avatar raw vs --to-int8 (upstream's quantisation)",
                 lambda: self._parity_weights(avatar, int8), quantized),
            Step("INT8 round trip (--from-int8 --dtype float32)",
                 lambda: self._int8_round_trip(avatar, int8, dequantized), quantized),
            Step("convert --from-int8 --dtype float32, parity forward vs base_model_int8",
                 lambda: self._from_int8_forward(avatar, self.tree("avatar-from-int8")), tiny),
        ]

    def _avatar_round_trip(self, avatar: Path, converted: Path, back: Path) -> str:
        convert(ConvertRequest(src=converted, dst=back, to="raw", overwrite=True, quiet=True))
        total = 0
        for folder, by_file in (("base_model", False), ("lora", True), ("base_model_int8", False)):
            count, differing = tensors_bitwise_equal(avatar / folder, back / folder, "*.safetensors", by_file)
            _require(not differing, f"{len(differing)} tensors differ, e.g. {differing[0] if differing else ''}")
            total += count
        return f"{total} tensors bitwise identical to the source"

    def _to_int8(self, avatar: Path, int8: Path) -> str:
        manifest = convert(ConvertRequest(src=avatar, dst=int8, to="raw", to_int8=True, overwrite=True, quiet=True))
        _, differing = tensors_bitwise_equal(avatar / "base_model_int8", int8 / "base_model_int8", "*.safetensors",
                                             False)
        modules = {t["name"].removesuffix(".weight_int8") for t in manifest["tensors"] if t["op"] == "int8_weight"}
        quantized = {f"{m}.{part}" for m in modules for part in ("weight_int8", "weight_scale", "bias")}
        wrong = [d for d in differing if d.lstrip(":") in quantized]  # other tensors keep the source's float32
        _require(not wrong, f"INT8 tensors differ from the tiny tree's: {wrong[:2]}")
        return f"{len(modules)} Linears quantised; int8, scales, biases equal to the tiny tree's (upstream's format)"

    def _from_int8_forward(self, avatar: Path, dequantized: Path) -> str:
        """The published INT8 folder (non-quantised tensors in bf16) dequantised to float32 computes what upstream's
        INT8 model computes in float32. (An INT8 folder holding float32 non-quantised tensors, as --to-int8 writes
        from a float32 tree, is not: upstream's loader rounds those to bf16, the conversion keeps them.)"""
        convert(ConvertRequest(src=avatar, dst=dequantized, to="diffusers", from_int8=True, dtype="float32",
                               overwrite=True, quiet=True))
        return self._parity_forward(avatar, dequantized, "float32", from_int8=True)

    def _int8_round_trip(self, avatar: Path, int8: Path, dequantized: Path) -> str:
        """Dequantised weights lie within half a quantisation step (s/2 per row) of the float weights."""
        convert(ConvertRequest(src=int8, dst=dequantized, to="raw", from_int8=True, dtype="float32", overwrite=True,
                               quiet=True))
        worst = 0.0
        for path in sorted((int8 / "base_model_int8").glob("*.safetensors")):
            header = read_header(path)
            for key in (k for k in header.tensors if k.endswith(".weight_scale")):
                module = key.removesuffix(".weight_scale")
                scale = read_tensor(header, key).unsqueeze(1)
                original = _one(avatar / "base_model", f"{module}.weight")
                restored = _one(dequantized / "base_model", f"{module}.weight")
                worst = max(worst, float(((restored - original).abs() / (scale / 2)).max()))
        # float32 rounding of w/s and q·s: up to ~127·2⁻²³ of a step beyond the exact bound, for |w| near the row max
        _require(worst <= 1.0 + 1e-4, f"a dequantised weight is {worst:.5f} half-steps from the float one")
        return f"every weight within {worst:.2f} × s/2 of base_model"

    def run(self) -> bool:
        steps = self.plan()
        width = max(len(step.name) for step in steps)
        passed: set[str] = set()
        for number, step in enumerate(steps, start=1):
            with progress.scope(f"demo {number}/{len(steps)}"), progress.stage(step.name):
                result = self._attempt(step, passed)
            if result.passed:
                passed.add(step.name)
            self.results.append(result)
            self.echo(f"{result.verdict:<4}  {step.name:<{width}}  {result.seconds:6.1f} s  {result.detail}")
        return all(result.passed for result in self.results)

    @staticmethod
    def _attempt(step: Step, passed: set[str]) -> StepResult:
        if step.needs is not None and step.needs not in passed:
            return StepResult(step.name, "SKIP", f"needs '{step.needs}', which did not pass", 0.0)
        started = time.perf_counter()
        try:
            detail, verdict = step.action(), "PASS"
        except LongcatError as exc:
            detail, verdict = exc.one_line(), "FAIL"
        except StepFailed as exc:
            detail, verdict = str(exc), "FAIL"
        return StepResult(step.name, verdict, detail, time.perf_counter() - started)

    def _validate(self, tree: Path) -> str:
        from .validation.run import ValidateOptions, validate_tree

        report = validate_tree(tree, ValidateOptions(deep=True))
        errors = [f["message"] for f in report["findings"] if f["severity"] == "error"]
        _require(report["valid"], f"{len(errors)} errors, e.g. {errors[0] if errors else '?'}")
        hashes = report["deep_scan"]["hashed_against_manifest"]
        return f"valid, {report['counts']['warning']} warnings" + (f", {hashes} manifest hashes verified" if hashes else "")

    def _parity_weights(self, raw: Path, converted: Path) -> str:
        from longcat_reference.dit_parity import weights_parity

        report = weights_parity(raw, converted)
        failed = [case["name"] for case in report["cases"] if not case["passed"]]
        _require(report["passed"], f"weights differ in {failed}")
        dit = next(case for case in report["cases"] if case["name"] == "dit")
        loras = sum(case["name"].startswith("lora:") for case in report["cases"])
        return f"{dit['checked']} tensors equal; {loras} LoRAs' deltas equal"

    def _parity_forward(self, raw: Path, converted: Path, dtype: str, from_int8: bool = False) -> str:
        from longcat_reference.forward_parity import forward_parity

        report = forward_parity(raw, converted, dtype=dtype, from_int8=from_int8)
        worst = max(case.get("rel_l2", float("inf")) for case in report["cases"])
        _require(report["passed"], f"forward outputs differ (worst rel L2 {worst:.2e})")
        return f"{len(report['cases'])} cases, worst rel L2 {worst:.1e}"

    def _tiny(self, raw: Path, dtype: str) -> str:
        build_tiny_tree(raw, seed=7, dtype=dtype, lora_targets="all", overwrite=True)
        return str(raw)

    def _convert(self, raw: Path, converted: Path, layout: str) -> str:
        manifest = convert(ConvertRequest(src=raw, dst=converted, to=layout, overwrite=True, quiet=True))
        checks = ", ".join(f"{c['adapter']} Δ rel {c['max_rel_error']:.0e}" for c in manifest["lora_checks"])
        return f"{len(manifest['tensors'])} tensors; LoRA {checks}"

    def _round_trip(self, raw: Path, converted: Path, back: Path) -> str:
        convert(ConvertRequest(src=converted, dst=back, to="raw", overwrite=True, quiet=True))
        total = 0
        for folder, by_file in (("dit", False), ("lora", True)):
            count, differing = tensors_bitwise_equal(raw / folder, back / folder, "*.safetensors", by_file)
            _require(not differing, f"{len(differing)} tensors differ, e.g. {differing[0] if differing else ''}")
            total += count
        return f"{total} tensors bitwise identical to the source"

    def _parity_tasks(self, raw: Path, converted: Path) -> str:
        from longcat_reference.pipeline.task_parity import task_parity

        report = task_parity(raw, converted)
        failed = [case["name"] for case in report["cases"] if not case["passed"]]
        _require(report["passed"], f"tasks differ: {failed[:4]}")
        worst = max((case.get("rel_l2") or 0.0) for case in report["cases"])
        tasks = sorted({case["name"].split(":")[0] for case in report["cases"]})
        return f"{len(tasks)} tasks ({', '.join(tasks)}), worst rel L2 {worst:.1e}"

    def table(self) -> list[str]:
        passed = sum(r.passed for r in self.results)
        where = (f"trees kept in {self.workdir}" if self.kept
                 else "trees in a temporary folder, removed on exit; pass WORKDIR to keep them")
        return [f"demo: {passed}/{len(self.results)} steps passed in {sum(r.seconds for r in self.results):.0f} s "
                f"({where})"]
