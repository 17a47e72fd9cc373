"""Everything a task needs, loaded from a checkpoint tree of any layout (raw, diffusers, fastvideo).

The DiT comes from the reference runner (`loading.load_dit`, either naming); the tokenizer and text
encoder through transformers (`AutoTokenizer`, `UMT5EncoderModel`), the VAE through diffusers'
`AutoencoderKLWan`. All layouts keep these four in `tokenizer/`, `text_encoder/`, `vae/`, `scheduler/`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcat_convert.core import progress
from longcat_convert.core.dtypes import torch_dtype
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.machine import resolve_device
from longcat_convert.core.quiet import quiet_libraries

from ..bsa import BsaParams
from ..dit import LongcatDiT
from ..loading import LoraFile, Tree, apply_loras, load_dit, open_tree, read_lora
from ..lora_layers import clear_loras
from .schedule import SchedulerConfig

DISTILL_LORA = "cfg_step_lora"
REFINE_LORA = "refinement_lora"
COMPUTE_DTYPES = ("float32", "bfloat16")  # what the pipeline runs in


# Called after every Euler step with (step index, steps in the loop, timestep, loop state); a tensor it
# returns replaces the state (the diffusers pipelines' callback_on_step_end and progress bar).
StepEnd = Callable[[int, int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class Pipeline:
    tree: Tree | None  # None: components given directly (the diffusers pipelines); LoRAs only from _loras
    dit: LongcatDiT
    tokenizer: Any  # a transformers tokenizer
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scheduler: SchedulerConfig
    device: torch.device
    _loras: dict[str, LoraFile] = field(default_factory=dict)
    step_end: StepEnd | None = None

    @property
    def dit_dtype(self) -> torch.dtype:
        return self.dit.dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def lora(self, name: str) -> LoraFile:
        if name not in self._loras:
            if self.tree is None:
                raise LongcatError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(self._loras) or 'none'}",
                                   fix=f"load it with pipe.load_longcat_lora(path, {name!r})")
            self._loras[name] = read_lora(self.tree, name)
        return self._loras[name]

    @contextlib.contextmanager
    def adapters(self, names: Iterable[str] = (), bsa: BsaParams | None = None) -> Iterator[None]:
        """Enable exactly `names` for the block and no LoRA afterwards, as the demos do around each call.

        With `bsa`, block-sparse attention is switched on for the block and off afterwards (the demos'
        enable_bsa/disable_bsa around refinement); without it the DiT's BSA state is left alone.
        """
        try:
            apply_loras(self.dit, [self.lora(name) for name in names])
            if bsa is not None:
                self.dit.enable_bsa(bsa)
            yield
        finally:
            clear_loras(self.dit)
            if bsa is not None:
                self.dit.disable_bsa()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return torch_dtype(dtype, COMPUTE_DTYPES)


def load_pipeline(tree: str | Path | Tree, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu",
                  vae_dtype: str | torch.dtype | None = None, text_dtype: str | torch.dtype | None = None) -> Pipeline:
    """Load all components. Upstream runs every component in bf16; `vae_dtype`/`text_dtype` default to `dtype`."""
    with progress.stage("loading the model"):
        return _load_pipeline(tree, dtype, device, vae_dtype, text_dtype)


def _load_pipeline(tree: str | Path | Tree, dtype: str | torch.dtype, device: str | torch.device,
                   vae_dtype: str | torch.dtype | None, text_dtype: str | torch.dtype | None) -> Pipeline:
    tree = tree if isinstance(tree, Tree) else open_tree(tree)
    dit_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    folders = {name: component_dir(tree, name) for name in ("tokenizer", "text_encoder", "vae", "scheduler")}
    dit = load_dit(tree, dit_dtype, device)
    with quiet_libraries():
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = _load(AutoTokenizer.from_pretrained, folders["tokenizer"])
        text_encoder = _load(UMT5EncoderModel.from_pretrained, folders["text_encoder"],
                             dtype=resolve_dtype(text_dtype or dit_dtype))
        vae = _load(AutoencoderKLWan.from_pretrained, folders["vae"], torch_dtype=resolve_dtype(vae_dtype or dit_dtype),
                    low_cpu_mem_usage=False)
    # transformers may keep `wo` in fp32 for some dtypes; upstream's stack ran the whole encoder in one dtype
    text_encoder = text_encoder.to(device, resolve_dtype(text_dtype or dit_dtype)).eval()
    vae = vae.to(device).eval()
    _check_shapes(tree, dit, text_encoder, vae)
    scheduler = SchedulerConfig.from_file(folders["scheduler"] / "scheduler_config.json")
    return Pipeline(tree, dit, tokenizer, text_encoder, vae, scheduler, device)


def component_dir(tree: Tree, name: str) -> Path:
    folder = tree.root / name
    if not folder.is_dir():
        raise LongcatError(f"the tree has no {name}/ folder; running tasks needs the full pipeline", tree.root)
    return folder


def _load(loader, folder: Path, **kwargs):
    try:
        return loader(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise LongcatError(f"cannot load ({exc.__class__.__name__}: {message})", folder) from None


def _check_shapes(tree: Tree, dit: LongcatDiT, text_encoder: torch.nn.Module, vae: torch.nn.Module) -> None:
    if text_encoder.config.d_model != dit.arch.caption_channels:
        raise LongcatError(f"text encoder d_model {text_encoder.config.d_model} != DiT caption_channels "
                           f"{dit.arch.caption_channels}", tree.root / "text_encoder")
    if vae.config.z_dim != dit.arch.in_channels:
        raise LongcatError(f"VAE z_dim {vae.config.z_dim} != DiT in_channels {dit.arch.in_channels}",
                           tree.root / "vae")
