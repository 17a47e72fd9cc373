"""The reference DiT as a diffusers model: `LongCatVideoTransformer3DModel.from_pretrained(tree, subfolder=
"transformer", torch_dtype=...)` loads the diffusers layout's `transformer/` through diffusers' own loader.

The class is `LongcatDiT` (upstream naming, so the state-dict keys are the layout's keys) with diffusers'
`ModelMixin` and `ConfigMixin` in front: `config` is diffusers' frozen config dict (every key of
`transformer/config.json`, upstream's included, so `save_pretrained` writes a config upstream's class still
loads); the hyper-parameters the compute reads are `arch`. Its name is upstream's class name, which the
layout's `transformer/config.json` carries in `_class_name`, so diffusers and upstream both accept that file.
"""

from __future__ import annotations

import os

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from longcat_convert.core import keymap
from longcat_convert.core.errors import LongcatError

from .dit import KVCache, LongcatDiT
from .loading import Tree, expand_checked, fill_dit, open_tree

SHOW = 5  # names listed in a key-mismatch error before "..."


class LongCatVideoTransformer3DModel(ModelMixin, LongcatDiT, ConfigMixin):
    """The LongCat-Video DiT (upstream parameter names) loadable with `from_pretrained` / `from_config`."""

    # ConfigMixin after nn.Module in the MRO (as in diffusers' own models, so attribute lookup reaches the
    # module's children), while `config` is diffusers' dict, not LongcatDiT's hyper-parameters (`arch`)
    config = ConfigMixin.config
    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 16, out_channels: int = 16, hidden_size: int = 4096, depth: int = 48,
                 num_heads: int = 32, caption_channels: int = 4096, mlp_ratio: int = 4, adaln_tembed_dim: int = 512,
                 frequency_embedding_size: int = 256, patch_size: tuple[int, int, int] | list[int] = (1, 2, 2),
                 enable_flashattn3: bool = False, enable_flashattn2: bool = False, enable_xformers: bool = False,
                 enable_bsa: bool = False, bsa_params: dict | None = None, cp_split_hw: list[int] | None = None,
                 text_tokens_zero_pad: bool = False) -> None:
        """The arguments are upstream's config keys (the attention back-end switches and `cp_split_hw` are kept in
        the config for upstream's class and have no effect here: attention is SDPA, one device)."""
        config = {"in_channels": in_channels, "out_channels": out_channels, "hidden_size": hidden_size,
                  "depth": depth, "num_heads": num_heads, "caption_channels": caption_channels,
                  "mlp_ratio": mlp_ratio, "adaln_tembed_dim": adaln_tembed_dim,
                  "frequency_embedding_size": frequency_embedding_size, "patch_size": list(patch_size),
                  "enable_bsa": enable_bsa, "bsa_params": bsa_params, "text_tokens_zero_pad": text_tokens_zero_pad}
        # diffusers' from_pretrained(torch_dtype=...) builds the model under that default dtype
        LongcatDiT.__init__(self, config, "upstream", dtype=torch.get_default_dtype(),
                            where=f"{self.__class__.__name__} config")

    @apply_forward_hook
    def build_kv_cache(self, cond_latents: torch.Tensor) -> KVCache:
        """LongcatDiT's, behind diffusers' forward hook: with model CPU offload the weights reach the execution
        device for this call as they do for `forward` (as diffusers' VAEs do for encode/decode)."""
        return LongcatDiT.build_kv_cache(self, cond_latents)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs):
        """diffusers' loader, made strict: a missing, unexpected or mis-shaped weight is an error naming the keys
        (diffusers would warn and leave a missing weight uninitialised)."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = {name: info[name] for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[name]}
        if problems:
            described = "; ".join(f"{len(keys)} {name.replace('_', ' ')} ({_names(keys)})"
                                  for name, keys in problems.items())
            raise LongcatError(f"the transformer weights do not match {cls.__name__}: {described}",
                               pretrained_model_name_or_path, "convert the checkpoint with longcat-convert convert")
        return (model, info) if wants_info else model

    @classmethod
    def from_tree(cls, root: str | os.PathLike | Tree, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> LongCatVideoTransformer3DModel:
        """The DiT of a checkpoint tree of any layout: raw `dit/`, diffusers `transformer/`, or FastVideo's
        `transformer/` (its split projections joined through the project's key map), read by the reader `convert`
        uses and checked as strictly. `save_pretrained` then writes it in the diffusers layout's form."""
        tree = root if isinstance(root, Tree) else open_tree(root)
        expand_checked(tree)  # before anything is allocated for what the config says
        config = keymap.convert_config(tree.dit.config, tree.naming, "upstream", str(tree.config_path))
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls.from_config(config)
        finally:
            torch.set_default_dtype(previous)
        return fill_dit(model.to(device), tree)


# diffusers records a component as (top-level package, class) when the package is not one it knows; the
# package exports the class (lazily), so model_index.json says ["longcat_reference", "LongCatVideoTransformer3DModel"]
LongCatVideoTransformer3DModel.__module__ = "longcat_reference"


def _names(keys: list) -> str:
    names = [str(key[0] if isinstance(key, tuple) else key) for key in keys]
    return ", ".join(names[:SHOW]) + (", ..." if len(names) > SHOW else "")
