"""The declarative key map: load it, check it against its schema, and expand it for a DiT config.

Expansion turns module entries into concrete parameter rules (`blocks.{i}` repeated `depth` times,
shapes evaluated from config symbols). One expanded map serves conversion in both directions,
validation's expected key set and LoRA module mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

from . import jsonschemas
from .errors import LongcatError
from .io.jsonfile import parse_json

NAMINGS = ("upstream", "fastvideo")


@cache
def load_map_document() -> dict:
    text = resources.files("longcat_convert.core.maps").joinpath("longcat_video.json").read_text(encoding="utf-8")
    document = parse_json(text, "longcat_convert/core/maps/longcat_video.json")
    jsonschemas.check("keymap", document, "longcat_convert/core/maps/longcat_video.json")
    return document


@dataclass(frozen=True)
class ParamRule:
    """One upstream tensor and the tensor(s) it becomes in the FastVideo naming.

    `parts` > 1 means the upstream tensor is the dim-0 concatenation of the FastVideo tensors.
    """

    module: str  # upstream module name, e.g. blocks.3.attn.qkv
    kind: str
    param: str
    upstream: str
    fastvideo: tuple[str, ...]
    shape: tuple[int, ...]  # upstream (fused) shape

    @property
    def parts(self) -> int:
        return len(self.fastvideo)

    @property
    def rule_name(self) -> str:
        return f"split{self.parts}" if self.parts > 1 else "rename" if self.fastvideo[0] != self.upstream else "identity"

    def keys(self, naming: str) -> tuple[str, ...]:
        return (self.upstream,) if naming == "upstream" else self.fastvideo

    def part_shape(self) -> tuple[int, ...]:
        return (self.shape[0] // self.parts, *self.shape[1:])

    def shapes(self, naming: str) -> dict[str, tuple[int, ...]]:
        if naming == "upstream":
            return {self.upstream: self.shape}
        return {name: self.part_shape() for name in self.fastvideo}


@dataclass(frozen=True)
class LinearModule:
    """A Linear a LoRA can target: its upstream name, FastVideo name(s) and features."""

    upstream: str
    fastvideo: tuple[str, ...]
    in_features: int
    out_features: int  # upstream (fused) output features
    lora_up_blocks: int


@dataclass(frozen=True)
class DropRule:
    key: str
    require: str  # "ones" or "zeros"
    reason: str


@dataclass
class ExpandedMap:
    config_symbols: dict[str, int]
    params: list[ParamRule]
    linears: dict[str, LinearModule]
    drops: dict[str, DropRule]

    def expected_shapes(self, naming: str) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for rule in self.params:
            shapes.update(rule.shapes(naming))
        return shapes

    def linear_by_fastvideo(self) -> dict[str, tuple[LinearModule, int]]:
        return {name: (mod, part) for mod in self.linears.values() for part, name in enumerate(mod.fastvideo)}

    @property
    def num_params(self) -> int:
        return sum(math.prod(rule.shape) for rule in self.params)


def heads_field(naming: str) -> str:
    return load_map_document()["configs"][naming]["heads_field"]


def class_name(naming: str) -> str:
    return load_map_document()["configs"][naming]["class_name"]


def config_describes(config: dict, naming: str) -> bool:
    """The config names the class of `naming`'s DiT or, without a class name, carries its head-count field."""
    name = config.get("_class_name")
    return name == class_name(naming) if name is not None else heads_field(naming) in config


def config_symbols(config: dict, naming: str, where: str = "config.json") -> dict[str, int]:
    """Integer symbols used by shape expressions, derived from a DiT config."""
    document = load_map_document()
    symbols: dict[str, int] = {}
    for symbol, config_field in document["symbols"].items():
        symbols[symbol] = _int_field(config, config_field, where)
    heads = _int_field(config, heads_field(naming), where)
    patch = config.get("patch_size")
    if not (isinstance(patch, list) and len(patch) == 3 and all(_is_pos_int(p) for p in patch)):
        raise LongcatError(f"patch_size must be a list of 3 positive integers, got {patch!r}", where)
    if symbols["H"] % heads:
        raise LongcatError(f"hidden_size {symbols['H']} is not divisible by {heads} heads", where)
    mlp_ratio = config.get("mlp_ratio")
    if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or mlp_ratio <= 0:
        raise LongcatError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}", where)
    symbols.update(n_h=heads, d=symbols["H"] // heads, p_t=patch[0], p_h=patch[1], p_w=patch[2])
    symbols["F"] = ffn_hidden_size(symbols["H"], mlp_ratio)
    symbols["P_out"] = patch[0] * patch[1] * patch[2] * symbols["C_out"]
    return symbols


def ffn_hidden_size(hidden: int, mlp_ratio: float) -> int:
    """SwiGLU width: two thirds of hidden·mlp_ratio, rounded up to a multiple of 256."""
    return 256 * math.ceil(int(2 * hidden * mlp_ratio / 3) / 256)


def _is_pos_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _int_field(config: dict, name: str, where: str) -> int:
    value = config.get(name)
    if not _is_pos_int(value):
        raise LongcatError(f"field {name!r} must be a positive integer, got {value!r}", where,
                           f"set {name} in the DiT config")
    return value


def evaluate(expression: str, symbols: dict[str, int]) -> int:
    """Evaluate a product such as `6*H` or `p_t*p_h`; the schema allows nothing else."""
    result = 1
    for term in expression.split("*"):
        result *= int(term) if term.isdigit() else symbols[term]
    return result


def implied_size(config: dict, naming: str = "upstream", where: str = "config.json") -> tuple[int, int]:
    """(tensors, parameters) of the DiT a config describes, in `naming`, computed without expanding the blocks:
    constant time whatever `depth` says, so it can bound a config before anything iterates over it."""
    symbols = config_symbols(config, naming, where)
    tensors = parameters = 0
    for entry in load_map_document()["modules"]:
        repeat = symbols["L"] if entry["scope"] == "block" else 1
        parts = len(entry["fastvideo"]) if naming == "fastvideo" and isinstance(entry["fastvideo"], list) else 1
        for shape_exprs in entry["params"].values():
            tensors += repeat * parts
            parameters += repeat * math.prod(evaluate(e, symbols) for e in shape_exprs)
    return tensors, parameters


def check_fits(config: dict, naming: str, where: str, tensors_held: int, parameters_held: int) -> None:
    """Refuse a config describing far more tensors or parameters than the weight files hold: an absurd `depth`
    or `hidden_size` would otherwise drive loops and allocations long before a key is compared. The margin
    (twice what is held) leaves near misses — a missing block, a shrunk tensor — to the key report, which
    names them; the work that follows stays bounded by the files' size."""
    tensors, parameters = implied_size(config, naming, where)
    if tensors > 2 * tensors_held + 64 or parameters > 2 * parameters_held + 2**20:
        raise LongcatError(f"describes a DiT of {tensors:,} tensors and {parameters:,} parameters (depth "
                           f"{config.get('depth')}, hidden_size {config.get('hidden_size')}), but its weight files hold "
                           f"{tensors_held:,} tensors and {parameters_held:,} values", where,
                           "use the config that came with these weights")


def expand(config: dict, naming: str = "upstream", where: str = "config.json") -> ExpandedMap:
    """The concrete rules for a DiT described by `config` (whose field names follow `naming`). Computed once per
    distinct architecture: `validate` and the planner of one conversion share the expansion (do not mutate it)."""
    return _expand(tuple(sorted(config_symbols(config, naming, where).items())), where)


@lru_cache(maxsize=8)
def _expand(symbol_items: tuple[tuple[str, int], ...], where: str) -> ExpandedMap:
    document = load_map_document()
    symbols = dict(symbol_items)
    params: list[ParamRule] = []
    linears: dict[str, LinearModule] = {}
    for entry, index in _block_major(document["modules"], symbols["L"]):
        upstream = entry["upstream"].format(i=index)
        targets = entry["fastvideo"] if isinstance(entry["fastvideo"], list) else [entry["fastvideo"]]
        targets = tuple(t.format(i=index) for t in targets)
        for param, shape_exprs in entry["params"].items():
            shape = tuple(evaluate(e, symbols) for e in shape_exprs)
            if shape[0] % len(targets):
                raise LongcatError(f"{upstream}.{param} rows {shape[0]} do not split into {len(targets)} parts", where)
            params.append(ParamRule(upstream, entry["kind"], param, f"{upstream}.{param}",
                                    tuple(f"{t}.{param}" for t in targets), shape))
        if entry["kind"] == "linear":
            weight = tuple(evaluate(e, symbols) for e in entry["params"]["weight"])
            linears[upstream] = LinearModule(upstream, targets, weight[1], weight[0],
                                             entry.get("lora_up_blocks", 1))
    drops = {}
    for entry in document["drops"]:
        for index in _indices(entry["scope"], symbols["L"]):
            module = entry["upstream"].format(i=index)
            for param, require in entry["require"].items():
                drops[f"{module}.{param}"] = DropRule(f"{module}.{param}", require, entry["reason"])
    return ExpandedMap(symbols, params, linears, drops)


def _block_major(entries: list[dict], depth: int):
    """(entry, block index) pairs: leading globals, then block 0's entries, block 1's, …, then trailing globals.

    Block-major order keeps each block's tensors together, so a shard holds whole blocks."""
    first = next(n for n, e in enumerate(entries) if e["scope"] == "block")
    blocks = [e for e in entries if e["scope"] == "block"]
    head = [e for e in entries[:first] if e["scope"] == "global"]
    tail = [e for e in entries[first:] if e["scope"] == "global"]
    yield from ((e, 0) for e in head)
    for index in range(depth):
        yield from ((e, index) for e in blocks)
    yield from ((e, 0) for e in tail)


def _indices(scope: str, depth: int) -> range:
    return range(depth) if scope == "block" else range(1)


def convert_config(config: dict, source_naming: str, target_naming: str, where: str = "config.json") -> dict:
    """Rewrite a DiT config from one naming to the other (heads field and class name)."""
    source_heads, target_heads = heads_field(source_naming), heads_field(target_naming)
    result = dict(config)
    if source_heads != target_heads:
        if target_heads in result and result[target_heads] != result.get(source_heads):
            raise LongcatError(f"both {source_heads!r} and {target_heads!r} are set and disagree", where,
                               "remove the wrong one from the config")
        result[target_heads] = result.pop(source_heads)
    result["_class_name"] = class_name(target_naming)
    return result


def layouts() -> dict[str, dict]:
    return load_map_document()["layouts"]


def layout(name: str) -> dict:
    try:
        return layouts()[name]
    except KeyError:
        raise LongcatError(f"unknown layout {name!r}; choose one of {', '.join(layouts())}") from None


@dataclass(frozen=True)
class KeyMismatch:
    """How a set of tensors differs from the one a config implies (each list sorted by key)."""

    missing: list[str]
    unexpected: list[str]
    misshaped: list[str]
    found: dict[str, tuple[int, ...]]
    expected: dict[str, tuple[int, ...]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def describe(self, shown: int = 5) -> str:
        """One line: counts and the first few names of each kind."""
        def names(keys: list[str]) -> str:
            return "(" + ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "") + ")"

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing {names(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected {names(self.unexpected)}")
        if self.misshaped:
            listed = ", ".join(f"{k} {list(self.found[k])} != {list(self.expected[k])}" for k in self.misshaped[:shown])
            parts.append(f"{len(self.misshaped)} with wrong shape ({listed}{', ...' if len(self.misshaped) > shown else ''})")
        return "; ".join(parts)


def compare_key_sets(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                     ignore: set[str] | frozenset[str] = frozenset()) -> KeyMismatch:
    """The keys of `expected` absent from `found`, those of `found` not expected (except `ignore`d ones), and
    those present in both with another shape."""
    return KeyMismatch(sorted(k for k in expected if k not in found),
                       sorted(k for k in found if k not in expected and k not in ignore),
                       sorted(k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])),
                       found, expected)
