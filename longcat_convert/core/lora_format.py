"""The LoRA key grammar of both file formats, the one parser of adapter files, and FastVideo's scale rule.

upstream (raw/diffusers): `<prefix><module, '.' written as separator>.<part>` with parts `lora_down.weight`
[n·r, in], `lora_up.weight` [out, r] or `lora_up.blocks.<j>.weight` [out/n, r], and `alpha_scale` (0-d,
= alpha/r). Effective delta: ΔW = alpha_scale · blockdiag(U_0..U_{n-1}) · D.

fastvideo: `<module>.lora_A` [r, in], `<module>.lora_B` [out, r], `<module>.lora_alpha` (0-d); FastVideo's
loader strips `diffusion_model.` and `.weight` from a key first. It scales by int(lora_alpha) / r, or by 1
when int(lora_alpha) is 0 (`fastvideo_scale`).

The names are data: the key map's `lora` section. `parse` collects every problem of a file, typed with
validation's finding kinds: validate reports them all; convert and the reference runner raise the first error.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import cache

from . import keymap
from .dtypes import scalar_from_bytes
from .errors import Problem, raise_first_error
from .io import ByteRange, SafetensorsHeader, read_bytes, tensor_range

# Alpha scalars must decode to one exact number: these dtypes do (float8 alphas are refused).
ALPHA_DTYPES = ("F16", "BF16", "F32", "F64")
UPSTREAM_ALPHA_SHAPES = ((), (1,))  # the upstream loader's 0-d buffer also accepts a 1-element vector


# ---------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class _Names:
    prefix: str
    separator: str
    upstream: dict[str, str]  # part -> tail
    up_block: str  # tail template with {j}
    up_block_pattern: re.Pattern
    strip_prefix: str
    strip_suffix: str
    fastvideo: dict[str, str]  # part -> tail


@cache
def _names() -> _Names:
    spec = keymap.load_map_document()["lora"]
    upstream, fastvideo = spec["upstream"], spec["fastvideo"]
    parts = dict(upstream["parts"])
    up_block = parts.pop("up_block")
    before, _, after = up_block.partition("{j}")
    return _Names(upstream["module_prefix"], upstream["module_separator"], parts, up_block,
                  re.compile(re.escape(before) + r"(\d+)" + re.escape(after)), fastvideo["strip_prefix"],
                  fastvideo["strip_suffix"], dict(fastvideo["parts"]))


def part_name(fmt: str, part: str) -> str:
    """The tail a part has in a format: part_name("upstream", "alpha") == "alpha_scale"."""
    names = _names()
    return (names.upstream if fmt == "upstream" else names.fastvideo)[part]


def encode_module(module: str) -> str:
    names = _names()
    return names.prefix + module.replace(".", names.separator)


def decode_module(encoded: str) -> str | None:
    names = _names()
    if not encoded.startswith(names.prefix) or encoded == names.prefix:
        return None
    return encoded[len(names.prefix):].replace(names.separator, ".")


def upstream_key(module: str, part: str, block: int | None = None) -> str:
    """The key of a part of an upstream module (`block`: up block j)."""
    tail = _names().up_block.format(j=block) if block is not None else part_name("upstream", part)
    return f"{encode_module(module)}.{tail}"


def fastvideo_key(target: str, part: str) -> str:
    return f"{target}.{part_name('fastvideo', part)}"


def split_upstream(key: str) -> tuple[str, str, int | None] | None:
    """(module, part, up block or None) of an upstream-format key, or None when it follows no rule."""
    encoded, _, tail = key.partition(".")
    module = decode_module(encoded)
    if module is None:
        return None
    names = _names()
    block = names.up_block_pattern.fullmatch(tail)
    if block:
        return module, "up", int(block.group(1))
    part = next((p for p, t in names.upstream.items() if t == tail), None)
    return (module, part, None) if part else None


def split_fastvideo(key: str) -> tuple[str, str, None] | None:
    """(target module, part, None) of a FastVideo-format key the way FastVideo reads it, or None."""
    names = _names()
    name = key.removeprefix(names.strip_prefix).removesuffix(names.strip_suffix)
    module, _, tail = name.rpartition(".")
    part = next((p for p, t in names.fastvideo.items() if t == tail), None)
    return (module, part, None) if module and part else None


def detect_format(header: SafetensorsHeader) -> str | None:
    names = list(header.tensors)
    if names and all(n.startswith(_names().prefix) for n in names):
        return "upstream"
    if names and all(split_fastvideo(n) is not None for n in names):
        return "fastvideo"
    return None


# ------------------------------------------------------------------------------------- FastVideo's scale


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


# --------------------------------------------------------------------------------------------- parsing

REEXPORT = "re-export the adapter"  # the fix of an adapter's defect, unless its problem names another


@dataclass
class LoraModule:
    """The keys of one module of an adapter, in the file's naming (upstream module or FastVideo target).
    FastVideo's lora_A / lora_B are `down` / `up`; only the upstream format has up blocks."""

    name: str
    down: str | None = None
    up: str | None = None
    up_blocks: dict[int, str] = field(default_factory=dict)
    alpha: str | None = None
    rank: int | None = None  # of one up block, once the shapes are known to be consistent

    @property
    def ups(self) -> list[str]:
        return [self.up_blocks[j] for j in sorted(self.up_blocks)] if self.up_blocks else [self.up] if self.up else []

    @property
    def n_blocks(self) -> int:
        return len(self.up_blocks) or 1


@dataclass
class ParsedLora:
    header: SafetensorsHeader
    format: str | None  # "upstream", "fastvideo", or None for neither
    modules: dict[str, LoraModule] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)  # alpha key -> value, for each usable alpha
    problems: list[Problem] = field(default_factory=list)

    @property
    def alpha_keys(self) -> set[str]:
        return {m.alpha for m in self.modules.values() if m.alpha is not None}

    def check(self, ignore: Collection[str] = ()) -> ParsedLora:
        """This adapter, or its first error (of a kind not in `ignore`) as a one-line LongcatError."""
        raise_first_error(self.problems, self.header.path, ignore=ignore, default_fix=REEXPORT)
        return self


def parse(header: SafetensorsHeader, read: Callable[[ByteRange], bytes] = read_bytes) -> ParsedLora:
    """Group an adapter's keys by module and check every key, part, shape and alpha, collecting each problem.
    `read`: how alpha bytes are read (a conversion reads through its held source files)."""
    parsed = ParsedLora(header, detect_format(header))
    if parsed.format is None:
        names = _names()
        parsed.problems.append(Problem(
            "lora_bad_key", f"is neither an upstream LongCat LoRA ({names.prefix}… keys) nor a FastVideo LoRA "
            f"(…{' / '.join(names.fastvideo.values())} keys)", fix="check that this file is a LoRA adapter"))
        return parsed
    upstream = parsed.format == "upstream"
    for key in header.tensors:
        _add_key(parsed, key, split_upstream(key) if upstream else split_fastvideo(key))
    for module in parsed.modules.values():
        module.rank = _upstream_rank(parsed, module) if upstream else _fastvideo_rank(parsed, module)
        _check_alpha(parsed, module, read)
    if upstream:
        _check_single_rank(parsed)
    return parsed


def _add_key(parsed: ParsedLora, key: str, split: tuple[str, str, int | None] | None) -> None:
    if split is None:
        parsed.problems.append(Problem("lora_bad_key", _bad_key_message(parsed.format, key), key))
        return
    name, part, block = split
    module = parsed.modules.setdefault(name, LoraModule(name))
    before = module.up_blocks.get(block) if block is not None else getattr(module, part)
    if before is not None:
        parsed.problems.append(Problem("lora_bad_key", f"keys {before} and {key} are the same part of module {name}",
                                       key))
    elif block is not None:
        module.up_blocks[block] = key
    else:
        setattr(module, part, key)


def _bad_key_message(fmt: str, key: str) -> str:
    names = _names()
    if fmt == "upstream":
        tails = ", ".join([names.upstream["down"], names.upstream["up"], names.up_block.format(j="N")])
        return (f"key {key} is not <encoded module>.{{{tails} or {names.upstream['alpha']}}} (an unexpected key: "
                "FastVideo's converter drops such keys without a word)")
    a, b, alpha = names.fastvideo.values()
    return f"key {key} does not end in {a}, {b} or {alpha} (FastVideo ignores it without a message)"


def _shape(parsed: ParsedLora, key: str) -> tuple[int, ...]:
    return parsed.header.tensors[key].shape


def _upstream_rank(parsed: ParsedLora, module: LoraModule) -> int | None:
    """The rank of a structurally sound upstream module; each defect found becomes a problem."""
    name = module.name
    problem = _upstream_structure(parsed, module)
    if problem is None:
        down, ups = _shape(parsed, module.down), [_shape(parsed, k) for k in module.ups]
        n, rank = len(ups), ups[0][1]
        if down[0] != n * rank:
            problem = Problem("lora_rank_mismatch", f"module {name} has inconsistent shapes: lora_down has "
                              f"{down[0]} rows but {n} up block(s) of rank {rank} need {n * rank}")
        elif rank == 0:
            problem = Problem("lora_shape", f"module {name} has rank 0 (lora_down {list(down)})",
                              fix="remove the module or re-export the adapter")
    if problem is not None:
        parsed.problems.append(Problem(problem.kind, problem.message, _key(module), fix=problem.fix))
        return None
    return rank


def _upstream_structure(parsed: ParsedLora, module: LoraModule) -> Problem | None:
    names, name = _names().upstream, module.name
    missing = [n for n, v in ((names["down"], module.down), ("lora_up", module.ups)) if not v]
    if missing:
        return Problem("lora_incomplete", f"module {name} has no {' and no '.join(missing)}")
    if module.up is not None and module.up_blocks:
        return Problem("lora_shape", f"module {name} has both {names['up']} and "
                       f"{_names().up_block.partition('{j}')[0]}*")
    if sorted(module.up_blocks) != list(range(len(module.up_blocks))):
        return Problem("lora_shape", f"module {name} up blocks are numbered {sorted(module.up_blocks)}, not "
                       f"0..{len(module.up_blocks) - 1}")
    down, ups = _shape(parsed, module.down), [_shape(parsed, k) for k in module.ups]
    if len(down) != 2 or any(len(u) != 2 for u in ups):
        return Problem("lora_shape", f"module {name}: lora_down {list(down)} and lora_up {[list(u) for u in ups]} "
                       "must be matrices")
    if any(u != ups[0] for u in ups):
        return Problem("lora_shape", f"module {name}: up blocks differ in shape {[list(u) for u in ups]}")
    return None


def _fastvideo_rank(parsed: ParsedLora, module: LoraModule) -> int | None:
    names, name, key = _names().fastvideo, module.name, _key(module)
    missing = [names[p] for p in ("down", "up") if getattr(module, p) is None]
    if missing:
        parsed.problems.append(Problem("lora_incomplete", f"module {name} has no {' and no '.join(missing)}: "
                                       f"FastVideo needs {names['down']} and {names['up']} and disables LoRA on "
                                       "that layer otherwise", key))
        return None
    a, b = _shape(parsed, module.down), _shape(parsed, module.up)
    problem = None
    if len(a) != 2 or len(b) != 2:
        problem = Problem("lora_shape", f"module {name}: {names['down']} {list(a)} and {names['up']} {list(b)} "
                          "must be matrices", key)
    elif a[0] != b[1]:
        problem = Problem("lora_rank_mismatch", f"module {name}: {names['down']} {list(a)} has rank {a[0]} but "
                          f"{names['up']} {list(b)} has rank {b[1]}", key)
    elif a[0] == 0:
        problem = Problem("lora_shape", f"module {name} has rank 0 ({names['down']} {list(a)})", key,
                          fix="remove the module or re-export the adapter")
    if problem is not None:
        parsed.problems.append(problem)
        return None
    return a[0]


def _check_alpha(parsed: ParsedLora, module: LoraModule, read: Callable[[ByteRange], bytes]) -> None:
    """A missing alpha, or one that is not a single finite float, is a problem; a usable one is read."""
    upstream = parsed.format == "upstream"
    alpha_name = part_name(parsed.format, "alpha")
    if module.alpha is None:
        consequence = (f"the upstream loader's strict load refuses a file missing {alpha_name}; FastVideo's "
                       "converter would silently use scale 1.0" if upstream else "FastVideo then uses scale 1.0")
        missing_key = upstream_key(module.name, "alpha") if upstream else fastvideo_key(module.name, "alpha")
        parsed.problems.append(Problem("lora_missing_alpha", f"module {module.name} has no {alpha_name}: "
                                       f"{consequence}", missing_key))
        return
    info = parsed.header.tensors[module.alpha]
    fix = "re-export the adapter with a finite float32 alpha"
    problem = alpha_problem(info.dtype, info.shape, None, upstream)
    if problem is not None:
        parsed.problems.append(Problem("lora_shape", f"{module.alpha} {problem}", module.alpha, fix=fix))
        return
    value = scalar_from_bytes(read(tensor_range(parsed.header, module.alpha)), info.dtype)
    problem = alpha_problem(info.dtype, info.shape, value, upstream)
    if problem is not None:
        parsed.problems.append(Problem("lora_alpha_value", f"{module.alpha} {problem}", module.alpha, fix=fix))
        return
    parsed.alphas[module.alpha] = value


def _check_single_rank(parsed: ParsedLora) -> None:
    """Upstream's load_lora builds every module of an adapter with one rank."""
    ranks = {m.name: m.rank for m in parsed.modules.values() if m.rank is not None}
    if len(set(ranks.values())) < 2:
        return
    common, count = Counter(ranks.values()).most_common(1)[0]
    for name, rank in ranks.items():
        if rank != common:
            parsed.problems.append(Problem(
                "lora_rank_mismatch", f"module {name} has rank {rank} while {count} of {len(ranks)} modules have rank "
                f"{common}: upstream's load_lora builds every module with one rank, so its strict load fails", name))


# -------------------------------------------------------------------------------- against the key map


def target_problems(parsed: ParsedLora, expanded: keymap.ExpandedMap) -> list[Problem]:
    """Modules the DiT the key map describes does not have, or whose shapes do not fit it."""
    upstream = parsed.format == "upstream"
    targets = expanded.linears if upstream else {name: linear for name, (linear, _) in
                                                 expanded.linear_by_fastvideo().items()}
    problems: list[Problem] = []
    for module in parsed.modules.values():
        linear = targets.get(module.name)
        if linear is None:
            consequence = ("the DiT (the upstream loader skips it and then fails its strict load)" if upstream else
                           "FastVideo's DiT (FastVideo ignores such keys without a message)")
            problems.append(Problem("lora_unknown_module", f"targets {module.name}, which is not a Linear of "
                                    f"{consequence}", _key(module),
                                    fix="the adapter was trained for another model or another depth"))
        elif module.rank is not None:
            problems.extend((_upstream_fit if upstream else _fastvideo_fit)(parsed, module, linear))
    return problems


def _key(module: LoraModule) -> str:
    """The key a module's problems are reported under: its first part present."""
    return next(k for k in (module.down, *module.ups, module.alpha) if k is not None)


def _upstream_fit(parsed: ParsedLora, module: LoraModule, linear: keymap.LinearModule) -> list[Problem]:
    problems, key = [], _key(module)
    down, rows, n = _shape(parsed, module.down), _shape(parsed, module.ups[0])[0], module.n_blocks
    if down[1] != linear.in_features:
        problems.append(Problem("lora_shape", f"module {module.name}: lora_down {list(down)} expects {down[1]} input "
                                f"features, the Linear has {linear.in_features}", key))
    if n * rows != linear.out_features:
        problems.append(Problem("lora_shape", f"module {module.name}: {n} up block(s) of {rows} rows give {n * rows} "
                                f"outputs, the Linear has {linear.out_features}", key))
    parts = len(linear.fastvideo)
    if n > 1 and parts > 1 and n != parts:
        problems.append(Problem("lora_block_split", f"module {module.name}: {n} up blocks do not line up with its "
                                f"{parts} fused parts ({', '.join(t.rsplit('.', 1)[-1] for t in linear.fastvideo)})",
                                key, severity="warning"))
    return problems


def _fastvideo_fit(parsed: ParsedLora, module: LoraModule, linear: keymap.LinearModule) -> list[Problem]:
    a, b, out = _shape(parsed, module.down), _shape(parsed, module.up), linear.out_features // len(linear.fastvideo)
    if a[1] != linear.in_features or b[0] != out:
        return [Problem("lora_shape", f"module {module.name}: lora_B·lora_A is {b[0]}x{a[1]}, the layer is "
                        f"{out}x{linear.in_features}", _key(module))]
    return []
