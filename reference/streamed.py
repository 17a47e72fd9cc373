"""The DiT forward with one stage's weights in memory at a time: embedders, block 0 … block L-1, final layer.

`StageWindow` reads a stage's tensors (and that stage's slice of each LoRA) from the tree through the shared
reader, and runs the very functions `LongcatDiT` runs (stages.py, blocks.py) on them, so the streamed and
the whole-model forward give bit-identical outputs. `stage_outputs` walks one tree through every stage for
several cases at once, yielding each stage's hidden states: a caller can walk two trees in lockstep and
compare them stage by stage while holding two stages' weights, whatever the depth.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longcat_convert.core import keymap
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.lora_format import ParsedLora

from .blocks import BlockInputs, dit_block
from .bsa import BsaParams
from .config import DiTConfig
from .layout import Slot, SlotWeights, build_slots
from .loading import Tree, check_dit_keys, lora_paths
from .lora_layers import (
    RuntimeLora,
    clear_loras,
    enable_runtime_loras,
    fastvideo_targets,
    merge_fastvideo_lora,
    read_adapter,
    upstream_modules,
)
from .stages import cache_entry, embed, embed_for_cache, head

EMBED, FINAL = "embedders", "final layer"


def stage_names(depth: int) -> list[str]:
    return [EMBED, *(f"block {index}" for index in range(depth)), FINAL]


def stage_of(role: str) -> str:
    """Which stage a module (its upstream name) belongs to."""
    if role.startswith("blocks."):
        return f"block {role.split('.')[1]}"
    return FINAL if role.startswith("final_layer.") else EMBED


@dataclass
class StreamAdapter:
    """A LoRA of the tree, read header-first; each stage reads only its own modules' tensors."""

    name: str
    path: Path
    format: str
    parsed: ParsedLora

    def modules_for(self, window: StageWindow) -> list[str]:
        if self.format == "upstream":
            return [name for name in self.parsed.modules if name in window.loaded_roles]
        paths = {path for role in window.loaded_roles for path in window.slots[role].paths}
        return [name for name in self.parsed.modules if name in paths]

    def check_targets(self, slots: dict[str, Slot]) -> None:
        """Every module must fall into some stage, as a whole-model load would require."""
        linears = {role for role, slot in slots.items() if slot.kind == "linear"}
        if self.format == "fastvideo":
            linears = {path for role in linears for path in slots[role].paths}
        for module in self.parsed.modules:
            if module not in linears:
                raise LongcatError(f"LoRA targets {module!r}, which is not a Linear of the DiT", self.path)


class StageWindow(SlotWeights):
    """`Weights` for one stage of a tree's DiT at a time (see the module docstring)."""

    def __init__(self, tree: Tree, dtype: torch.dtype, device: torch.device | str):
        expanded, self.dropped = check_dit_keys(tree)
        self.tree = tree
        self.naming = tree.naming
        self.arch = DiTConfig.from_dict(tree.dit.config, tree.naming, str(tree.config_path))
        self.slots = build_slots(expanded, tree.naming)
        self.bsa: BsaParams | None = (self.arch.bsa_params or BsaParams()) if self.arch.enable_bsa else None
        self._dtype, self._device = dtype, torch.device(device)
        self.loaded: dict[str, torch.Tensor] = {}
        self.loaded_roles: list[str] = []
        self.read_seconds = 0.0  # spent reading stages (the rest of a walk is compute)
        self.runtime_loras: dict[str, list[RuntimeLora]] = {}
        self.merged_weights: dict[str, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def get_parameter(self, target: str) -> torch.Tensor:
        if target not in self.loaded:
            raise LongcatError(f"{target} is not in the loaded stage ({', '.join(self.loaded_roles[:3])}, ...)")
        return self.loaded[target]

    def load(self, stage: str) -> None:
        """Free the previous stage, then read this one's tensors, converted to the compute dtype and device."""
        self.free()
        started = time.perf_counter()
        self.loaded_roles = [role for role in self.slots if stage_of(role) == stage]
        for role in self.loaded_roles:
            slot = self.slots[role]
            for param in slot.shapes:
                for key in slot.keys(param):
                    self.loaded[key] = self.tree.tensor(key).to(self._device, self._dtype)
        self.read_seconds += time.perf_counter() - started

    def free(self) -> None:
        clear_loras(self)
        self.loaded, self.loaded_roles = {}, []

    def activate(self, adapter: StreamAdapter | None) -> None:
        """Make exactly `adapter`'s modules of the loaded stage active (none: no LoRA)."""
        clear_loras(self)
        if adapter is None:
            return
        modules = adapter.modules_for(self)
        if adapter.format == "upstream":
            enable_runtime_loras(self, [upstream_modules(adapter.parsed, modules)], 1.0, adapter.path)
        else:
            merge_fastvideo_lora(self, fastvideo_targets(adapter.parsed, modules), 1.0, adapter.path)


# ---- cases --------------------------------------------------------------------------------------------

@dataclass
class CaseState:
    """One case's hidden states between stages; a KV-cache case also carries its conditioning stream."""

    x: torch.Tensor
    inputs: BlockInputs
    cond_x: torch.Tensor | None = None
    cond_inputs: BlockInputs | None = None
    adapter: StreamAdapter | None = None
    extra: dict = field(default_factory=dict)

    def run_block(self, window: StageWindow, index: int) -> None:
        if self.cond_x is None:
            self.x, _ = dit_block(window, index, self.x, self.inputs)
            return
        self.cond_x, entry = dit_block(window, index, self.cond_x, self.cond_inputs)
        self.x, _ = dit_block(window, index, self.x, self.inputs, cache_entry(entry))


def start_case(window: StageWindow, name: str, inputs, adapter: StreamAdapter | None) -> CaseState:
    """Embed a case's inputs exactly as `dit_parity._run_case` feeds the whole model."""
    if name == "cond":
        x, block_inputs = embed(window, inputs.latents, inputs.frame_timestep, inputs.text, inputs.mask,
                                num_cond_latents=inputs.num_cond_latents)
        return CaseState(x, block_inputs)
    if name == "kvcache":
        split = inputs.cache_latents
        cond_x, cond_inputs = embed_for_cache(window, inputs.latents[:1, :, :split])
        # a cached forward runs its blocks with no conditioning tokens of its own (num_cond_latents 0)
        x, block_inputs = embed(window, inputs.latents[:, :, split:], inputs.cache_timestep, inputs.text, inputs.mask)
        return CaseState(x, block_inputs, cond_x, cond_inputs)
    x, block_inputs = embed(window, inputs.latents, inputs.timestep, inputs.text, inputs.mask)
    return CaseState(x, block_inputs, adapter=adapter)


def open_adapters(tree: Tree, names: list[str], slots: dict[str, Slot]) -> dict[str, StreamAdapter | str]:
    """The streamed adapter of each lora:<name> case, or the line saying why the tree cannot run it."""
    paths = lora_paths(tree) if any(name.startswith("lora:") for name in names) else {}
    adapters: dict[str, StreamAdapter | str] = {}
    for case in names:
        if not case.startswith("lora:"):
            continue
        name = case[5:]
        if name not in paths:
            adapters[case] = f"no LoRA named {name!r} under {tree.lora_dir}"
            continue
        try:
            adapter = StreamAdapter(name, paths[name], tree.lora_format, read_adapter(paths[name], tree.lora_format))
            adapter.check_targets(slots)
            adapters[case] = adapter
        except LongcatError as exc:
            adapters[case] = exc.one_line()
    return adapters


@dataclass
class Stage:
    name: str
    outputs: dict[str, torch.Tensor | str]  # per case: hidden states (final: the model output), or an error line


def stage_outputs(window: StageWindow, names: list[str], inputs) -> Iterator[Stage]:
    """Walk the tree through every stage, yielding each stage's per-case results (on CPU, fp32 for the final)."""
    adapters = open_adapters(window.tree, names, window.slots)
    errors = {case: found for case, found in adapters.items() if isinstance(found, str)}
    live = [case for case in names if case not in errors]
    states: dict[str, CaseState] = {}
    with torch.no_grad():
        window.load(EMBED)
        for case in live:
            adapter = adapters.get(case)
            window.activate(adapter if isinstance(adapter, StreamAdapter) else None)
            states[case] = start_case(window, case, inputs, adapter if isinstance(adapter, StreamAdapter) else None)
        yield Stage(EMBED, {**errors, **{case: states[case].x for case in live}})
        for index in range(window.arch.depth):
            window.load(f"block {index}")
            for case in live:
                window.activate(states[case].adapter)
                states[case].run_block(window, index)
            yield Stage(f"block {index}", {**errors, **{case: states[case].x for case in live}})
        window.load(FINAL)
        outputs: dict[str, torch.Tensor | str] = dict(errors)
        for case in live:
            window.activate(states[case].adapter)
            outputs[case] = head(window, states[case].x, states[case].inputs).cpu()
        window.free()
        yield Stage(FINAL, outputs)


def stage_bytes(config: dict, naming: str, element_size: int, where: str = "config.json") -> dict[str, int]:
    """Parameter bytes at `element_size` of every stage (embedders, each block, final layer), from the config alone."""
    sizes: dict[str, int] = {}
    for rule in keymap.expand(config, naming, where).params:
        stage = stage_of(rule.module)
        sizes[stage] = sizes.get(stage, 0) + math.prod(rule.shape) * element_size
    return sizes
