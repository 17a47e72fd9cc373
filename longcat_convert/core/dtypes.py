"""safetensors dtype names, their sizes, their torch equivalents, and the dtype names users give and read."""

from __future__ import annotations

import fnmatch
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import LongcatError

if TYPE_CHECKING:
    import torch

ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64",
}


class _Lazy(Mapping):
    """A table built on first use (they import torch): header-only commands never pay for it."""

    def __init__(self, build: Callable[[], dict]) -> None:
        self._build, self._table = build, None

    def _load(self) -> dict:
        if self._table is None:
            self._table = self._build()
        return self._table

    def __getitem__(self, key):
        return self._load()[key]

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(_TORCH_NAMES)


def _torch_table() -> dict:
    import torch

    return {name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items()}


TORCH_DTYPE = _Lazy(_torch_table)  # safetensors name -> torch.dtype
SAFETENSORS_NAME = _Lazy(lambda: {dtype: name for name, dtype in TORCH_DTYPE.items()})  # and back

_STRUCT_SCALARS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
                   "U8": "<B", "U16": "<H", "U32": "<I", "U64": "<Q", "BOOL": "<?"}


def scalar_from_bytes(data: bytes, dtype: str) -> float:
    """The first element of a buffer as a Python float, without torch (BF16 widened to F32 by padding)."""
    if dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + data[:2])[0]
    if dtype not in _STRUCT_SCALARS:
        raise ValueError(f"no scalar decoding for {dtype}")
    fmt = _STRUCT_SCALARS[dtype]
    return float(struct.unpack(fmt, data[:struct.calcsize(fmt)])[0])

def exactly_representable(value: float, dtype: str) -> bool:
    """Whether a float dtype holds `value` exactly (so writing it as a scalar changes nothing)."""
    if dtype == "F64":
        return True
    try:
        as_f32 = struct.unpack("<f", struct.pack("<f", value))[0]
        if dtype == "BF16":
            return as_f32 == value and struct.unpack("<I", struct.pack("<f", value))[0] & 0xFFFF == 0
        if dtype in ("F32", "F16"):
            fmt = "<f" if dtype == "F32" else "<e"
            return struct.unpack(fmt, struct.pack(fmt, value))[0] == value and as_f32 == value
    except (OverflowError, struct.error):
        return False
    return False


FLOATING = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})

# The user-facing dtype names (--dtype, reports): torch's names of these floating dtypes, in the order
# options list them. Every user takes the names it supports (`dtype_names`, `torch_dtype`).
DTYPE_NAMES: dict[str, str] = {_TORCH_NAMES[name]: name for name in ("F32", "BF16", "F16", "F64")}
FRIENDLY: dict[str, str] = {name: user for user, name in DTYPE_NAMES.items()}


def dtype_names(*names: str) -> dict[str, str]:
    """user-facing name -> safetensors name, for the names a command supports."""
    return {name: DTYPE_NAMES[name] for name in names}


POLICY_NAMES = dtype_names("bfloat16", "float16", "float32")  # what convert's --dtype casts weights to


def friendly(dtype: str) -> str:
    return FRIENDLY.get(dtype, dtype)


def torch_dtype(dtype: str | torch.dtype, supported: Sequence[str]) -> torch.dtype:
    """The torch dtype of a user-facing name (or a torch dtype) among `supported`; imports torch."""
    table = {name: TORCH_DTYPE[DTYPE_NAMES[name]] for name in supported}
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    if not isinstance(dtype, str) and dtype in table.values():
        return dtype
    *rest, last = supported
    raise LongcatError(f"unsupported dtype {dtype!r}; choose {', '.join(rest) + ' or ' if rest else ''}{last}")


def is_floating(dtype: str) -> bool:
    return dtype in FLOATING


@dataclass
class DtypePolicy:
    """What a conversion does to dtypes: cast every floating tensor to `target` (None keeps it), except those
    whose output name matches a `keep_fp32` glob, which become float32. Integer tensors never change."""

    target: str | None = None  # safetensors dtype name, None keeps the source dtype
    keep_fp32: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, dtype: str, keep_fp32: tuple[str, ...]) -> DtypePolicy:
        if dtype != "keep" and dtype not in POLICY_NAMES:
            raise LongcatError(f"--dtype must be keep, {', '.join(POLICY_NAMES)}; got {dtype!r}")
        return cls(None if dtype == "keep" else POLICY_NAMES[dtype], tuple(keep_fp32))

    def resolve(self, name: str, source_dtype: str) -> str:
        if not is_floating(source_dtype):
            return source_dtype
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep_fp32):
            return "F32"
        return self.target or source_dtype

    def describe(self) -> dict:
        return {"dtype": self.target or "keep", "keep_fp32": list(self.keep_fp32)}

    @classmethod
    def from_description(cls, description: object, where: str | None = None) -> DtypePolicy:
        """The inverse of describe() (a manifest's dtype_policy); refuses a policy convert never writes."""
        dtype = description.get("dtype") if isinstance(description, dict) else None
        keep = description.get("keep_fp32") if isinstance(description, dict) else None
        if dtype != "keep" and dtype not in POLICY_NAMES.values():
            raise LongcatError(f"dtype policy {dtype!r} is not one convert writes (keep, "
                               f"{', '.join(POLICY_NAMES.values())})", where, "the manifest was altered or is corrupt")
        if not isinstance(keep, list) or not all(isinstance(pattern, str) for pattern in keep):
            raise LongcatError(f"dtype policy keep_fp32 {keep!r} is not a list of patterns", where,
                               "the manifest was altered or is corrupt")
        return cls(None if dtype == "keep" else dtype, tuple(keep))
