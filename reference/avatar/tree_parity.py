"""Forward parity of whole avatar trees: every DiT folder of the variant (1.0: avatar_single and avatar_multi;
1.5: base_model, or base_model_int8 for a tree converted `--from-int8`) against the converted tree's folder of the
same DiT, in the converted naming, plus every LoRA of the raw tree on the main DiT (upstream format at run time
on the raw side, the converted file as its format applies it on the other: FastVideo-format ones merged).

Case names are `<converted folder>/<case>` and `<converted folder>/lora:<name>/<case>`; the cases are
`parity.AVATAR_CASES`. Streamed comparison is the base DiT's only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from longcat_convert.core import jsonschemas, keymap, progress
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.tree import Tree, int8_dit_folder

from ..forward_parity import DEFAULT_THRESHOLDS, _case_result, _resolve_dtype
from ..layout import build_slots
from ..loading import apply_loras, lora_paths, read_lora
from ..lora_layers import clear_loras
from .params import SlotsFor, upstream_slots
from .parity import AVATAR_CASES, _check_same_architecture, _run, load_avatar_folder, make_avatar_inputs


@dataclass(frozen=True)
class DitPair:
    """One DiT of the avatar tree: its folder on each side (relative to the tree roots)."""

    raw: str
    converted: str
    main: bool  # the tree's main DiT (LoRAs apply to it)


def naming_slots(naming: str) -> SlotsFor:
    """Where a naming keeps each tensor of an avatar DiT, from the shared key map."""
    if naming == "upstream":
        return upstream_slots
    return lambda config, where: build_slots(keymap.expand(config, naming, where), naming)


def dit_pairs(raw: Tree, converted: Tree, from_int8: bool = False) -> list[DitPair]:
    """Every DiT folder of the raw tree's variant with the converted tree's folder for it."""
    main = int8_dit_folder(raw.root, raw.avatar_variant) if from_int8 else raw.dit.folder
    pairs = [DitPair(main, converted.dit.folder, True)]
    in_converted = {raw_name: folder
                    for folder, raw_name in keymap.extra_dit_folders(raw.avatar_variant, converted.layout).items()}
    for folder, raw_name in keymap.extra_dit_folders(raw.avatar_variant, raw.layout).items():
        if (raw.root / folder).is_dir():
            pairs.append(DitPair(folder, in_converted.get(raw_name, raw_name), False))
    return pairs


def case_plan(cases: Iterable[str] | None, loras: list[str]) -> tuple[list[str], list[str]]:
    """(model cases, LoRA names) from the requested names: AVATAR_CASES entries, `lora` (every LoRA of the raw
    tree) and `lora:<name>`; default everything."""
    requested = list(cases) if cases else [*AVATAR_CASES, "lora"]
    names, adapters = [], []
    for case in requested:
        if case in AVATAR_CASES:
            names += [case] if case not in names else []
        elif case == "lora" or (case.startswith("lora:") and case[5:] in loras):
            adapters += [name for name in (loras if case == "lora" else [case[5:]]) if name not in adapters]
        else:
            raise LongcatError(f"unknown avatar forward case {case!r}; use {', '.join(AVATAR_CASES)}, lora or "
                               f"lora:<name> (LoRAs in the raw tree: {', '.join(loras) or 'none'})")
    return names or list(AVATAR_CASES), adapters


def avatar_tree_forward_parity(raw: Tree, converted: Tree, cases: Iterable[str] | None = None,
                               dtype: str | torch.dtype = "float32", thresholds: dict[str, float] | None = None,
                               seed: int = 0, device: str | torch.device = "cpu", from_int8: bool = False) -> dict:
    """The parity report (level forward, model avatar) of two opened avatar trees (raw: upstream names).

    from_int8: the converted tree was converted `--from-int8`: its main DiT is compared with the raw tree's INT8
    folder, loaded as INT8 (upstream's arithmetic, computing in `dtype`)."""
    torch_dtype, dtype_name = _resolve_dtype(dtype)
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    if dtype_name not in limits:
        raise LongcatError(f"no threshold for dtype {dtype_name}; pass thresholds={{'{dtype_name}': ...}}")
    threshold = limits[dtype_name]
    raw_loras = lora_paths(raw)
    names, adapters = case_plan(cases, sorted(raw_loras))
    slots = naming_slots(converted.naming)
    results, folders = [], []
    for pair in dit_pairs(raw, converted, from_int8):
        folders.append({"raw": pair.raw, "converted": pair.converted})
        with progress.scope(f"{pair.raw} vs {pair.converted}"):
            variants = [None, *adapters] if pair.main else [None]
            outputs, reference = _compare_folder(raw, converted, pair, names, variants, slots, torch_dtype, device,
                                                 seed)
        for label, want in reference.items():
            results.append({"name": f"{pair.converted}/{label}", "raw_folder": pair.raw,
                            **_case_result(outputs[label], want, threshold), "tolerance": threshold,
                            "dtype": dtype_name})
    return jsonschemas.checked_report("parity-report", {
        "level": "forward", "model": "avatar", "variant": raw.avatar_variant, "raw": raw.describe(),
        "converted": converted.describe(), "from_int8": from_int8, "dit_folders": folders, "dtype": dtype_name,
        "threshold": threshold, "seed": seed, "cases": results, "passed": all(r["passed"] for r in results)})


def _compare_folder(raw: Tree, converted: Tree, pair: DitPair, names: list[str], adapters: list[str | None],
                    slots: SlotsFor, dtype: torch.dtype, device: str | torch.device, seed: int
                    ) -> tuple[dict[str, torch.Tensor | str], dict[str, torch.Tensor]]:
    """Outputs of the converted folder and of the raw one per `<lora:name/>case` label (None: no LoRA)."""
    with progress.scope("raw folder"):
        model = load_avatar_folder(raw.root / pair.raw, dtype, device)
        inputs = make_avatar_inputs(model, seed)
        reference = _with_adapters(model, raw, names, adapters, inputs)
    for label, value in reference.items():
        if isinstance(value, str):
            raise LongcatError(f"the raw tree cannot run {label}: {value}", raw.root / pair.raw)
    del model
    try:
        with progress.scope("converted folder"):
            where = converted.root / pair.converted
            model = load_avatar_folder(where, dtype, device, slots, converted.naming)
            _check_same_architecture(model, inputs, where)
            outputs = _with_adapters(model, converted, names, adapters, inputs)
    except LongcatError as exc:
        outputs = dict.fromkeys(reference, f"cannot load the converted DiT: {exc.one_line()}")
    return outputs, reference


def _with_adapters(model, tree: Tree, names: list[str], adapters: list[str | None],
                   inputs: dict[str, dict]) -> dict[str, torch.Tensor | str]:
    """Every case bare and under each LoRA (a LoRA the tree cannot give fails its cases with the reason)."""
    outputs: dict[str, torch.Tensor | str] = {}
    for adapter in adapters:
        prefix = "" if adapter is None else f"lora:{adapter}/"
        clear_loras(model)
        if adapter is not None:
            try:
                apply_loras(model, [read_lora(tree, adapter)])
            except LongcatError as exc:
                outputs.update({prefix + name: exc.one_line() for name in names})
                continue
        outputs.update({prefix + name: value for name, value in _run(model, names, inputs).items()})
    clear_loras(model)
    return outputs
