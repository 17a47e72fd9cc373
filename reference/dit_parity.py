"""Weights-level parity between a raw (upstream-named) tree and a converted tree (forward level:
forward_parity.py).

weights: every converted DiT tensor must have the dtype the conversion's dtype policy gives it and equal,
bit for bit, the rows of its source tensor that the key map assigns to it (cast to that dtype, where the
policy asked for a cast); every LoRA tensor must have its policy dtype too, and every LoRA module's
effective ΔW = scale·B·A must match the source's (relative Frobenius error, computed from the low-rank
factors so it stays cheap for the full model). The policy is the converted tree's conversion.json
`dtype_policy`; a tree without one keeps every source dtype unless the caller names the dtype it was
cast to. A dtype the policy did not produce is a failure even when the values survive the cast.

It returns a plain JSON-able dict with a top-level `passed`. Problems with the raw side or the
arguments raise LongcatError; problems found in the converted tree are reported, not raised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from longcat_convert.core import jsonschemas, keymap
from longcat_convert.core.dtypes import DTYPE_NAMES, POLICY_NAMES, SAFETENSORS_NAME, TORCH_DTYPE, DtypePolicy
from longcat_convert.core.errors import LongcatError, raise_first_error
from longcat_convert.core.int8 import dequantize_rows, quantize_rows
from longcat_convert.core.io import read_header, read_json_object
from longcat_convert.core.layout_detect import avatar_variant_of_layout, detect_layout
from longcat_convert.core.lora_delta import AdapterDeltas, Term, compare_deltas
from longcat_convert.core.lora_format import split_fastvideo, split_upstream, upstream_key
from longcat_convert.core.shard_folder import FIXES
from longcat_convert.core.tree import DitFiles

from .loading import Tree, expand_checked, lora_paths, open_tree
from .lora_layers import read_adapter
from .metrics import json_number

LIST_LIMIT = 20
DEFAULT_THRESHOLDS = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
BASE_CASES = ("plain", "cond", "kvcache")
# tolerance on the relative ΔW error, by the least precise dtype involved
LORA_RTOL = {"F64": 1e-6, "F32": 1e-6, "F16": 2e-3, "BF16": 1e-2}
MANIFEST = "conversion.json"


# ==== weights level =================================================================================

def weights_parity(raw_tree: str | Path, converted_tree: str | Path, lora_rtol: float | None = None,
                   dtype: str | None = None, from_int8: bool = False) -> dict:
    """Cases: `config` (architecture fields), `dit` (every tensor) and `lora:<name>` per LoRA of either tree; an
    avatar 1.0 tree adds `config:<folder>` and `dit:<folder>` for its multi-speaker DiT.

    dtype: for a converted tree without conversion.json, the dtype (float32, bfloat16, float16) its floating
    tensors were cast to; without it every tensor must keep its source dtype. from_int8: the converted tree was
    converted `--from-int8`: its DiT is checked against upstream's dequantisation of the raw INT8 folder. A
    converted tree holding only an INT8 DiT (`--to-int8`) is checked against upstream's quantisation of the raw
    DiT (int8 rows and float32 scales, bit for bit)."""
    raw, converted = open_pair(raw_tree, converted_tree, int8=from_int8)
    expected = _expected_dtypes(converted, dtype)
    source_map = expand_checked(raw)
    cases = []
    for suffix, raw_dit, converted_dit in _dit_folders(raw, converted):
        if converted_dit is None:
            absent = {"passed": False, "error": f"the converted tree has no {suffix[1:]}/ (the DiT of {raw_dit.folder}/)"}
            cases += [{"name": f"config{suffix}", **absent}, {"name": f"dit{suffix}", "raw_folder": raw_dit.folder,
                                                                **absent}]
            continue
        raw_side, converted_side = replace(raw, dit=raw_dit), replace(converted, dit=converted_dit)
        dit = _compare_tensors(raw_side, converted_side, expand_checked(raw_side), expected)
        if expected.error:
            dit = {**dit, "passed": False, "error": expected.error}
        cases += [{"name": f"config{suffix}", **_compare_configs(raw_side, converted_side)},
                  {"name": f"dit{suffix}", "raw_folder": raw_dit.folder, **dit}]
    cases += [{"name": f"lora:{name}", **entry}
              for name, entry in _compare_loras(raw, converted, source_map, lora_rtol, expected).items()]
    return jsonschemas.checked_report("parity-report", {
        "level": "weights", "raw": raw.describe(), "converted": converted.describe(),
        "dtype_policy": expected.to_json(), "cases": cases, "passed": all(case["passed"] for case in cases)})


def _dit_folders(raw: Tree, converted: Tree) -> list[tuple[str, DitFiles, DitFiles | None]]:
    """(case suffix, raw DiT, converted DiT or None when the converted tree lacks it) for the main DiT and an
    avatar tree's extra ones (1.0's multi-speaker DiT)."""
    pairs = [("", raw.dit, converted.dit)]
    in_converted = {raw_name: folder for folder, raw_name in
                    keymap.extra_dit_folders(raw.avatar_variant, converted.layout).items()}
    for folder, raw_dit in raw.extra_dits.items():
        target = in_converted.get(folder, folder)
        pairs.append((f":{target}", raw_dit, converted.extra_dits.get(target)))
    return pairs


@dataclass(frozen=True)
class _ExpectedDtypes:
    """What dtype each converted tensor must have: the source's, cast as `policy` says."""

    policy: DtypePolicy
    origin: str  # where the policy comes from, for messages
    error: str | None = None  # conversion.json exists but gives no usable policy (the strict default is used)

    def dtype(self, name: str, source_dtype: str) -> str:
        return self.policy.resolve(name, source_dtype)

    def to_json(self) -> dict:
        return {**self.policy.describe(), "origin": self.origin}


def _expected_dtypes(converted: Tree, dtype: str | None) -> _ExpectedDtypes:
    if dtype is not None and dtype not in POLICY_NAMES:
        raise LongcatError(f"unsupported dtype {dtype!r} for the weights level; choose one of {', '.join(POLICY_NAMES)}")
    claimed = DtypePolicy(POLICY_NAMES[dtype]) if dtype is not None else None
    path = converted.root / MANIFEST
    if not path.is_file():
        if claimed is not None:
            return _ExpectedDtypes(claimed, f"dtype {dtype} given by the caller")
        return _ExpectedDtypes(DtypePolicy(), f"no {MANIFEST}: every source dtype kept")
    try:
        policy = _manifest_policy(path)
    except LongcatError as exc:
        return _ExpectedDtypes(DtypePolicy(), f"{MANIFEST} unusable: every source dtype kept", exc.one_line())
    if claimed is not None and claimed.target != policy.target:
        raise LongcatError(f"dtype {dtype} contradicts the dtype policy {policy.describe()['dtype']} that {MANIFEST} "
                           "records", path, "drop the dtype: it is only for converted trees without a manifest")
    return _ExpectedDtypes(policy, f"{MANIFEST} dtype policy")


def _manifest_policy(path: Path) -> DtypePolicy:
    document = read_json_object(path)
    problems = jsonschemas.schema_errors("manifest", document)
    if problems:
        raise LongcatError(f"does not match the manifest schema: {problems[0]}", path)
    return DtypePolicy.from_description(document["dtype_policy"], str(path))


def open_pair(raw_tree: str | Path, converted_tree: str | Path, int8: bool = False) -> tuple[Tree, Tree]:
    """int8: the raw side's DiT is its INT8 folder (an avatar 1.5 tree's base_model_int8/)."""
    raw = open_tree(raw_tree, int8=int8)
    if raw.naming != "upstream":
        raise LongcatError(f"the raw side is a {raw.layout} tree; it must use upstream names (raw or diffusers)",
                           raw.root)
    if not int8 and _made_from_int8(Path(converted_tree)):
        raise LongcatError("was converted --from-int8 (its conversion.json counts int8 source tensors): its DiT is "
                           "the dequantised base_model_int8/, not base_model/", Path(converted_tree),
                           "pass --from-int8 to compare it with RAW's INT8 folder")
    # its defects are reported, not raised; a tree converted --to-int8 has only its INT8 DiT
    return raw, open_tree(converted_tree, strict=False, int8=_holds_only_int8(Path(converted_tree)))


def _made_from_int8(root: Path) -> bool:
    """The converted tree's manifest says its source DiT held int8 tensors and the result holds none."""
    try:
        census = read_json_object(root / MANIFEST).get("census", {})
    except LongcatError:
        return False  # no usable manifest: nothing to tell
    if not isinstance(census, dict):
        return False
    before, after = census.get("before", {}), census.get("after", {})
    return isinstance(before, dict) and isinstance(after, dict) and "I8" in before and "I8" not in after


def _holds_only_int8(root: Path) -> bool:
    """An avatar tree whose DiT is only the INT8 folder (`convert --to-int8`)."""
    layout = detect_layout(root).name
    variant = avatar_variant_of_layout(layout, root)
    int8_dir = keymap.avatar_spec()["variants"].get(variant or "", {}).get("int8_dir")
    return bool(int8_dir) and (root / int8_dir).is_dir() and not (root / keymap.layout(layout)["dit_dir"]).is_dir()


def _compare_configs(raw: Tree, converted: Tree) -> dict:
    try:
        got = keymap.config_symbols(converted.dit.config, converted.naming, str(converted.config_path))
    except LongcatError as exc:
        return {"passed": False, "error": exc.one_line()}
    want = keymap.config_symbols(raw.dit.config, "upstream", str(raw.config_path))
    differences = {name: [want[name], got[name]] for name in want if want[name] != got[name]}
    for name in ("text_tokens_zero_pad",):
        if raw.dit.config.get(name, False) != converted.dit.config.get(name, False):
            differences[name] = [raw.dit.config.get(name, False), converted.dit.config.get(name, False)]
    return {"passed": not differences, "differences": differences}


@dataclass
class _TensorTally:
    checked: int = 0
    exact: int = 0
    cast: int = 0

    def as_dict(self) -> dict:
        return {"checked": self.checked, "exact": self.exact, "equal_after_cast": self.cast}


@dataclass(frozen=True)
class _Check:
    """One converted tensor and how to make the value it must hold from the raw tree."""

    key: str
    source: str  # the raw tensor(s) it comes from, for messages
    rows: tuple[int, int] | None
    source_dtype: str
    want: Callable[[str], torch.Tensor]  # converted dtype name -> the exact expected value
    rule: keymap.ParamRule | None = None  # a plain copy / cast / split of the rule's tensor (for _diagnose)
    forced_dtype: str | None = None  # the dtype the format fixes (INT8 rows, scales, biases), whatever the policy


def _checks(raw: Tree, converted: Tree, source_map: keymap.ExpandedMap, policy: DtypePolicy) -> list[_Check]:
    """Every tensor the converted DiT must hold. INT8 on either side: a quantised Linear's weight is upstream's
    dequantisation of the raw rows (from-int8) or upstream's quantisation of the raw weight (to-int8)."""
    quantized = set(keymap.quantized_modules(source_map)) if raw.int8 or converted.int8 else set()
    spec = keymap.quantization_spec(source_map.family) if quantized else {}
    checks = []
    for rule in source_map.params:
        if rule.module in quantized and rule.param == "weight":
            checks += _dequantized(raw, converted, rule, spec) if raw.int8 else _quantized(raw, rule, spec, policy)
            continue
        keys = rule.keys(converted.naming)
        source_dtype = raw.dit.info(rule.upstream).dtype
        forced = spec["bias_dtype"] if rule.module in quantized and converted.int8 else None
        for part, key in enumerate(keys):
            rows = _part_rows(rule, part, len(keys))
            checks.append(_Check(key, rule.upstream, rows, source_dtype,
                                 lambda _, name=rule.upstream, rows=rows: raw.tensor(name, rows), rule,
                                 DTYPE_NAMES[forced] if forced else None))
    return checks


def _dequantized(raw: Tree, converted: Tree, rule: keymap.ParamRule, spec: dict) -> list[_Check]:
    q_key, s_key = f"{rule.module}.{spec['weight']}", f"{rule.module}.{spec['scale']}"
    keys = rule.keys(converted.naming)

    def want(dtype: str, rows: tuple[int, int] | None) -> torch.Tensor:
        return dequantize_rows(raw.tensor(q_key, rows), raw.tensor(s_key, rows), TORCH_DTYPE[dtype])

    return [_Check(key, f"{q_key} x {s_key}", rows, "I8", lambda dtype, rows=rows: want(dtype, rows))
            for part, key in enumerate(keys) for rows in [_part_rows(rule, part, len(keys))]]


def _quantized(raw: Tree, rule: keymap.ParamRule, spec: dict, policy: DtypePolicy) -> list[_Check]:
    """Upstream quantises the model in the dtype it was loaded in: the raw weight after the conversion's cast."""
    source_dtype = raw.dit.info(rule.upstream).dtype
    work = TORCH_DTYPE[policy.resolve(rule.upstream, source_dtype)]

    def want(index: int) -> torch.Tensor:
        return quantize_rows(raw.tensor(rule.upstream).to(work))[index]

    return [_Check(f"{rule.module}.{spec['weight']}", rule.upstream, None, source_dtype, lambda _: want(0),
                   forced_dtype="I8"),
            _Check(f"{rule.module}.{spec['scale']}", rule.upstream, None, source_dtype, lambda _: want(1),
                   forced_dtype="F32")]


def _compare_tensors(raw: Tree, converted: Tree, source_map: keymap.ExpandedMap, dtypes: _ExpectedDtypes) -> dict:
    try:
        raise_first_error(converted.dit.problems, fixes=FIXES)
    except LongcatError as unreadable:
        return {"passed": False, "error": unreadable.one_line()}
    source, target = raw.dit.key_files, converted.dit.key_files
    wanted_source = keymap.int8_expected(source_map) if raw.int8 else {rule.upstream for rule in source_map.params}
    absent_source = sorted(set(wanted_source) - set(source))
    if absent_source:
        raise LongcatError(f"raw tree lacks {len(absent_source)} DiT tensors ({', '.join(absent_source[:5])})",
                           raw.root / raw.dit.folder)
    checks = _checks(raw, converted, source_map, dtypes.policy)
    expected = {check.key for check in checks}
    missing = sorted(expected - set(target))
    unexpected = sorted(set(target) - expected)
    tally, mismatches = _TensorTally(), []
    for check in checks:
        if check.key not in target:
            continue
        tally.checked += 1
        where = {"key": check.key, "source": check.source, "rows": list(check.rows) if check.rows else None}
        want_dtype = check.forced_dtype or _policy_dtype(dtypes, check)
        got_dtype = converted.dit.info(check.key).dtype
        if got_dtype != want_dtype:
            mismatches.append({**where, "problem": f"dtype {got_dtype}, expected {want_dtype} ({dtypes.origin}; "
                                                   f"source {check.source_dtype})"})
            continue
        got = converted.tensor(check.key)
        verdict = _tensor_verdict(check.want(got_dtype), got)
        if verdict == "exact":
            tally.exact += 1
        elif verdict == "cast":
            tally.cast += 1
        else:
            diagnosis = _diagnose(check.rule, raw, got, check.rule.keys(converted.naming)) if check.rule else ""
            mismatches.append({**where, "problem": verdict + diagnosis})
    passed = not (missing or unexpected or mismatches)
    return {"passed": passed, **tally.as_dict(), "mismatched": len(mismatches), "mismatches": mismatches[:LIST_LIMIT],
            "missing": missing[:LIST_LIMIT], "missing_count": len(missing),
            "unexpected": unexpected[:LIST_LIMIT], "unexpected_count": len(unexpected)}


def _policy_dtype(dtypes: _ExpectedDtypes, check: _Check) -> str:
    """The dtype the conversion's policy gives a tensor; a dequantised weight takes the policy's target dtype."""
    if check.source_dtype == "I8":
        return dtypes.policy.target or "F32 or BF16 (a --from-int8 conversion names its --dtype)"
    return dtypes.dtype(check.key, check.source_dtype)


def _part_rows(rule: keymap.ParamRule, part: int, count: int) -> tuple[int, int] | None:
    """Rows of the fused source tensor held by part `part` of `count` (None: the whole tensor)."""
    if count == 1:
        return None
    size = rule.shape[0] // count
    return part * size, (part + 1) * size


def _tensor_verdict(want: torch.Tensor, got: torch.Tensor) -> str:
    """'exact', 'cast' (equal after casting the source to the converted dtype) or what differs. The caller has
    checked that the converted dtype is the one the policy gives, so a cast here is one the policy asked for."""
    if tuple(want.shape) != tuple(got.shape):
        return f"shape {list(got.shape)} != {list(want.shape)}"
    if want.dtype == got.dtype:
        return "exact" if _bits_equal(want, got) else _value_difference(want, got)
    if not (want.is_floating_point() and got.is_floating_point()):
        return f"dtype {got.dtype} != {want.dtype}"
    return "cast" if _bits_equal(want.to(got.dtype), got) else _value_difference(want.to(got.dtype), got)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _value_difference(want: torch.Tensor, got: torch.Tensor) -> str:
    diff = (got.double() - want.double()).abs()
    return f"values differ (max abs {float(diff.max()):.3e}, {int((diff > 0).sum())} of {diff.numel()} elements)"


def _diagnose(rule: keymap.ParamRule, raw: Tree, got: torch.Tensor, keys: tuple[str, ...]) -> str:
    """Name the likely mistake: a transposed weight, or rows that belong to another part."""
    for part, key in enumerate(keys):
        rows = _part_rows(rule, part, len(keys))
        candidate = raw.tensor(rule.upstream, rows).to(got.dtype)
        if candidate.shape == got.shape and _bits_equal(candidate, got):
            return f"; holds the source rows meant for {key}"
        if got.ndim == 2 and candidate.shape == got.T.shape and _bits_equal(candidate.T, got):
            return f"; is the transpose of the source for {key}"
    return ""


# ---- LoRA ΔW -----------------------------------------------------------------------------------------

def _compare_loras(raw: Tree, converted: Tree, source_map: keymap.ExpandedMap, lora_rtol: float | None,
                   expected: _ExpectedDtypes) -> dict:
    sources = lora_paths(raw)
    try:
        targets = lora_paths(converted)
    except LongcatError as exc:
        return {"*": {"passed": False, "error": exc.one_line()}}
    report = {}
    for name, path in sources.items():
        source = AdapterDeltas(read_adapter(path, "upstream"))
        if name not in targets:
            report[name] = {"passed": False, "error": f"no converted LoRA named {name} under {converted.lora_dir}"}
            continue
        try:
            target = AdapterDeltas(read_adapter(targets[name], converted.lora_format), source_map)
            wrong_dtypes = _lora_dtype_mismatches(path, targets[name], converted.lora_format, source_map, expected)
            report[name] = _compare_lora(source, target, lora_rtol, str(targets[name]), wrong_dtypes)
        except LongcatError as exc:
            report[name] = {"passed": False, "error": exc.one_line()}
    for name in sorted(set(targets) - set(sources)):
        report[name] = {"passed": False, "error": f"converted LoRA {targets[name]} has no source in {raw.lora_dir}"}
    return report


def _lora_dtype_mismatches(source_path: Path, target_path: Path, target_format: str, source_map: keymap.ExpandedMap,
                           expected: _ExpectedDtypes) -> list[dict]:
    """Converted LoRA tensors whose dtype is not their source tensor's under the policy (alphas are never cast)."""
    source = read_header(source_path).tensors
    by_fastvideo = source_map.linear_by_fastvideo()
    mismatches = []
    for name, info in read_header(target_path).tensors.items():
        origin, part = _lora_source_key(name, target_format, by_fastvideo, source)
        if origin is None:
            continue  # a piece the key map does not know is reported as unexpected
        source_dtype = source[origin].dtype
        want = source_dtype if part == "alpha" else expected.dtype(name, source_dtype)
        if info.dtype != want:
            mismatches.append({"tensor": name, "problem": f"dtype {info.dtype}, expected {want} ({expected.origin}; "
                                                          f"source {origin} is {source_dtype})"})
    return mismatches


def _lora_source_key(name: str, target_format: str, by_fastvideo: dict, source: dict) -> tuple[str | None, str]:
    """The upstream-format source tensor a converted LoRA tensor is made from (for its dtype), and its part."""
    split = split_upstream(name) if target_format == "upstream" else split_fastvideo(name)
    if split is None:
        return None, ""
    if target_format == "upstream":
        return (name if name in source else None), split[1]
    target, part, _ = split
    linear = by_fastvideo.get(target)
    if linear is None:
        return None, part
    module = linear[0].upstream
    candidates = [upstream_key(module, part)] + ([upstream_key(module, "up", 0)] if part == "up" else [])
    return next((key for key in candidates if key in source), None), part


def _compare_lora(source: AdapterDeltas, target: AdapterDeltas, lora_rtol: float | None, where: str,
                  wrong_dtypes: list[dict]) -> dict:
    result = compare_deltas(source, target, lambda terms: _lora_tolerance(terms) if lora_rtol is None else lora_rtol)
    mismatches = list(wrong_dtypes)
    for module in result.modules:
        if module.problem is not None:
            mismatches.append({"module": module.module, "problem": module.problem})
        elif not module.passed:
            mismatches.append({"module": module.module, "rel_fro": json_number(module.rel_error),
                               "tolerance": module.tolerance})
    passed = not (result.missing or result.unexpected or mismatches)
    return {"passed": passed, "file": where, "modules_checked": len(result.modules),
            "max_rel_fro": result.max_rel_error, "mismatched": len(mismatches), "mismatches": mismatches[:LIST_LIMIT],
            "missing": result.missing[:LIST_LIMIT], "missing_count": len(result.missing),
            "unexpected": result.unexpected[:LIST_LIMIT], "unexpected_count": len(result.unexpected)}


def _lora_tolerance(terms: list[Term]) -> float:
    names = {SAFETENSORS_NAME.get(t.dtype, "F32") for term in terms for t in (term.up, term.down)}
    return max(LORA_RTOL.get(name, 1e-6) for name in names)
