"""Forward parity: the same seeded inputs through the upstream-layout model on the raw weights and the
target-layout model on the converted weights (plain, conditioned, KV-cache and one case per LoRA).

Two modes, same numbers. `whole`: each tree's DiT is loaded in full, one tree after the other. `streamed`:
both trees are walked stage by stage in lockstep (embedders, block 0 … block L-1, final layer; see
streamed.py), holding one stage of each in memory; every stage's hidden states are compared, and the first
stage where the sides diverge is named. The mode is chosen from a memory budget (`max_memory`, by default
what the device has free) unless the caller forces streaming.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from longcat_convert.core import jsonschemas, keymap, progress
from longcat_convert.core.dtypes import torch_dtype
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.io import read_header
from longcat_convert.core.machine import available_memory, resolve_device
from longcat_convert.core.text_format import human_bytes

from .config import DiTConfig
from .dit import LongcatDiT
from .dit_parity import open_pair
from .loading import Tree, apply_loras, load_dit, lora_paths, read_lora
from .lora_layers import clear_loras
from .metrics import compare_outputs
from .streamed import Stage, StageWindow, stage_bytes, stage_outputs

DEFAULT_THRESHOLDS = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
# A LoRA case between an upstream-format adapter (its branch added at run time) and a FastVideo-format one (ΔW merged
# into the weight in the compute dtype, as FastVideo does): in half precision the merged weight is rounded once more,
# ~2^-9 of each weight in bf16, and the difference grows with depth (full width, bf16: 5e-3 after 1 block, 2.9e-2
# after 48). The exact check of every LoRA delta is the weights level; this bound only catches gross mismatches.
CROSS_FORMAT_LORA_THRESHOLDS = {"bfloat16": 1e-1, "float16": 2e-2}
BASE_CASES = ("plain", "cond", "kvcache")
MAX_TOKENS = 1 << 20  # latent tokens per sample: beyond this the attention alone would not fit any machine
WHOLE_MODEL_MARGIN = 1.25  # activations, LoRA branches and the allocator on top of the weights


@dataclass(frozen=True)
class LatentGrid:
    """Size of the forward inputs in latent cells: frames × height × width (height, width before patching)."""

    frames: int = 4
    height: int | None = None  # default: 2 patches
    width: int | None = None  # default: 3 patches
    tokens: int | None = None  # instead of height and width: about this many tokens (see for_tokens)

    @classmethod
    def for_tokens(cls, tokens: int, patch: tuple[int, int, int], frames: int = 4) -> LatentGrid:
        """A near-square grid of about `tokens` tokens over `frames` latent frames (at least `tokens`)."""
        if tokens < frames:
            raise LongcatError(f"--tokens must be at least {frames} (one per latent frame), got {tokens}")
        per_frame = math.ceil(tokens / frames)
        rows = max(1, math.isqrt(per_frame))
        cols = math.ceil(per_frame / rows)
        return cls(frames, rows * patch[1], cols * patch[2])

    def resolved(self, config: DiTConfig) -> tuple[int, int, int]:
        if self.tokens is not None:
            return LatentGrid.for_tokens(self.tokens, config.patch_size, self.frames).resolved(config)
        _, ph, pw = config.patch_size
        height = 2 * ph if self.height is None else self.height
        width = 3 * pw if self.width is None else self.width
        if self.frames < 3:
            raise LongcatError(f"--frames must be at least 3 (1 conditioning + noise, 2 cached + noise), "
                               f"got {self.frames}")
        for name, size, step in (("height", height, ph), ("width", width, pw)):
            if size <= 0 or size % step:
                raise LongcatError(f"--{name} must be a positive multiple of the patch size {step}, got {size}")
        tokens = self.frames * (height // ph) * (width // pw)
        if tokens > MAX_TOKENS:
            raise LongcatError(f"{tokens} latent tokens per sample is more than {MAX_TOKENS}; choose a smaller grid")
        return self.frames, height, width


@dataclass(frozen=True)
class ForwardInputs:
    latents: torch.Tensor  # [2, C_in, T, H, W]
    timestep: torch.Tensor  # [2]
    frame_timestep: torch.Tensor  # [2, T], frame 0 conditioning (t = 0)
    cache_timestep: torch.Tensor  # [2]
    text: torch.Tensor  # [2, 1, 8, C_cap]
    mask: torch.Tensor  # [2, 8], padded tails
    num_cond_latents: int = 1
    cache_latents: int = 2
    tokens: int = 0  # latent tokens per sample


def make_inputs(config: DiTConfig, seed: int = 0, grid: LatentGrid | None = None) -> ForwardInputs:
    frames, height, width = (grid or LatentGrid()).resolved(config)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, config.in_channels, frames, height, width, generator=generator)
    text = torch.randn(2, 1, 8, config.caption_channels, generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 7:] = 0
    frame_timestep = torch.tensor([[0.0] + [450.0] * (frames - 1), [0.0] + [820.0] * (frames - 1)])
    _, ph, pw = config.patch_size
    return ForwardInputs(latents, torch.tensor([700.0, 300.0]), frame_timestep, torch.tensor([300.0, 600.0]),
                         text, mask, tokens=frames * (height // ph) * (width // pw))


# ---- memory budget ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    streamed: bool
    budget: int  # bytes
    whole_model: int  # estimated peak of the whole-model mode
    streamed_peak: int  # estimated peak of the streamed mode
    reason: str

    def to_json(self) -> dict:
        return {"mode": "streamed" if self.streamed else "whole", "budget_bytes": self.budget,
                "whole_model_bytes": self.whole_model, "streamed_bytes": self.streamed_peak, "reason": self.reason}


def choose_mode(whole_model: int, streamed_peak: int, budget: int, force_stream: bool) -> MemoryPlan:
    """Whole-model when it fits the budget (it reads each tree once, in bulk), streamed otherwise or when forced."""
    if force_stream or whole_model > budget:
        if streamed_peak > budget:
            raise LongcatError(f"even streamed, forward parity needs ~{human_bytes(streamed_peak)} (one stage of each "
                               f"tree) but the memory budget is {human_bytes(budget)}",
                               fix="raise --max-memory, free memory, or use --dtype bfloat16")
        reason = ("--stream given" if force_stream else
                  f"the whole model (~{human_bytes(whole_model)}) exceeds the budget {human_bytes(budget)}")
        return MemoryPlan(True, budget, whole_model, streamed_peak, reason)
    return MemoryPlan(False, budget, whole_model, streamed_peak,
                      f"the whole model (~{human_bytes(whole_model)}) fits the budget {human_bytes(budget)}")


def plan_memory(raw: Tree, dtype: torch.dtype, device: torch.device, names: list[str], force_stream: bool,
                max_memory: int | None) -> MemoryPlan:
    element = torch.empty((), dtype=dtype).element_size()
    stages = stage_bytes(raw.dit.config, "upstream", element, str(raw.config_path))
    whole = sum(stages.values())
    lora = max((_adapter_bytes(raw, name[5:], element) for name in names if name.startswith("lora:")), default=0)
    # streamed: a stage of each tree in the compute dtype, a FastVideo LoRA's merged copy of one stage, and each
    # side's slice of the adapters (spread over the blocks)
    streamed_peak = 3 * max(stages.values()) + 2 * lora // max(1, len(stages) - 2)
    budget = max_memory if max_memory is not None else available_memory(device)
    if budget is None or budget <= 0:
        raise LongcatError("cannot tell how much memory is free", fix="pass --max-memory (e.g. 8GB)")
    # a FastVideo-format LoRA is merged into copies of the weights it targets: up to the model once more
    merged = whole if lora else 0
    return choose_mode(int(WHOLE_MODEL_MARGIN * (whole + merged + lora)), streamed_peak, budget, force_stream)


def _adapter_bytes(tree: Tree, name: str, element: int) -> int:
    paths = lora_paths(tree)
    if name not in paths:
        return 0
    return sum(math.prod(info.shape) * element for info in read_header(paths[name]).tensors.values())


# ---- the comparison ---------------------------------------------------------------------------------------

def forward_parity(raw_tree: str | Path, converted_tree: str | Path, cases: Iterable[str] | None = None,
                   dtype: str | torch.dtype = "float32", thresholds: dict[str, float] | None = None, seed: int = 0,
                   device: str | torch.device = "cpu", stream: bool = False, max_memory: int | None = None,
                   grid: LatentGrid | None = None, from_int8: bool = False) -> dict:
    """cases: any of plain, cond, kvcache, lora (= every LoRA of the raw tree), lora:<name>; default all.
    stream: force the streamed mode; otherwise it is used when the whole model does not fit `max_memory` bytes
    (default: the device's free memory). grid: the latent input size (default 4 × 2 × 3 patches).
    An avatar tree is compared by `avatar.tree_parity` (its own cases; from_int8: the converted tree was made
    `--from-int8`, compare it with the raw tree's INT8 folder); it has no streamed mode and no grid."""
    raw, converted = open_pair(raw_tree, converted_tree, int8=from_int8)
    if raw.family == keymap.AVATAR_FAMILY:
        from .avatar.tree_parity import avatar_tree_forward_parity

        if stream or grid is not None or max_memory is not None:
            raise LongcatError("streamed forward parity, --max-memory and --tokens/--frames/--height/--width are for the "
                               "base DiT; an avatar tree is compared whole on its own small inputs", raw.root,
                               "drop --stream, --max-memory and the grid options")
        return avatar_tree_forward_parity(raw, converted, cases, dtype, thresholds, seed, device, from_int8)
    compute_dtype, dtype_name = _resolve_dtype(dtype)
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    if dtype_name not in limits:
        raise LongcatError(f"no threshold for dtype {dtype_name}; pass thresholds={{'{dtype_name}': ...}}")
    threshold = limits[dtype_name]
    names = _case_names(cases, sorted(lora_paths(raw)))
    tolerances = case_thresholds(names, dtype_name, threshold, thresholds is not None and dtype_name in thresholds,
                                 raw.lora_format != converted.lora_format)
    config = DiTConfig.from_dict(raw.dit.config, "upstream", str(raw.config_path))
    inputs = make_inputs(config, seed, grid)
    device = resolve_device(device)
    memory = plan_memory(raw, compute_dtype, device, names, stream, max_memory)
    report = {"level": "forward", "raw": raw.describe(), "converted": converted.describe(), "dtype": dtype_name,
              "threshold": threshold, "seed": seed, "tokens": inputs.tokens, "memory": memory.to_json()}
    if memory.streamed:
        outputs, reference, stages, timing = _streamed(raw, converted, names, inputs, compute_dtype, device, tolerances)
        report["stages"] = stages
        report["timing"] = timing
        report["first_divergence"] = next((stage["stage"] for stage in stages if not stage["passed"]), None)
    else:
        outputs, reference = _whole(raw, converted, names, inputs, compute_dtype, device)
    results = [{"name": name, **_case_result(outputs[name], reference[name], tolerances[name]),
                "tolerance": tolerances[name], "dtype": dtype_name} for name in names]
    report["cases"] = results
    report["passed"] = all(result["passed"] for result in results)
    return jsonschemas.checked_report("parity-report", report)


def _whole(raw: Tree, converted: Tree, names: list[str], inputs: ForwardInputs, dtype: torch.dtype,
           device: torch.device) -> tuple[dict, dict]:
    with progress.scope("raw tree"):
        reference = _run_cases(_load_dit(raw, dtype, device), raw, names, inputs)
    _raise_raw_failures(raw, reference)
    try:
        with progress.scope("converted tree"):
            outputs = _run_cases(_load_dit(converted, dtype, device), converted, names, inputs)
    except LongcatError as exc:
        outputs = dict.fromkeys(names, f"cannot load the converted DiT: {exc.one_line()}")
    return outputs, reference


def _raise_raw_failures(raw: Tree, reference: dict[str, torch.Tensor | str]) -> None:
    failures = [name for name, out in reference.items() if isinstance(out, str)]
    if failures:
        raise LongcatError(f"the raw tree cannot run case {failures[0]}: {reference[failures[0]]}", raw.root)


def _streamed(raw: Tree, converted: Tree, names: list[str], inputs: ForwardInputs, dtype: torch.dtype,
              device: torch.device, tolerances: dict[str, float]) -> tuple[dict, dict, list[dict], dict]:
    """Per-case outputs of both sides, every stage's comparison, and where the time went."""
    started = time.perf_counter()
    raw_window = StageWindow(raw, dtype, device)
    raw_stages = stage_outputs(raw_window, names, inputs)
    windows = [raw_window]
    converted_stages = _converted_stages(converted, names, inputs, dtype, device, windows)
    stages: list[dict] = []
    reference: dict = {}
    outputs: dict = {}
    for raw_stage in progress.steps(raw_stages, raw_window.arch.depth + 2, "streamed forward, stage by stage"):
        if not stages:
            _raise_raw_failures(raw, {k: v for k, v in raw_stage.outputs.items() if isinstance(v, str)})
        other = next(converted_stages)
        stages.append(_stage_result(raw_stage, other, tolerances))
        reference, outputs = raw_stage.outputs, other.outputs
    wall = time.perf_counter() - started
    read = sum(window.read_seconds for window in windows)
    return outputs, reference, stages, {"wall_seconds": wall, "read_seconds": read, "compute_seconds": wall - read}


def _converted_stages(converted: Tree, names: list[str], inputs: ForwardInputs, dtype: torch.dtype,
                      device: torch.device, windows: list[StageWindow]) -> Iterator[Stage]:
    """The converted tree's stages; a stage that cannot be read fails every case from there on."""
    failure = None
    walk = None
    try:
        window = StageWindow(converted, dtype, device)
        windows.append(window)
        walk = stage_outputs(window, names, inputs)
    except LongcatError as exc:
        failure = f"cannot load the converted DiT: {exc.one_line()}"
    while True:
        if failure is None:
            try:
                yield next(walk)
                continue
            except StopIteration:
                return
            except LongcatError as exc:
                failure = f"cannot read the converted DiT: {exc.one_line()}"
        yield Stage("", dict.fromkeys(names, failure))


def case_thresholds(names: list[str], dtype_name: str, threshold: float, explicit: bool,
                    lora_formats_differ: bool) -> dict[str, float]:
    """Each case's rel L2 bound: the dtype's, or for a LoRA case across adapter formats in half precision the
    looser CROSS_FORMAT_LORA_THRESHOLDS (unless the caller set the threshold)."""
    loose = CROSS_FORMAT_LORA_THRESHOLDS.get(dtype_name) if lora_formats_differ and not explicit else None
    return {name: loose if loose is not None and name.startswith("lora:") else threshold for name in names}


def _stage_result(raw: Stage, converted: Stage, tolerances: dict[str, float]) -> dict:
    cases = {}
    for name, want in raw.outputs.items():
        got = converted.outputs.get(name, "missing")
        cases[name] = _case_result(got, want, tolerances[name]) if not isinstance(want, str) else {"passed": False,
                                                                                              "error": want}
        cases[name].pop("shape", None)
        cases[name].pop("cosine", None)
    return {"stage": raw.name, "passed": all(case["passed"] for case in cases.values()), "cases": cases}


def _load_dit(tree: Tree, dtype: torch.dtype, device: str | torch.device) -> LongcatDiT:
    with progress.stage("loading the DiT"):
        return load_dit(tree, dtype, device)


def _resolve_dtype(dtype: str | torch.dtype) -> tuple[torch.dtype, str]:
    resolved = torch_dtype(dtype, tuple(DEFAULT_THRESHOLDS))
    return resolved, str(resolved).removeprefix("torch.")


def _case_names(cases: Iterable[str] | None, loras: list[str]) -> list[str]:
    requested = list(cases) if cases is not None else [*BASE_CASES, "lora"]
    names: list[str] = []
    for case in requested:
        if case == "lora":
            expanded = [f"lora:{name}" for name in loras]
        elif case in BASE_CASES:
            expanded = [case]
        elif case.startswith("lora:") and case[5:] in loras:
            expanded = [case]
        else:
            raise LongcatError(f"unknown forward case {case!r}; use plain, cond, kvcache, lora or lora:<name> "
                               f"(LoRAs in the raw tree: {', '.join(loras) or 'none'})")
        names += [name for name in expanded if name not in names]
    return names


def _run_cases(dit: LongcatDiT, tree: Tree, names: list[str], inputs: ForwardInputs) -> dict[str, torch.Tensor | str]:
    """Outputs per case (on CPU), or an error line for a case the tree cannot run."""
    outputs: dict[str, torch.Tensor | str] = {}
    with torch.no_grad():
        for name in progress.steps(names, len(names), "forward cases"):
            clear_loras(dit)
            if name.startswith("lora:"):
                try:
                    apply_loras(dit, [read_lora(tree, name[5:])])
                except LongcatError as exc:
                    outputs[name] = exc.one_line()
                    continue
            outputs[name] = _run_case(dit, name, inputs).cpu()
        clear_loras(dit)
    return outputs


def _run_case(dit: LongcatDiT, name: str, inputs: ForwardInputs) -> torch.Tensor:
    if name == "cond":
        return dit(inputs.latents, inputs.frame_timestep, inputs.text, inputs.mask,
                   num_cond_latents=inputs.num_cond_latents)
    if name == "kvcache":
        split = inputs.cache_latents
        cache = dit.build_kv_cache(inputs.latents[:1, :, :split])
        return dit(inputs.latents[:, :, split:], inputs.cache_timestep, inputs.text, inputs.mask, kv_cache=cache)
    return dit(inputs.latents, inputs.timestep, inputs.text, inputs.mask)


def _case_result(output: torch.Tensor | str, reference: torch.Tensor, threshold: float) -> dict:
    if isinstance(output, str):
        return {"passed": False, "error": output}
    if output.shape != reference.shape:
        return {"passed": False, "error": f"output shape {list(output.shape)} != {list(reference.shape)}"}
    metrics = compare_outputs(output, reference)
    passed = metrics["rel_l2"] is not None and metrics["rel_l2"] <= threshold
    return {**metrics, "passed": passed, "shape": list(output.shape)}
