"""The two LoRA file formats, parsed from safetensors headers into typed module records.

upstream (raw/diffusers): `lora___lorahyphen___<module, '.'→'___lorahyphen___'>.<tail>` with tails
`lora_down.weight` [n·r, in], `lora_up.weight` [out, r] or `lora_up.blocks.<j>.weight` [out/n, r],
and `alpha_scale` (0-d, = alpha/r). Effective delta: ΔW = alpha_scale · blockdiag(U_0..U_{n-1}) · D.

fastvideo: `<module>.lora_A` [r, in], `<module>.lora_B` [out, r], `<module>.lora_alpha` (0-d).
FastVideo's loader scales by int(lora_alpha) / r.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LongcatError
from .io import SafetensorsHeader

PREFIX = "lora___lorahyphen___"
SEPARATOR = "___lorahyphen___"
_UP_BLOCK = re.compile(r"^lora_up\.blocks\.(\d+)\.weight$")
FASTVIDEO_TAILS = ("lora_A", "lora_B", "lora_alpha")


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
    alpha = header.tensors[record.alpha].shape
    if len(down) != 2 or any(len(u) != 2 for u in ups) or alpha not in ((), (1,)):
        raise LongcatError(f"LoRA module {record.module!r} has tensors of the wrong rank "
                           f"(down {list(down)}, up {[list(u) for u in ups]}, alpha {list(alpha)})", where)
    n = record.n_blocks
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
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise LongcatError(f"LoRA module {record.module!r}: lora_A {list(a)} and lora_B {list(b)} "
                               "do not share a rank", header.path)
    return modules


def adapter_name(path: Path) -> str:
    """Adapters are named by file stem (cfg_step_lora, refinement_lora, …)."""
    return path.stem
