"""Where the avatar DiT's tensors live: the base DiT's slots (from the project key map) plus the audio modules.

Names are upstream's state-dict names (the raw `avatar_single/`, `avatar_multi/`, `base_model/` layout):
per block `audio_adaLN_modulation.1`, `pre_video_crs_attn_norm`, `pre_audio_crs_attn_norm` (only with
audio_prenorm), `audio_cross_attn.{q_linear, kv_linear, proj, q_norm, k_norm}`; top-level
`audio_proj.{proj1, proj1_vf, proj2, proj3, norm}`.

The compute addresses every tensor by its role (the upstream module name), so another naming is one function
`(config, where) -> {role: Slot}`; `upstream_slots` is the one for raw trees. A key map for the avatar family
plugs in as `lambda config, where: build_slots(expand(config, naming, where), naming)`.
"""

from __future__ import annotations

from collections.abc import Callable

from longcat_convert.core import keymap

from ..layout import Slot, build_slots
from .config import AvatarConfig

SlotsFor = Callable[[dict, str], dict[str, Slot]]


def audio_slots(config: dict, where: str = "config.json") -> dict[str, Slot]:
    """The avatar-only modules, upstream names, fused shapes."""
    symbols = keymap.config_symbols(config, "upstream", where)
    avatar = AvatarConfig.from_dict(config, where)
    hidden, adaln, head_dim = symbols["H"], symbols["A"], symbols["d"]
    features = avatar.audio_block * avatar.audio_channel
    inter, out = avatar.intermediate_dim, avatar.output_dim
    slots: list[Slot] = [
        _slot("audio_proj.proj1", "linear", weight=(inter, avatar.audio_window * features), bias=(inter,)),
        _slot("audio_proj.proj1_vf", "linear", weight=(inter, avatar.window_vf * features), bias=(inter,)),
        _slot("audio_proj.proj2", "linear", weight=(inter, inter), bias=(inter,)),
        _slot("audio_proj.proj3", "linear", weight=(avatar.context_tokens * out, inter),
              bias=(avatar.context_tokens * out,)),
        _slot("audio_proj.norm", "norm", weight=(out,), bias=(out,)),
    ]
    for index in range(symbols["L"]):
        prefix = f"blocks.{index}."
        slots += [
            _slot(prefix + "audio_adaLN_modulation.1", "linear", weight=(3 * hidden, adaln), bias=(3 * hidden,)),
            _slot(prefix + "pre_video_crs_attn_norm", "norm", weight=(hidden,), bias=(hidden,)),
            _slot(prefix + "audio_cross_attn.q_linear", "linear", weight=(hidden, hidden), bias=(hidden,)),
            _slot(prefix + "audio_cross_attn.kv_linear", "linear", weight=(2 * hidden, out), bias=(2 * hidden,)),
            _slot(prefix + "audio_cross_attn.proj", "linear", weight=(hidden, hidden), bias=(hidden,)),
            _slot(prefix + "audio_cross_attn.q_norm", "norm", weight=(head_dim,)),
            _slot(prefix + "audio_cross_attn.k_norm", "norm", weight=(head_dim,)),
        ]
        if avatar.audio_prenorm:
            slots.append(_slot(prefix + "pre_audio_crs_attn_norm", "norm", weight=(out,), bias=(out,)))
    return {slot.role: slot for slot in slots}


def upstream_slots(config: dict, where: str = "config.json") -> dict[str, Slot]:
    """Every tensor of the avatar DiT under upstream names: the base key map's, then the audio modules'."""
    return {**build_slots(keymap.expand(config, "upstream", where), "upstream"), **audio_slots(config, where)}


def expected_shapes(slots: dict[str, Slot]) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape for these slots (a split role's parts each get their rows)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for slot in slots.values():
        for param, shape in slot.shapes.items():
            part = (shape[0] // len(slot.paths), *shape[1:])
            shapes.update({key: part for key in slot.keys(param)})
    return shapes


def _slot(role: str, kind: str, **shapes: tuple[int, ...]) -> Slot:
    return Slot(role, kind, (role,), dict(shapes))
