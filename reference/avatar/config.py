"""The avatar DiT's own hyper-parameters (on top of the base DiT's), read from its config.json.

Defaults are the upstream constructor's (`LongCatVideoAvatarTransformer3DModel.__init__`); a v1.5 config sets
audio_block 5 and audio_channel 1280 (Whisper), a v1.0 one keeps 12 × 768 (wav2vec2).
"""

from __future__ import annotations

from dataclasses import dataclass

from longcat_convert.core.errors import LongcatError

INT_FIELDS = {"audio_window": 5, "audio_block": 12, "audio_channel": 768, "intermediate_dim": 512,
              "output_dim": 768, "context_tokens": 32, "vae_scale": 4, "class_range": 24, "class_interval": 4}


@dataclass(frozen=True)
class AvatarConfig:
    audio_window: int  # W: feature frames per video-frame window
    audio_block: int  # S: stacked encoder features per frame
    audio_channel: int  # C_a: encoder width
    intermediate_dim: int  # I: AudioProj hidden width
    output_dim: int  # D_a: audio-token width
    context_tokens: int  # K: audio tokens per latent frame and speaker
    vae_scale: int  # V: pixel frames per latent frame
    audio_prenorm: bool  # LayerNorm on the audio tokens before each block's audio cross-attention
    class_range: int  # multi-speaker 1D RoPE: positions span [0, class_range]
    class_interval: int  # ... speaker 1 in [0, interval], speaker 2 in [range - interval, range]

    @property
    def window_vf(self) -> int:
        """Feature frames per later latent frame: first frame's half window, V−2 centres, last frame's half."""
        return self.audio_window + self.vae_scale - 1

    @classmethod
    def from_dict(cls, config: dict, where: str = "config.json") -> AvatarConfig:
        values: dict = {}
        for name, default in INT_FIELDS.items():
            value = config.get(name, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LongcatError(f"{name} must be a positive integer, got {value!r}", where)
            values[name] = value
        prenorm = config.get("audio_prenorm", False)
        if not isinstance(prenorm, bool):
            raise LongcatError(f"audio_prenorm must be true or false, got {prenorm!r}", where)
        if values["vae_scale"] < 2:
            raise LongcatError(f"vae_scale must be at least 2 (a later latent frame spans first, middle and last "
                               f"pixel frames), got {values['vae_scale']}", where)
        if values["class_interval"] > values["class_range"]:
            raise LongcatError(f"class_interval {values['class_interval']} exceeds class_range "
                               f"{values['class_range']}", where)
        return cls(audio_prenorm=prenorm, **values)
