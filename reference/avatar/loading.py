"""Load the avatar DiT from one weight folder: the bf16/fp32 DiT (`avatar_single/`, `avatar_multi/`,
`base_model/`: `config.json` + `diffusion_pytorch_model*.safetensors` [+ index]) or the INT8 one
(`base_model_int8/`: `config.json` + `quantized_model*.safetensors` [+ `quantized_model.safetensors.index.json`]).

The folder is read by the project's one shard-folder scanner; the key set (names and shapes) must be exactly
the model's before any tensor is read. Values are copied into the model's dtype (INT8 buffers keep theirs:
int8, fp32 scales, bf16 biases, as upstream's loader does).
"""

from __future__ import annotations

from pathlib import Path

import torch

from longcat_convert.core import keymap
from longcat_convert.core.errors import LongcatError, raise_first_error
from longcat_convert.core.io import DirectFiles, read_json_object, read_tensor
from longcat_convert.core.shard_folder import FIXES, FolderRules, ShardFolder, scan_shard_folder

from ..loading import check_key_set
from .dit import LongcatAvatarDiT
from .int8 import int8_shapes, quantized_roles
from .params import SlotsFor, expected_shapes, upstream_slots

DIT_PREFIX = "diffusion_pytorch_model"
INT8_PREFIX = "quantized_model"
CONFIG = "config.json"


def load_avatar_dit(folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    slots_for: SlotsFor = upstream_slots, naming: str = "upstream") -> LongcatAvatarDiT:
    """The avatar DiT of a bf16/fp32 weight folder, computing in `dtype`."""
    return _load(Path(folder), DIT_PREFIX, False, dtype, device, slots_for, naming)


def load_avatar_int8(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                     slots_for: SlotsFor = upstream_slots, naming: str = "upstream") -> LongcatAvatarDiT:
    """The avatar DiT of an INT8 folder. Upstream's loader rounds every non-quantised tensor to bf16 (whatever the
    file holds) and computes in bf16; `dtype=torch.float32` runs those same bf16-rounded values in fp32, as
    upstream's model does after `.float()` (dequantisation then exact in fp32)."""
    return _load(Path(folder), INT8_PREFIX, True, dtype, device, slots_for, naming)


def _load(folder: Path, prefix: str, int8: bool, dtype: torch.dtype, device: torch.device | str,
          slots_for: SlotsFor, naming: str) -> LongcatAvatarDiT:
    config_path = folder / CONFIG
    config = read_json_object(config_path, fix="restore the config.json that came with the weights")
    scan = _scan(folder, prefix)
    found = {key: info.shape for key, (_, info) in scan.located.items()}
    # bounds and key set before anything is allocated: an absurd config is refused in constant time
    keymap.check_fits(config, naming, str(config_path), len(found), sum(i.numel for _, i in scan.located.values()))
    slots = slots_for(config, str(config_path))
    quantized = quantized_roles(slots) if int8 else frozenset()
    expected = expected_shapes({role: slot for role, slot in slots.items() if role not in quantized})
    for role in quantized:
        expected.update(int8_shapes(slots[role]))
    check_key_set(found, expected, folder, "avatar DiT weights")
    model = LongcatAvatarDiT(config, dtype, device, str(config_path), lambda *_: slots, int8=int8, naming=naming)
    _check_int8_dtypes(scan, model, folder)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, (name, _) in scan.located.items():
            value = read_tensor(scan.headers[name], key)
            if int8 and key not in buffers:
                value = value.to(torch.bfloat16)  # upstream's INT8 loader casts every other tensor to bf16
            state[key].copy_(value)
    return model


def _scan(folder: Path, prefix: str) -> ShardFolder:
    if not folder.is_dir():
        raise LongcatError("is not a folder", folder, "point at the DiT weight folder (config.json + *.safetensors)")
    scan = scan_shard_folder(folder, FolderRules(prefix, names_matter=True), DirectFiles())
    raise_first_error(scan.problems, fixes=FIXES)
    return scan


def _check_int8_dtypes(scan: ShardFolder, model: LongcatAvatarDiT, folder: Path) -> None:
    """Quantised weights must be int8 (a float copied into an int8 buffer would be truncated silently)."""
    for role in sorted(model.int8_roles):
        key = f"{model.slots[role].paths[0]}.weight_int8"
        dtype = scan.located[key][1].dtype
        if dtype != "I8":
            raise LongcatError(f"{key} is {dtype}, not I8: not an INT8 checkpoint", folder,
                               "load a bf16/fp32 folder with load_avatar_dit")
