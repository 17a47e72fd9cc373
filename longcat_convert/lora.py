"""The two LoRA file formats, parsed from safetensors headers into typed module records.

upstream (raw/diffusers): `lora___lorahyphen___<module, '.'→'___lorahyphen___'>.<tail>` with tails
`lora_down.weight` [n·r, in], `lora_up.weight` [out, r] or `lora_up.blocks.<j>.weight` [out/n, r],
and `alpha_scale` (0-d, = alpha/r). Effective delta: ΔW = alpha_scale · blockdiag(U_0..U_{n-1}) · D.

fastvideo: `<module>.lora_A` [r, in], `<module>.lora_B` [out, r], `<module>.lora_alpha` (0-d).
FastVideo's loader scales by int(lora_alpha) / r, or by 1 when int(lora_alpha) is 0 (`fastvideo_scale`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .dtypes import scalar_from_bytes
from .errors import LongcatError
from .io import ByteRange, SafetensorsHeader, read_bytes, tensor_range

PREFIX = "lora___lorahyphen___"
SEPARATOR = "___lorahyphen___"
_UP_BLOCK = re.compile(r"^lora_up\.blocks\.(\d+)\.weight$")
FASTVIDEO_TAILS = ("lora_A", "lora_B", "lora_alpha")
ALPHA_SUFFIXES = ("alpha_scale", "lora_alpha")  # the scalar key of a module, in either format


# Alpha scalars must decode to one exact number: these dtypes do (float8 alphas are refused).
ALPHA_DTYPES = ("F16", "BF16", "F32", "F64")
UPSTREAM_ALPHA_SHAPES = ((), (1,))  # the upstream loader's 0-d buffer also accepts a 1-element vector


def fastvideo_scale(lora_alpha: float, rank: int) -> float:
    """The scale FastVideo applies when it merges an adapter (its default path, layers/lora/linear.py):
    int(lora_alpha)/rank, except 1.0 when int(lora_alpha) is 0, which it takes for "no alpha given".
    `lora_alpha` must be finite."""
    alpha = int(lora_alpha)
    return alpha / rank if alpha and rank else 1.0


def fastvideo_represents(alpha_scale: float, rank: int) -> bool:
    """Whether lora_alpha = alpha_scale·rank makes FastVideo apply exactly alpha_scale."""
    lora_alpha = alpha_scale * rank
    return lora_alpha == int(lora_alpha) and int(lora_alpha) != 0 and fastvideo_scale(lora_alpha, rank) == alpha_scale


def alpha_problem(dtype: str, shape: tuple[int, ...], value: float | None, upstream: bool) -> str | None:
    """Why an alpha scalar (alpha_scale / lora_alpha) cannot be used, or None. `value` None: not yet read."""
    if dtype not in ALPHA_DTYPES:
        return f"is {dtype}; an alpha must be a float16/bfloat16/float32/float64 scalar"
    if (upstream and shape not in UPSTREAM_ALPHA_SHAPES) or (not upstream and math.prod(shape) != 1):
        return f"has shape {list(shape)}; an alpha must be a single value (shape [] or [1])"
    if value is not None and not math.isfinite(value):
        return f"is {value}; an alpha must be a finite number"
    return None


@dataclass(frozen=True)
class TargetPart:
    """How FastVideo target t of a fused Linear is made from the upstream factors (lora_down, n up blocks).

    Target t owns the output rows [t·out/k, (t+1)·out/k); up block j produces rows [j·out/n, (j+1)·out/n).
    Its lora_B is the overlapping rows of the blocks it meets, placed block-diagonally (one column band of
    `rank_per_block` per block), and its lora_A the matching contiguous rows of lora_down. Exact for any n, k.
    """

    blocks: tuple[int, ...]  # up blocks that meet the target, ascending
    rows: tuple[tuple[int, int], ...]  # for each, the rows of that up block inside the target
    block_rows: int  # rows of one up block (out/n)
    rank_per_block: int

    @property
    def rank(self) -> int:
        return len(self.blocks) * self.rank_per_block

    @property
    def down_rows(self) -> tuple[int, int]:
        return self.blocks[0] * self.rank_per_block, (self.blocks[-1] + 1) * self.rank_per_block

    def whole_block(self, index: int) -> bool:
        return self.rows[index] == (0, self.block_rows)


def fused_targets(out_features: int, n_blocks: int, k_targets: int, rank_per_block: int) -> list[TargetPart]:
    """The TargetPart of each of the k FastVideo targets (both `out_features` divisible by n and by k)."""
    if out_features % n_blocks or out_features % k_targets:
        raise ValueError(f"{out_features} outputs do not split into {n_blocks} blocks and {k_targets} targets")
    block_rows, target_rows = out_features // n_blocks, out_features // k_targets
    parts = []
    for t in range(k_targets):
        begin, end = t * target_rows, (t + 1) * target_rows
        blocks = tuple(range(begin // block_rows, (end - 1) // block_rows + 1))
        rows = tuple((max(begin, j * block_rows) - j * block_rows, min(end, (j + 1) * block_rows) - j * block_rows)
                     for j in blocks)
        parts.append(TargetPart(blocks, rows, block_rows, rank_per_block))
    return parts


def decode_alpha(header: SafetensorsHeader, key: str, read: Callable[[ByteRange], bytes] = read_bytes) -> float:
    """The value of an alpha scalar whose dtype and shape `alpha_problem` accepted."""
    info = header.tensors[key]
    return scalar_from_bytes(read(tensor_range(header, key)), info.dtype)


def read_alpha(header: SafetensorsHeader, key: str, upstream: bool,
               read: Callable[[ByteRange], bytes] = read_bytes) -> float:
    """The value of an alpha scalar; one-line error when it is not a single finite float. `read`: how its
    bytes are read (a conversion reads through its held source files)."""
    info = header.tensors[key]
    problem = alpha_problem(info.dtype, info.shape, None, upstream)
    value = None
    if problem is None:
        value = decode_alpha(header, key, read)
        problem = alpha_problem(info.dtype, info.shape, value, upstream)
    if problem is not None or value is None:
        raise LongcatError(f"LoRA key {key!r} {problem}", header.path,
                           "re-export the adapter with a finite float32 alpha")
    return value


def encode_module(module: str) -> str:
    return PREFIX + module.replace(".", SEPARATOR)


def decode_module(encoded: str) -> str | None:
    if not encoded.startswith(PREFIX):
        return None
    return encoded[len(PREFIX):].replace(SEPARATOR, ".")


@dataclass
class UpstreamLoraModule:
    module: str
    down: str | None = None
    up: str | None = None  # single up-projection key
    up_blocks: dict[int, str] = field(default_factory=dict)
    alpha: str | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.up_blocks) or 1

    def up_keys(self) -> list[str]:
        return [self.up_blocks[j] for j in sorted(self.up_blocks)] if self.up_blocks else [self.up] if self.up else []


@dataclass
class FastVideoLoraModule:
    module: str
    a: str | None = None
    b: str | None = None
    alpha: str | None = None


def detect_format(header: SafetensorsHeader) -> str:
    names = list(header.tensors)
    if names and all(n.startswith(PREFIX) for n in names):
        return "upstream"
    if names and all(n.rsplit(".", 1)[-1] in FASTVIDEO_TAILS for n in names):
        return "fastvideo"
    raise LongcatError("is neither an upstream LongCat LoRA (lora___lorahyphen___… keys) nor a FastVideo LoRA "
                       "(…lora_A/lora_B/lora_alpha keys)", header.path, "check that this file is a LoRA adapter")


def parse_upstream(header: SafetensorsHeader) -> dict[str, UpstreamLoraModule]:
    """Group an upstream-format adapter's keys by module, checking every key and shape."""
    modules: dict[str, UpstreamLoraModule] = {}
    for key in header.tensors:
        encoded, _, tail = key.partition(".")
        module = decode_module(encoded)
        if module is None or not tail:
            raise LongcatError(f"LoRA key {key!r} does not follow the upstream naming", header.path)
        record = modules.setdefault(module, UpstreamLoraModule(module))
        block = _UP_BLOCK.match(tail)
        if tail == "lora_down.weight":
            record.down = key
        elif tail == "lora_up.weight":
            record.up = key
        elif block:
            record.up_blocks[int(block.group(1))] = key
        elif tail == "alpha_scale":
            record.alpha = key
        else:
            raise LongcatError(f"LoRA key {key!r} has an unknown part {tail!r}", header.path,
                               "expected lora_down.weight, lora_up.weight, lora_up.blocks.N.weight or alpha_scale")
    for record in modules.values():
        _check_upstream_module(header, record)
    return modules


def _check_upstream_module(header: SafetensorsHeader, record: UpstreamLoraModule) -> None:
    where = header.path
    if record.down is None or not record.up_keys() or record.alpha is None:
        missing = [n for n, v in (("lora_down", record.down), ("lora_up", record.up_keys()),
                                  ("alpha_scale", record.alpha)) if not v]
        raise LongcatError(f"LoRA module {record.module!r} lacks {', '.join(missing)}", where,
                           "the upstream loader refuses such a file; re-export the adapter")
    if record.up and record.up_blocks:
        raise LongcatError(f"LoRA module {record.module!r} has both lora_up.weight and lora_up.blocks", where)
    if record.up_blocks and sorted(record.up_blocks) != list(range(len(record.up_blocks))):
        raise LongcatError(f"LoRA module {record.module!r} up blocks are not numbered 0..n-1: "
                           f"{sorted(record.up_blocks)}", where)
    down = header.tensors[record.down].shape
    ups = [header.tensors[k].shape for k in record.up_keys()]
    alpha = header.tensors[record.alpha]
    problem = alpha_problem(alpha.dtype, alpha.shape, None, upstream=True)
    if problem:
        raise LongcatError(f"LoRA key {record.alpha!r} {problem}", where, "re-export the adapter")
    if len(down) != 2 or any(len(u) != 2 for u in ups):
        raise LongcatError(f"LoRA module {record.module!r} has tensors of the wrong rank "
                           f"(down {list(down)}, up {[list(u) for u in ups]})", where)
    n = record.n_blocks
    if down[0] == 0:
        raise LongcatError(f"LoRA module {record.module!r} has rank 0 (lora_down {list(down)})", where,
                           "remove the module or re-export the adapter")
    if down[0] % n or any(u[1] != down[0] // n for u in ups) or len({u[0] for u in ups}) != 1:
        raise LongcatError(f"LoRA module {record.module!r}: down {list(down)} and up {[list(u) for u in ups]} "
                           f"do not form {n} blocks of one rank", where)


def upstream_rank(header: SafetensorsHeader, record: UpstreamLoraModule) -> int:
    return header.tensors[record.down].shape[0] // record.n_blocks


def parse_fastvideo(header: SafetensorsHeader) -> dict[str, FastVideoLoraModule]:
    modules: dict[str, FastVideoLoraModule] = {}
    for key in header.tensors:
        module, _, tail = key.rpartition(".")
        if tail not in FASTVIDEO_TAILS or not module:
            raise LongcatError(f"LoRA key {key!r} does not end in lora_A, lora_B or lora_alpha", header.path)
        setattr(modules.setdefault(module, FastVideoLoraModule(module)), {"lora_A": "a", "lora_B": "b",
                                                                          "lora_alpha": "alpha"}[tail], key)
    for record in modules.values():
        missing = [n for n, v in (("lora_A", record.a), ("lora_B", record.b), ("lora_alpha", record.alpha)) if not v]
        if missing:
            raise LongcatError(f"LoRA module {record.module!r} lacks {', '.join(missing)}", header.path,
                               "FastVideo skips such a module; re-export the adapter")
        a, b = header.tensors[record.a].shape, header.tensors[record.b].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] == 0:
            raise LongcatError(f"LoRA module {record.module!r}: lora_A {list(a)} and lora_B {list(b)} "
                               "do not share a non-zero rank", header.path)
        alpha = header.tensors[record.alpha]
        problem = alpha_problem(alpha.dtype, alpha.shape, None, upstream=False)
        if problem:
            raise LongcatError(f"LoRA key {record.alpha!r} {problem}", header.path, "re-export the adapter")
    return modules


def adapter_name(path: Path) -> str:
    """Adapters are named by file stem (cfg_step_lora, refinement_lora, …)."""
    return path.stem
