"""The DiT hyper-parameters the reference runner needs, read from a config dict of either naming."""

from __future__ import annotations

from dataclasses import dataclass

from longcat_convert.core import keymap
from longcat_convert.core.errors import LongcatError

from .bsa import BsaParams


@dataclass(frozen=True)
class DiTConfig:
    hidden_size: int
    depth: int
    num_heads: int
    head_dim: int
    caption_channels: int
    adaln_tembed_dim: int
    frequency_embedding_size: int
    ffn_hidden_size: int
    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int]
    text_tokens_zero_pad: bool
    bsa_params: BsaParams | None  # used when block-sparse attention is switched on
    enable_bsa: bool

    @classmethod
    def from_dict(cls, config: dict, naming: str, where: str = "config.json") -> DiTConfig:
        symbols = keymap.config_symbols(config, naming, where)
        if symbols["p_t"] != 1:
            raise LongcatError(f"patch_size[0] must be 1 (per-frame modulation), got {symbols['p_t']}", where)
        zero_pad = config.get("text_tokens_zero_pad", False)
        if not isinstance(zero_pad, bool):
            raise LongcatError(f"text_tokens_zero_pad must be true or false, got {zero_pad!r}", where)
        raw_bsa = config.get("bsa_params")
        return cls(
            hidden_size=symbols["H"], depth=symbols["L"], num_heads=symbols["n_h"], head_dim=symbols["d"],
            caption_channels=symbols["C_cap"], adaln_tembed_dim=symbols["A"],
            frequency_embedding_size=symbols["E"], ffn_hidden_size=symbols["F"],
            in_channels=symbols["C_in"], out_channels=symbols["C_out"],
            patch_size=(symbols["p_t"], symbols["p_h"], symbols["p_w"]),
            text_tokens_zero_pad=zero_pad,
            bsa_params=None if raw_bsa is None else BsaParams.from_config(raw_bsa, where),
            enable_bsa=bool(config.get("enable_bsa", False)),
        )
