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
BASE_FAMILY = "longcat_video"
AVATAR_FAMILY = "longcat_video_avatar"
FAMILIES = (BASE_FAMILY, AVATAR_FAMILY)
# What an overlay map (one with "extends") may say, and how: added to the base's, or replacing it.
_OVERLAY_ADDED = ("symbols", "derived_symbols", "flags", "drops")
_OVERLAY_REPLACED = ("configs", "layouts", "model_index", "shared_components", "non_constructor_fields",
                     "quantization", "shard_prefix", "lora", "avatar")
_OVERLAY_OWN = ("$comment", "name", "version", "extends", "modules")


@cache
def load_map_document(family: str = BASE_FAMILY) -> dict:
    """The key map of a model family, checked against its schema; an overlay map is merged onto the map it
    extends first, so shared modules keep exactly the base rules."""
    if family not in FAMILIES:
        raise LongcatError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    where = f"longcat_convert/core/maps/{family}.json"
    text = resources.files("longcat_convert.core.maps").joinpath(f"{family}.json").read_text(encoding="utf-8")
    document = parse_json(text, where)
    if "extends" in document:
        document = _merge_overlay(load_map_document(document["extends"]), document, where)
    jsonschemas.check("keymap", document, where)
    return document


def _merge_overlay(base: dict, overlay: dict, where: str) -> dict:
    unknown = sorted(set(overlay) - set(_OVERLAY_ADDED + _OVERLAY_REPLACED + _OVERLAY_OWN))
    if unknown:
        raise LongcatError(f"overlay map has fields it cannot set: {', '.join(unknown)}", where)
    merged = {key: value for key, value in base.items() if key not in ("$comment", "name", "version")}
    merged.update({key: overlay[key] for key in ("$comment", "name", "version") if key in overlay})
    for key in _OVERLAY_ADDED:
        if isinstance(base.get(key, {}), dict):
            clash = set(base.get(key, {})) & set(overlay.get(key, {}))
            if clash:
                raise LongcatError(f"overlay {key} redefine the base's {', '.join(sorted(clash))}", where)
            merged[key] = {**base.get(key, {}), **overlay.get(key, {})}
        else:
            merged[key] = base.get(key, []) + overlay.get(key, [])
    merged.update({key: overlay[key] for key in _OVERLAY_REPLACED if key in overlay})
    base_modules = base["modules"]
    taken = {entry["upstream"] for entry in base_modules}
    clash = sorted(entry["upstream"] for entry in overlay.get("modules", []) if entry["upstream"] in taken)
    if clash:
        raise LongcatError(f"overlay modules redefine base modules {', '.join(clash)}", where)
    cut = max(n for n, entry in enumerate(base_modules) if entry["scope"] == "block") + 1
    added = overlay.get("modules", [])
    added = [e for e in added if e["scope"] == "block"] + [e for e in added if e["scope"] == "global"]
    merged["modules"] = base_modules[:cut] + added + base_modules[cut:]
    return merged


def family_of(config: dict) -> str:
    """The model family a DiT config describes: the one whose class name it carries (either naming), or,
    without `_class_name`, the family whose own config fields (an overlay's symbols and flags) it has."""
    name = config.get("_class_name")
    for family in reversed(FAMILIES):
        if name is not None and name in {c["class_name"] for c in load_map_document(family)["configs"].values()}:
            return family
    if name is None:
        for family in reversed(FAMILIES[1:]):
            if any(field in config for field in _own_config_fields(family)):
                return family
    return BASE_FAMILY


@cache
def _own_config_fields(family: str) -> frozenset[str]:
    document, base = load_map_document(family), load_map_document(BASE_FAMILY)
    fields = set(document["symbols"].values()) | set(document.get("flags", {}).values())
    return frozenset(fields - set(base["symbols"].values()))


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
    family: str
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


def heads_field(naming: str, family: str = BASE_FAMILY) -> str:
    return load_map_document(family)["configs"][naming]["heads_field"]


def class_name(naming: str, family: str = BASE_FAMILY) -> str:
    return load_map_document(family)["configs"][naming]["class_name"]


def config_describes(config: dict, naming: str) -> bool:
    """The config names the class of `naming`'s DiT (of its family) or, without a class name, carries its
    head-count field."""
    name = config.get("_class_name")
    family = family_of(config)
    return name == class_name(naming, family) if name is not None else heads_field(naming, family) in config


def config_symbols(config: dict, naming: str, where: str = "config.json") -> dict[str, int]:
    """Integer symbols used by shape expressions, derived from a DiT config (flags as 0/1, under their own name)."""
    family = family_of(config)
    document = load_map_document(family)
    symbols: dict[str, int] = {}
    for symbol, config_field in document["symbols"].items():
        symbols[symbol] = _int_field(config, config_field, where)
    for symbol, terms in document.get("derived_symbols", {}).items():
        symbols[symbol] = sum(symbols[t] if not t.lstrip("-").isdigit() else int(t) for t in terms)
        if symbols[symbol] <= 0:
            raise LongcatError(f"{symbol} = {' + '.join(terms)} is {symbols[symbol]}, not positive", where)
    for flag, config_field in document.get("flags", {}).items():
        value = config.get(config_field, False)
        if not isinstance(value, bool):
            raise LongcatError(f"field {config_field!r} must be true or false, got {value!r}", where)
        symbols[flag] = int(value)
    heads = _int_field(config, heads_field(naming, family), where)
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
    for entry in _present_modules(load_map_document(family_of(config))["modules"], symbols):
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
    return _expand(family_of(config), tuple(sorted(config_symbols(config, naming, where).items())), where)


def _present_modules(entries: list[dict], symbols: dict[str, int]) -> list[dict]:
    """The module entries that exist for these symbols: those without 'when', and those whose flag is set."""
    return [entry for entry in entries if "when" not in entry or symbols[entry["when"]]]


@lru_cache(maxsize=8)
def _expand(family: str, symbol_items: tuple[tuple[str, int], ...], where: str) -> ExpandedMap:
    document = load_map_document(family)
    symbols = dict(symbol_items)
    params: list[ParamRule] = []
    linears: dict[str, LinearModule] = {}
    for entry, index in _block_major(_present_modules(document["modules"], symbols), symbols["L"]):
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
    return ExpandedMap(family, symbols, params, linears, drops)


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
    result["_class_name"] = class_name(target_naming, family_of(config))
    return result


def layouts() -> dict[str, dict]:
    """Every layout of every family (names are unique across families)."""
    return {name: spec for family in FAMILIES for name, spec in _family_layouts(family).items()}


@cache
def _family_layouts(family: str) -> dict[str, dict]:
    own = load_map_document(family)["layouts"]
    if family != BASE_FAMILY:
        clash = set(own) & set(load_map_document(BASE_FAMILY)["layouts"])
        if clash:
            raise LongcatError(f"layouts {', '.join(sorted(clash))} of {family} clash with the base map's")
    return own


def layout(name: str) -> dict:
    try:
        return layouts()[name]
    except KeyError:
        raise LongcatError(f"unknown layout {name!r}; choose one of {', '.join(layouts())}") from None


def layout_family(name: str) -> str:
    """The family whose map defines layout `name`."""
    layout(name)
    return next(family for family in FAMILIES if name in _family_layouts(family))


def model_index_spec(form: str) -> dict:
    """The model_index.json form `form` (a layout's "model_index"), from whichever family defines it."""
    for family in FAMILIES:
        spec = load_map_document(family)["model_index"].get(form)
        if spec is not None:
            return spec
    raise LongcatError(f"unknown model_index form {form!r}")


def avatar_spec() -> dict:
    """The avatar map's description of the published trees (variants, audio folders, the sibling base tree)."""
    return load_map_document(AVATAR_FAMILY)["avatar"]


def extra_dit_folders(variant: str | None, layout_name: str) -> dict[str, str]:
    """An avatar tree's DiT folders beyond the layout's `dit_dir` (1.0's multi-speaker DiT), as {folder in this
    layout: the same DiT's folder in the raw layout}."""
    if variant is None:
        return {}
    extras = avatar_spec()["variants"][variant].get("extra_dits", {})
    raw = layout(layout_name)["model_index"] is None
    return {(raw_name if raw else converted): raw_name for raw_name, converted in extras.items()}


def extra_dit_target(variant: str, raw_name: str, layout_name: str) -> str:
    """Where the extra DiT `raw_name` goes in layout `layout_name`."""
    converted = avatar_spec()["variants"][variant]["extra_dits"][raw_name]
    return raw_name if layout(layout_name)["model_index"] is None else converted


def avatar_target_layout(target: str) -> str:
    """The avatar layout a conversion `--to raw|diffusers|fastvideo` of an avatar tree writes (raw: the source's)."""
    targets = avatar_spec()["targets"]
    if target not in targets:
        raise LongcatError(f"unknown target layout {target!r}; choose one of {', '.join(targets)}")
    return targets[target]


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


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a quantized folder: its shape and the dtype it must have (None: any floating dtype)."""

    shape: tuple[int, ...]
    dtype: str | None


def quantization_spec(family: str) -> dict:
    """The map's `quantization` section (INT8 format); an error for a family without one."""
    spec = load_map_document(family).get("quantization")
    if spec is None:
        raise LongcatError(f"the {family} key map describes no quantized format")
    return spec


def quantized_modules(expanded: ExpandedMap) -> list[str]:
    """Upstream names of the Linears an INT8 folder stores quantized (every Linear but the skipped ones), in map
    order."""
    skip = quantization_spec(expanded.family)["skip_substrings"]
    return [name for name in expanded.linears if not any(pattern in name for pattern in skip)]


def int8_expected(expanded: ExpandedMap) -> dict[str, StoredTensor]:
    """The tensors of an INT8 folder (upstream naming): a quantized Linear's weight becomes `<m>.weight_int8` (int8,
    same shape) and `<m>.weight_scale` (float32, one per output row) and its bias gets the format's bias dtype;
    every other tensor keeps its name, in any floating dtype."""
    spec = quantization_spec(expanded.family)
    quantized = set(quantized_modules(expanded))
    expected: dict[str, StoredTensor] = {}
    for rule in expanded.params:
        if rule.module not in quantized:
            expected[rule.upstream] = StoredTensor(rule.shape, None)
        elif rule.param == "weight":
            expected[f"{rule.module}.{spec['weight']}"] = StoredTensor(rule.shape, "int8")
            expected[f"{rule.module}.{spec['scale']}"] = StoredTensor(rule.shape[:1], "float32")
        else:
            expected[rule.upstream] = StoredTensor(rule.shape, spec["bias_dtype"])
    return expected
