"""The LongCat-Video-Avatar DiT (v1.0, v1.5, INT8) on the base reference DiT; facts in reference/avatar/README.md."""

from .config import AvatarConfig
from .dit import LongcatAvatarDiT
from .loading import load_avatar_dit, load_avatar_int8
from .params import SlotsFor, audio_slots, expected_shapes, upstream_slots
from .parity import (
           AVATAR_CASES,
           avatar_forward_parity,
           load_avatar_folder,
           make_avatar_inputs,
           run_avatar_case,
)

__all__ = ["AVATAR_CASES", "AvatarConfig", "LongcatAvatarDiT", "SlotsFor", "audio_slots", "avatar_forward_parity",
           "expected_shapes", "load_avatar_dit", "load_avatar_folder", "load_avatar_int8", "make_avatar_inputs",
           "run_avatar_case", "upstream_slots"]
