"""The LongCat-Video-Avatar DiT (v1.0, v1.5, INT8) on the base reference DiT; facts in reference/avatar/README.md."""

from .config import AvatarConfig
from .dit import LongcatAvatarDiT
from .loading import load_avatar_dit, load_avatar_int8
from .params import SlotsFor, audio_slots, expected_shapes, upstream_slots

__all__ = ["AvatarConfig", "LongcatAvatarDiT", "SlotsFor", "audio_slots", "expected_shapes", "load_avatar_dit",
           "load_avatar_int8", "upstream_slots"]
