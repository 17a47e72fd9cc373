"""Pure planning: from what was read (configs, headers, LoRA alphas) to which output tensor comes from
which source bytes, in which shard, in which dtype. No I/O happens here.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

from .core import keymap
from .core.dtypes import ITEMSIZE, POLICY_NAMES, DtypePolicy, exactly_representable
from .core.errors import LongcatError, raise_first_error
from .core.io import index_name, parse_json, shard_name
from .core.io.reader import CHUNK_BYTES
from .core.lora_format import (
    REEXPORT,
    LoraModule,
    TargetPart,
    fastvideo_key,
    fastvideo_represents,
    fastvideo_scale,
    fused_targets,
    target_problems,
    upstream_key,
)
from .core.tree import Adapter, Skipped, Tree
from .core.versions import diffusers_version
from .sharding import group_into_shards

LORA_BLOCKS_METADATA = "longcat_convert.lora_up_blocks"


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) (and optionally columns) of tensor `key` in source file `file`."""

    file: str
    key: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None

    def to_json(self) -> dict:
        body: dict = {"file": self.file, "key": self.key}
        if self.rows is not None:
            body["rows"] = list(self.rows)
        if self.cols is not None:
            body["cols"] = list(self.cols)
        return body


@dataclass(frozen=True)
class OutputTensor:
    """One tensor to write. op: rows (concatenate row blocks), blockdiag (place sources on the diagonal
    of a zero matrix), scalar (`value`), dequant (INT8 rows times their scales, in `dtype`), int8_weight /
    int8_scale (upstream's INT8 quantisation of the sources' rows, concatenated). `multiplier` scales values (only for LoRA alpha rescaling)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source_dtype: str
    op: str
    sources: tuple[Slice, ...]
    rule: str
    value: float | None = None
    multiplier: float | None = None
    work_dtype: str | None = None  # int8_weight / int8_scale: the dtype the weight is cast to before quantising

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def is_byte_copy(self) -> bool:
        return self.op == "rows" and self.dtype == self.source_dtype and self.multiplier is None


@dataclass(frozen=True)
class ShardPlan:
    file: str  # relative to the destination
    tensors: tuple[OutputTensor, ...]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class IndexPlan:
    file: str
    weight_map: dict[str, str]
    total_size: int


@dataclass(frozen=True)
class DropCheck:
    file: str
    key: str
    require: str
    reason: str


@dataclass(frozen=True)
class FileCopy:
    """A file carried over unchanged (its folder renamed when it sits in the DiT folder)."""

    source: str  # relative to the source root
    target: str  # relative to the destination
    nbytes: int


@dataclass(frozen=True)
class AdapterPlan:
    name: str
    source_file: str
    source_format: str
    target_file: str
    target_format: str
    modules: int
    shard: ShardPlan
    notes: tuple[str, ...] = ()


@dataclass
class ConversionPlan:
    source_layout: str
    target_layout: str
    dit_shards: list[ShardPlan]
    indexes: list[IndexPlan]
    copies: list[FileCopy]
    json_files: dict[str, dict]  # relative path -> content
    adapters: list[AdapterPlan]
    drops: list[DropCheck]
    policy: DtypePolicy
    expanded: keymap.ExpandedMap  # the key map of the source DiT config the plan was made from
    census_before: dict[str, dict[str, int]] = field(default_factory=dict)
    census_after: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def shards(self) -> list[ShardPlan]:
        return self.dit_shards + [a.shard for a in self.adapters]

    @property
    def tensor_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def copy_bytes(self) -> int:
        return sum(c.nbytes for c in self.copies)

    def to_json(self) -> dict:
        """Everything the plan decides, as JSON (the dry-run report, and the fingerprint --resume checks)."""
        return {
            "source_layout": self.source_layout, "target_layout": self.target_layout,
            "shards": [{"file": s.file, "metadata": s.metadata, "bytes": s.nbytes,
                        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "op": t.op,
                                     "source_dtype": t.source_dtype, "value": t.value, "multiplier": t.multiplier,
                                     **({"work_dtype": t.work_dtype} if t.work_dtype else {}),
                                     "sources": [x.to_json() for x in t.sources]} for t in s.tensors]}
                       for s in self.shards],
            "indexes": [{"file": i.file, "total_size": i.total_size} for i in self.indexes],
            "copies": [{"source": c.source, "target": c.target, "bytes": c.nbytes} for c in self.copies],
            "skipped": [{"path": k.path, "reason": k.reason} for k in self.skipped],
            "written": sorted(self.json_files), "dtype_policy": self.policy.describe(),
            "census": {"before": self.census_before, "after": self.census_after},
        }

    def working_memory_bytes(self) -> int:
        """What executing the plan holds at once, beyond the interpreter: chunks in flight (the one being read, two
        queued, one being written, one being hashed; a cast also queues two source chunks for the thread hashing
        the source bytes and hashes a third) and two copies of the largest block-diagonal tensor, built whole."""
        built_whole = max((t.nbytes for s in self.shards for t in s.tensors if t.op != "rows"), default=0)
        casts = any(not t.is_byte_copy for s in self.shards for t in s.tensors if t.op == "rows")
        return (5 + (3 if casts else 0)) * CHUNK_BYTES + 2 * built_whole

    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for s in self.shards for t in s.tensors), default=0)


@dataclass(frozen=True)
class PlanOptions:
    target_layout: str
    policy: DtypePolicy = field(default_factory=DtypePolicy)
    max_shard_bytes: int = 5 * 10**9
    lora_alpha_fix: str = "refuse"  # or "rescale"
    to_int8: bool = False  # write the DiT in upstream's INT8 format (avatar 1.5, raw layout)


# ----------------------------------------------------------------------------------------------- DiT


def _check_dit_keys(tree: Tree, expanded: keymap.ExpandedMap) -> list[DropCheck]:
    """The droppable norm keys present, once the DiT's keys and shapes are exactly those its config implies."""
    naming = tree.naming
    on_disk = tree.dit.key_files
    drops = [DropCheck(on_disk[k], k, expanded.drops[k].require, expanded.drops[k].reason)
             for k in on_disk if naming == "upstream" and k in expanded.drops]
    found = {key: tree.dit.info(key).shape for key in on_disk}
    expected = ({k: t.shape for k, t in keymap.int8_expected(expanded).items()} if tree.int8
                else expanded.expected_shapes(naming))
    mismatch = keymap.compare_key_sets(found, expected, {drop.key for drop in drops})
    if mismatch:
        raise LongcatError(f"the DiT's tensors do not match the key set its config implies: {mismatch.describe()}",
                           tree.root / tree.dit.folder, "the config does not match the weights, or this is not a "
                           "LongCat-Video DiT of the expected architecture")
    return drops


def _dequantized_outputs(tree: Tree, rule: keymap.ParamRule, target_naming: str,
                         policy: DtypePolicy) -> list[OutputTensor]:
    """A quantised Linear's weight from its INT8 rows and their scales (op `dequant`), split like any fused
    weight; the output dtype is --dtype's (upstream's QuantizedLinear computes its weight in the input dtype)."""
    spec = keymap.quantization_spec(tree.family)
    q_key, s_key = f"{rule.module}.{spec['weight']}", f"{rule.module}.{spec['scale']}"
    if policy.target is None or policy.target not in ("F32", "BF16"):
        raise LongcatError("an INT8 DiT is dequantised to float32 or bfloat16", tree.root / tree.dit.folder,
                           "pass --dtype float32 or --dtype bfloat16 with --from-int8")
    if tree.dit.info(q_key).dtype != "I8" or tree.dit.info(s_key).dtype != "F32":
        raise LongcatError(f"{q_key} / {s_key} are {tree.dit.info(q_key).dtype} / {tree.dit.info(s_key).dtype}, "
                           "not int8 / float32", tree.root / tree.dit.folder, "use the INT8 folder as upstream wrote it")
    names = rule.keys(target_naming)
    rows = rule.shape[0] // len(names)
    outputs = []
    for part, name in enumerate(names):
        span = (part * rows, (part + 1) * rows) if len(names) > 1 else None
        sources = (Slice(tree.dit.key_files[q_key], q_key, span), Slice(tree.dit.key_files[s_key], s_key, span))
        shape = rule.shapes(target_naming)[name]
        outputs.append(OutputTensor(name, shape, policy.target, "I8", "dequant", sources, "dequant"))
    return outputs


def _quantized_outputs(tree: Tree, rule: keymap.ParamRule, spec: dict, policy: DtypePolicy) -> list[OutputTensor]:
    """A Linear's weight in upstream's INT8 format: int8 rows (op `int8_weight`) and their float32 scales (op
    `int8_scale`), both computed from the whole (fused) weight, whatever naming its parts have in the source,
    after the cast --dtype asks for (upstream quantises the model in the dtype it was loaded in)."""
    source_keys = rule.keys(tree.naming)
    dtypes = {tree.dit.info(k).dtype for k in source_keys}
    if len(dtypes) > 1:
        raise LongcatError(f"the parts of {rule.upstream} have different dtypes {sorted(dtypes)}",
                           tree.root / tree.dit.folder, "cast the checkpoint to one dtype first")
    source_dtype = dtypes.pop()
    sources = tuple(Slice(tree.dit.key_files[k], k) for k in source_keys)
    work = policy.resolve(rule.upstream, source_dtype)
    return [OutputTensor(f"{rule.module}.{spec['weight']}", rule.shape, "I8", source_dtype, "int8_weight", sources,
                         "quantize", work_dtype=work),
            OutputTensor(f"{rule.module}.{spec['scale']}", rule.shape[:1], "F32", source_dtype, "int8_scale", sources,
                         "quantize", work_dtype=work)]


def _int8_policy(name: str, spec: dict, quantized: set[str], policy: DtypePolicy) -> DtypePolicy:
    """Biases of quantised Linears are stored in the format's bias dtype; everything else follows --dtype."""
    module = name.rsplit(".", 1)[0]
    if module in quantized:
        return DtypePolicy(POLICY_NAMES[spec["bias_dtype"]])
    return policy


def _dit_outputs(tree: Tree, expanded: keymap.ExpandedMap, target_naming: str, policy: DtypePolicy,
                 to_int8: bool = False) -> list[OutputTensor]:
    source_naming = tree.naming
    outputs = []
    quantized = set(keymap.quantized_modules(expanded)) if tree.int8 or to_int8 else set()
    spec = keymap.quantization_spec(expanded.family) if quantized else {}
    for rule in expanded.params:
        if rule.module in quantized and rule.param == "weight":
            outputs += (_quantized_outputs(tree, rule, spec, policy) if to_int8
                        else _dequantized_outputs(tree, rule, target_naming, policy))
            continue
        source_keys = rule.keys(source_naming)
        dtypes = {tree.dit.info(k).dtype for k in source_keys}
        if len(dtypes) > 1:
            raise LongcatError(f"the parts of {rule.upstream} have different dtypes {sorted(dtypes)}",
                               tree.root / tree.dit.folder, "cast the checkpoint to one dtype first")
        source_dtype = dtypes.pop()
        slices = [Slice(tree.dit.key_files[k], k) for k in source_keys]
        for name, shape, sources in _regroup(rule, source_naming, target_naming, slices):
            chosen = _int8_policy(name, spec, quantized, policy) if to_int8 else policy
            outputs.append(OutputTensor(name, shape, chosen.resolve(name, source_dtype), source_dtype, "rows",
                                        tuple(sources), rule.rule_name))
    return outputs


def _regroup(rule: keymap.ParamRule, source_naming: str, target_naming: str, slices: list[Slice]):
    """(output name, shape, source slices) for one rule: identity, split along dim 0, or concatenation."""
    if source_naming == target_naming or rule.parts == 1:
        for name, source in zip(rule.keys(target_naming), slices, strict=True):
            yield name, rule.shapes(target_naming)[name], [source]
    elif target_naming == "fastvideo":
        rows = rule.part_shape()[0]
        for part, name in enumerate(rule.fastvideo):
            yield name, rule.part_shape(), [Slice(slices[0].file, slices[0].key, (part * rows, (part + 1) * rows))]
    else:
        yield rule.upstream, rule.shape, slices


def _shard(outputs: list[OutputTensor], folder: str, prefix: str, max_bytes: int,
           always_index: bool = False) -> tuple[list[ShardPlan], list[IndexPlan]]:
    by_name = {t.name: t for t in outputs}
    groups = group_into_shards([(t.name, t.nbytes) for t in outputs], max_bytes)
    shards, weight_map = [], {}
    for number, names in enumerate(groups, start=1):
        file = f"{folder}/{shard_name(prefix, number, len(groups))}"
        # widest dtypes first keeps every tensor aligned to its element size, as the reference writer does
        tensors = sorted((by_name[n] for n in names), key=lambda t: -ITEMSIZE[t.dtype])
        shards.append(ShardPlan(file, tuple(tensors), {"format": "pt"}))
        weight_map.update(dict.fromkeys(names, file.rsplit("/", 1)[1]))
    indexes = []
    if len(groups) > 1 or always_index:
        indexes.append(IndexPlan(f"{folder}/{index_name(prefix)}", weight_map, sum(t.nbytes for t in outputs)))
    return shards, indexes


# ---------------------------------------------------------------------------------------------- LoRA


def _adapter_target_file(adapter: Adapter, source_layout: str, target_layout: str) -> str:
    """Where an adapter goes: same place when the format stays; otherwise into (fastvideo) or out of (upstream)
    its own folder lora/<subfolder>/, keeping any folders above it."""
    source, target = keymap.layout(source_layout), keymap.layout(target_layout)
    parents = PurePosixPath(adapter.file).parent.relative_to(source["lora_dir"]).parts
    if adapter.format != target["lora_format"]:
        if adapter.format == "fastvideo" and parents:
            parents = parents[:-1]
        if target["lora_format"] == "fastvideo":
            parents = (*parents, target["lora_subdirs"].get(adapter.name, adapter.name))
    return "/".join([target["lora_dir"], *parents, f"{adapter.name}.safetensors"])


def _fastvideo_alpha(adapter: Adapter, module: str, alpha_scale: float, rank: int, fix: str) -> tuple[float, float | None]:
    """(lora_alpha, multiplier for B) such that FastVideo's scale (`fastvideo_scale`) reproduces alpha_scale."""
    if fastvideo_represents(alpha_scale, rank):
        return alpha_scale * rank, None
    if fix == "rescale":
        return float(rank), alpha_scale
    lora_alpha = alpha_scale * rank
    if lora_alpha != int(lora_alpha):
        why = "is not an integer, and FastVideo applies int(lora_alpha)/rank"
    else:
        why = "truncates to 0, which FastVideo reads as 'no alpha'"
    raise LongcatError(f"LoRA module {module!r}: alpha_scale·rank = {alpha_scale:g}·{rank} = {lora_alpha:g} {why}: it "
                       f"would scale by {fastvideo_scale(lora_alpha, rank):g} instead of {alpha_scale:g}",
                       adapter.header.path, "pass --lora-alpha-fix rescale to fold the scale into lora_B exactly")


def _scalar_dtype(value: float, preferred: str) -> str:
    """The source's dtype for a computed scalar, widened when it cannot hold the value exactly."""
    return next(d for d in (preferred, "F32", "F64") if exactly_representable(value, d))


def _upstream_to_fastvideo(adapter: Adapter, expanded: keymap.ExpandedMap, policy: DtypePolicy,
                           fix: str) -> tuple[list[OutputTensor], dict[str, int]]:
    header = adapter.header
    outputs: list[OutputTensor] = []
    blocks_used: dict[str, int] = {}
    for module, record in adapter.lora.modules.items():
        linear = expanded.linears[module]
        blocks_used[module] = record.n_blocks
        alpha_scale = adapter.lora.alphas[record.alpha]
        ups = record.ups
        down_dtype = header.tensors[record.down].dtype
        up_dtype = header.tensors[ups[0]].dtype
        parts = fused_targets(linear.out_features, record.n_blocks, len(linear.fastvideo), record.rank)
        for target, part in zip(linear.fastvideo, parts, strict=True):
            lora_alpha, multiplier = _fastvideo_alpha(adapter, module, alpha_scale, part.rank, fix)
            a_name, b_name, alpha_name = (fastvideo_key(target, role) for role in ("down", "up", "alpha"))
            b_sources = tuple(Slice(adapter.file, ups[block], None if part.whole_block(index) else part.rows[index])
                              for index, block in enumerate(part.blocks))
            b_op = "rows" if len(b_sources) == 1 else "blockdiag"
            a_rows = None if part.down_rows == (0, header.tensors[record.down].shape[0]) else part.down_rows
            outputs.append(OutputTensor(a_name, (part.rank, linear.in_features), policy.resolve(a_name, down_dtype),
                                        down_dtype, "rows", (Slice(adapter.file, record.down, a_rows),), "lora_down rows"))
            outputs.append(OutputTensor(b_name, (linear.out_features // len(parts), part.rank),
                                        policy.resolve(b_name, up_dtype), up_dtype, b_op, b_sources, f"lora_up {b_op}",
                                        multiplier=multiplier))
            alpha_dtype = _scalar_dtype(lora_alpha, header.tensors[record.alpha].dtype)
            outputs.append(OutputTensor(alpha_name, header.tensors[record.alpha].shape, alpha_dtype, alpha_dtype,
                                        "scalar", (Slice(adapter.file, record.alpha),), "alpha_scale·rank",
                                        value=lora_alpha))
    return outputs, blocks_used


def _fastvideo_to_upstream(adapter: Adapter, expanded: keymap.ExpandedMap, policy: DtypePolicy,
                           fix: str) -> list[OutputTensor]:
    header = adapter.header
    by_target = expanded.linear_by_fastvideo()
    grouped: dict[str, dict[int, LoraModule]] = {}
    for name, record in adapter.lora.modules.items():
        linear, part = by_target[name]
        grouped.setdefault(linear.upstream, {})[part] = record
    hints = _block_hints(header)
    outputs: list[OutputTensor] = []
    for module, parts in grouped.items():
        linear = expanded.linears[module]
        target_count = len(linear.fastvideo)
        if sorted(parts) != list(range(target_count)):
            raise LongcatError(f"LoRA for {module!r} covers only {len(parts)} of its {target_count} FastVideo "
                               "targets; the upstream format needs all of them", header.path)
        records_in_order = [parts[target] for target in range(target_count)]
        block_count = hints.get(module) or _infer_blocks(linear, records_in_order[0].rank)
        outputs.extend(_module_to_upstream(adapter, linear, records_in_order, block_count, policy, fix))
    return outputs


def _block_hints(header) -> dict[str, int]:
    """The up-block count per module that our own FastVideo output records in its metadata."""
    text = header.metadata.get(LORA_BLOCKS_METADATA)
    if text is None:
        return {}
    hints = parse_json(text, header.path, "remove the corrupt metadata entry " + LORA_BLOCKS_METADATA)
    if not isinstance(hints, dict) or not all(isinstance(count, int) and not isinstance(count, bool) and count > 0
                                              for count in hints.values()):
        raise LongcatError(f"metadata {LORA_BLOCKS_METADATA} is not a map of module names to block counts",
                           header.path, "remove the corrupt metadata entry")
    return hints


def _infer_blocks(linear: keymap.LinearModule, rank: int) -> int:
    """Without our metadata: one up block per target for a fused module, else the map's published hint."""
    if len(linear.fastvideo) > 1:
        return len(linear.fastvideo)
    return linear.lora_up_blocks if rank % linear.lora_up_blocks == 0 else 1


def _module_to_upstream(adapter: Adapter, linear: keymap.LinearModule, records: list[LoraModule], block_count: int,
                        policy: DtypePolicy, fix: str) -> list[OutputTensor]:
    """The inverse of `_upstream_to_fastvideo` for one module: each up block is read back from the column band
    and rows it occupies in each target's lora_B, its lora_down rows from the first target holding it.

    Targets with different scales (possible in FastVideo's format, not in upstream's one alpha_scale per
    module) need `fix == "rescale"`: the first target's scale becomes alpha_scale and each up block is
    multiplied by its target's scale / alpha_scale."""
    header, file, module = adapter.header, adapter.file, linear.upstream
    out = linear.out_features
    ranks = [record.rank for record in records]
    scales = [fastvideo_scale(adapter.lora.alphas[record.alpha], record.rank) for record in records]
    layout = _fused_layout(out, block_count, ranks)
    if layout is None:
        raise LongcatError(f"LoRA for {module!r}: its {len(records)} target(s) have ranks {ranks}, which one upstream "
                           f"module with {block_count} up block(s) cannot express", header.path)
    holders = [[(target, part.blocks.index(block)) for target, part in enumerate(layout) if block in part.blocks]
               for block in range(block_count)]
    multipliers = _block_multipliers(adapter, module, scales, holders, fix)
    block_rank = layout[0].rank_per_block
    up_names = ([upstream_key(module, "up")] if block_count == 1
                else [upstream_key(module, "up", block) for block in range(block_count)])
    a_dtype, b_dtype = header.tensors[records[0].down].dtype, header.tensors[records[0].up].dtype
    down_sources, ups = [], []
    for block_holders in holders:
        first_target, first_band = block_holders[0]
        band_rows = (first_band * block_rank, (first_band + 1) * block_rank)
        down_sources.append(Slice(file, records[first_target].down, _unless_whole(band_rows, ranks[first_target])))
        pieces = []
        for target, band in block_holders:
            part = layout[target]
            first_row = sum(stop - start for start, stop in part.rows[:band])
            start, stop = part.rows[band]
            cols = None if len(part.blocks) == 1 else (band * block_rank, (band + 1) * block_rank)
            rows = _unless_whole((first_row, first_row + stop - start), out // len(records))
            pieces.append(Slice(file, records[target].up, rows, cols))
        ups.append(pieces)
    down_name = upstream_key(module, "down")
    outputs = [OutputTensor(down_name, (block_count * block_rank, linear.in_features),
                            policy.resolve(down_name, a_dtype), a_dtype, "rows", tuple(down_sources), "lora_A concat")]
    for name, sources, multiplier in zip(up_names, ups, multipliers, strict=True):
        outputs.append(OutputTensor(name, (out // block_count, block_rank), policy.resolve(name, b_dtype), b_dtype,
                                    "rows", tuple(sources), "lora_B blocks", multiplier=multiplier))
    alpha_key = records[0].alpha
    alpha_dtype = _scalar_dtype(scales[0], header.tensors[alpha_key].dtype)
    outputs.append(OutputTensor(upstream_key(module, "alpha"), header.tensors[alpha_key].shape, alpha_dtype, alpha_dtype,
                                "scalar", (Slice(file, alpha_key),), "int(lora_alpha)/rank", value=scales[0]))
    return outputs


def _block_multipliers(adapter: Adapter, module: str, scales: list[float], holders: list[list[tuple[int, int]]],
                       fix: str) -> list[float | None]:
    """Per up block, the factor folding its target's scale into it (None: none needed)."""
    if len(set(scales)) == 1:
        return [None] * len(holders)
    if fix != "rescale":
        raise LongcatError(f"LoRA for {module!r}: its FastVideo targets have different scales {scales}, and the "
                           "upstream format has one alpha_scale per module", adapter.header.path,
                           "pass --lora-alpha-fix rescale to fold each target's scale into its up block exactly")
    multipliers: list[float | None] = []
    for block_holders in holders:
        factors = {scales[target] / scales[0] for target, _ in block_holders}
        if len(factors) != 1:
            raise LongcatError(f"LoRA for {module!r}: an up block spans targets with different scales {scales}, "
                               "which the upstream format cannot express", adapter.header.path)
        factor = factors.pop()
        multipliers.append(None if factor == 1 else factor)
    return multipliers


def _fused_layout(out: int, block_count: int, ranks: list[int]) -> list[TargetPart] | None:
    """The target layout of an upstream module with `block_count` up blocks whose FastVideo targets (one per
    rank given) have these ranks; None when no such module exists."""
    target_count = len(ranks)
    if out % block_count or out % target_count:
        return None
    blocks_per_first_target = len(fused_targets(out, block_count, target_count, 1)[0].blocks)
    block_rank = ranks[0] // blocks_per_first_target
    layout = fused_targets(out, block_count, target_count, block_rank)
    return layout if block_rank > 0 and [part.rank for part in layout] == ranks else None


def _unless_whole(rows: tuple[int, int], length: int) -> tuple[int, int] | None:
    return None if rows == (0, length) else rows


def _plan_adapter(adapter: Adapter, source_layout: str, expanded: keymap.ExpandedMap,
                  options: PlanOptions) -> AdapterPlan:
    target = keymap.layout(options.target_layout)
    target_file = _adapter_target_file(adapter, source_layout, options.target_layout)
    metadata = {"format": "pt"}
    notes: list[str] = []
    raise_first_error(target_problems(adapter.lora, expanded), adapter.header.path, default_fix=REEXPORT)
    if adapter.format == target["lora_format"]:
        alphas = adapter.lora.alpha_keys  # never cast
        outputs = [OutputTensor(k, i.shape, i.dtype if k in alphas else options.policy.resolve(k, i.dtype),
                                i.dtype, "rows", (Slice(adapter.file, k),), "identity")
                   for k, i in adapter.header.tensors.items()]
        modules = len(adapter.lora.modules)
        metadata.update({k: v for k, v in adapter.header.metadata.items() if k == LORA_BLOCKS_METADATA})
    elif target["lora_format"] == "fastvideo":
        outputs, blocks = _upstream_to_fastvideo(adapter, expanded, options.policy, options.lora_alpha_fix)
        metadata[LORA_BLOCKS_METADATA] = json.dumps(blocks, sort_keys=True)
        modules = len(blocks)
        notes = [f"{t.name}: B scaled by {t.multiplier} so that int(lora_alpha)/rank is exact"
                 for t in outputs if t.multiplier is not None]
    else:
        outputs = _fastvideo_to_upstream(adapter, expanded, options.policy, options.lora_alpha_fix)
        modules = sum(1 for t in outputs if t.op == "scalar")  # one alpha_scale per module
    shard = ShardPlan(target_file, tuple(outputs), metadata)
    return AdapterPlan(adapter.name, adapter.file, adapter.format, target_file, target["lora_format"], modules,
                       shard, tuple(notes))


# ------------------------------------------------------------------------------------------ top level


def _census(entries: list[tuple[str, int]]) -> dict[str, dict[str, int]]:
    counts: Counter = Counter()
    sizes: Counter = Counter()
    for dtype, nbytes in entries:
        counts[dtype] += 1
        sizes[dtype] += nbytes
    return {d: {"tensors": counts[d], "bytes": sizes[d]} for d in sorted(counts)}


def _model_index(target_layout: str, dit_config: dict, extra_components: list[str] = ()) -> dict | None:
    form = keymap.layout(target_layout)["model_index"]
    if form is None:
        return None
    spec = keymap.model_index_spec(form)
    body = {"_class_name": spec["_class_name"], "_diffusers_version": diffusers_version()}
    if "workload_type" in spec:
        body["workload_type"] = spec["workload_type"]
    body.update({name: list(pair) for name, pair in spec["components"].items()})
    body.update({name: list(spec["optional_components"][name]) for name in extra_components})
    return body


def _carried_over(tree: Tree, target_layout: str, dit_dir: str,
                  extra_dirs: dict[str, str] | None = None) -> tuple[list[FileCopy], list[Skipped]]:
    """Files copied unchanged (DiT-folder extras follow the folder's new name) and files left out (a folder the
    written DiT takes the place of: an INT8 output replaces the source's INT8 folder)."""
    renames = [(tree.dit.folder + "/", dit_dir + "/")] + [(f"{a}/", f"{b}/") for a, b in (extra_dirs or {}).items()]
    renames += _avatar_renames(tree, target_layout)
    copies, skipped = [], list(tree.skipped)
    for other in tree.other_files:
        target = _renamed(other.path, renames)
        if target.startswith(dit_dir + "/") and not other.path.startswith(tree.dit.folder + "/"):
            skipped.append(Skipped(other.path, f"replaced by the DiT this conversion writes to {dit_dir}/"))
        else:
            copies.append(FileCopy(other.path, target, other.nbytes))
    if tree.model_index is not None and keymap.layout(target_layout)["model_index"] is None:
        skipped.append(Skipped("model_index.json", f"the {target_layout} layout has no model_index.json"))
    return copies, skipped


def _avatar_renames(tree: Tree, target_layout: str) -> list[tuple[str, str]]:
    """Folder prefixes an avatar conversion renames: the audio encoder folder (published name <-> audio_encoder/)
    and the sibling base tree's components, which a converted tree holds at its root."""
    if tree.avatar_variant is None:
        return []
    spec = keymap.avatar_spec()
    audio_dir = spec["variants"][tree.avatar_variant]["audio_dir"]

    def audio_folder(layout_name: str) -> str:
        return (audio_dir if keymap.layout(layout_name)["model_index"] is None else spec["audio_component"]) + "/"

    return [(audio_folder(tree.layout), audio_folder(target_layout)), (f"../{spec['sibling']}/", "")]


def _renamed(path: str, renames: list[tuple[str, str]]) -> str:
    for source, target in renames:
        if path.startswith(source):
            return target + path[len(source):]
    return path


def _check_unique_targets(plan_files: list[str], root) -> None:
    seen: set[str] = set()
    for file in plan_files:
        if file in seen:
            raise LongcatError(f"two source files would both be written to {file}", root,
                               "rename one of them in the source tree")
        seen.add(file)


def _plan_extra_dit(tree: Tree, target_dir: str, target_naming: str,
                    options: PlanOptions) -> tuple[list[ShardPlan], list[IndexPlan], dict, list[DropCheck]]:
    """Shards, index, config and drop checks of a second DiT (`tree` reads it as its `dit`)."""
    where = str(tree.root / tree.dit.folder / "config.json")
    expanded = keymap.expand(tree.dit.config, tree.naming, where)
    drops = _check_dit_keys(tree, expanded)
    outputs = _dit_outputs(tree, expanded, target_naming, options.policy)
    shards, indexes = _shard(outputs, target_dir, keymap.load_map_document()["shard_prefix"], options.max_shard_bytes)
    return shards, indexes, keymap.convert_config(tree.dit.config, tree.naming, target_naming, where), drops


def _int8_target(tree: Tree, options: PlanOptions) -> tuple[str, dict]:
    """(DiT folder, quantization spec) of an INT8 output; refused unless an avatar 1.5 tree goes to its raw layout."""
    int8_dir = keymap.avatar_spec()["variants"].get(tree.avatar_variant or "", {}).get("int8_dir")
    if int8_dir is None or keymap.layout(options.target_layout)["model_index"] is not None or tree.int8:
        raise LongcatError("--to-int8 writes base_model_int8/ of a LongCat-Video-Avatar 1.5 tree in the raw layout, "
                           "from its float DiT", tree.root, "convert an avatar 1.5 tree with --to raw, without "
                           "--from-int8")
    return int8_dir, keymap.quantization_spec(tree.family)


def plan_conversion(tree: Tree, options: PlanOptions) -> ConversionPlan:
    target = keymap.layout(options.target_layout)
    source_naming, target_naming = tree.naming, target["naming"]
    config_where = str(tree.config_path)
    expanded = keymap.expand(tree.dit.config, source_naming, config_where)
    drops = _check_dit_keys(tree, expanded)
    dit_outputs = _dit_outputs(tree, expanded, target_naming, options.policy, options.to_int8)
    dit_dir, prefix = target["dit_dir"], keymap.load_map_document()["shard_prefix"]
    json_files: dict[str, dict] = {}
    if options.to_int8:
        dit_dir, spec = _int8_target(tree, options)
        prefix = spec["shard_prefix"]
        json_files[f"{dit_dir}/quantization_config.json"] = {
            "quantization_method": spec["method"], "skip_patterns": list(spec["skip_substrings"]),
            "description": "Weight-only INT8 quantization with per-channel symmetric scaling"}
    shards, indexes = _shard(dit_outputs, dit_dir, prefix, options.max_shard_bytes, always_index=options.to_int8)
    adapters = [_plan_adapter(adapter, tree.layout, expanded, options) for adapter in tree.adapters]
    json_files[f"{dit_dir}/config.json"] = keymap.convert_config(tree.dit.config, source_naming, target_naming,
                                                                  config_where)
    extra_dirs: dict[str, str] = {}
    for folder, dit in tree.extra_dits.items():  # avatar 1.0's multi-speaker DiT: planned like the main one
        raw_name = keymap.extra_dit_folders(tree.avatar_variant, tree.layout)[folder]
        target_dir = keymap.extra_dit_target(tree.avatar_variant, raw_name, options.target_layout)
        extra_dirs[folder] = target_dir
        more_shards, more_indexes, config, extra_drops = _plan_extra_dit(replace(tree, dit=dit), target_dir,
                                                                         target_naming, options)
        shards, indexes, drops = shards + more_shards, indexes + more_indexes, drops + extra_drops
        json_files[f"{target_dir}/config.json"] = config
        dit_outputs += [t for shard in more_shards for t in shard.tensors]
    model_index = _model_index(options.target_layout, tree.dit.config, list(extra_dirs.values()))
    if model_index is not None:
        json_files["model_index.json"] = model_index
    copies, skipped = _carried_over(tree, options.target_layout, dit_dir, extra_dirs)
    _check_unique_targets([s.file for s in shards] + [a.shard.file for a in adapters] + [i.file for i in indexes]
                          + list(json_files) + [c.target for c in copies], tree.root)
    before = [(d.info(k).dtype, d.info(k).nbytes) for d in (tree.dit, *tree.extra_dits.values()) for k in d.key_files]
    before += [(i.dtype, i.nbytes) for a in tree.adapters for i in a.header.tensors.values()]
    after = [(t.dtype, t.nbytes) for s in shards + [a.shard for a in adapters] for t in s.tensors]
    return ConversionPlan(tree.layout, options.target_layout, shards, indexes, copies, json_files,
                          adapters, drops, options.policy, expanded, _census(before), _census(after), skipped)
