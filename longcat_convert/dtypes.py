"""safetensors dtype names, their sizes, and their torch equivalents."""

from __future__ import annotations

import torch

ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

TORCH_DTYPE: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}
SAFETENSORS_NAME: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPE.items()}

FLOATING = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})

# user-facing names for the --dtype policy
POLICY_NAMES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
FRIENDLY: dict[str, str] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def friendly(dtype: str) -> str:
    return FRIENDLY.get(dtype, dtype)


def is_floating(dtype: str) -> bool:
    return dtype in FLOATING
