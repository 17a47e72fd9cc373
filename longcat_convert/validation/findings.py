"""Findings: what the validator reports, one defect each, with a severity, a component and a kind."""

from __future__ import annotations

from dataclasses import dataclass, field

SEVERITIES = ("error", "warning", "info")

# Every kind the validator can emit, with the heading the summary shows for it.
KINDS: dict[str, str] = {
    # tree and files
    "missing_component": "component folder missing",
    "missing_file": "required file missing",
    "unreadable_file": "unreadable file",
    "dangling_symlink": "symlink to nothing",
    "special_file": "not a regular file",
    "pickle_file": "pickle checkpoint refused (never loaded)",
    "no_weights": "no weight files",
    "weight_file_name": "weight file name loaders will not find",
    # configs
    "config_field": "architecture config field",
    "runtime_flag": "runtime-only config flag",
    "config_rule": "config consistency rule",
    "unknown_field": "unknown config field",
    "model_index": "model_index.json entry",
    # shard sets and indexes
    "bad_index": "invalid index file",
    "several_indexes": "several index files",
    "missing_shard": "index names a missing shard",
    "index_key_not_in_shard": "index entry whose shard lacks the key",
    "unindexed_tensor": "shard tensor absent from the index",
    "unindexed_file": "weight file no index covers",
    "no_index": "several weight files without an index",
    "total_size_mismatch": "index total_size mismatch",
    "duplicate_key": "key in several files",
    # key report (root causes first: the summary lists kinds in this order)
    "wrong_naming": "keys follow another layout's naming",
    "missing_key": "missing key",
    "unexpected_key": "unexpected key",
    "droppable_key": "parameter-free norm key (dropped by conversion)",
    "shape_mismatch": "shape mismatch",
    "dtype_mismatch": "dtype mismatch",
    # LoRA
    "lora_format": "LoRA file in the wrong format for the layout",
    "lora_placement": "LoRA file placement",
    "lora_bad_key": "unparseable LoRA key",
    "lora_unknown_module": "LoRA for a module the DiT does not have",
    "lora_incomplete": "LoRA module missing a part",
    "lora_shape": "LoRA shape inconsistent with the module",
    "lora_rank_mismatch": "LoRA rank mismatch",
    "lora_missing_alpha": "LoRA module without alpha",
    "lora_alpha_value": "LoRA alpha value",
    "lora_non_integer_alpha": "non-integer alpha (FastVideo truncates with int())",
    "lora_block_split": "LoRA up-blocks not aligned with the fused projection",
    # deep scan and manifest
    "nan_inf": "NaN/Inf values",
    "all_zero": "all-zero tensor",
    "drop_value": "dropped norm parameter that is not the identity",
    "hash_mismatch": "sha256 differs from the manifest",
    "int8_scale": "INT8 weight_scale that is not positive",
    "manifest": "conversion manifest entry",
    "unrecorded_tensor": "tensor absent from the manifest",
}


@dataclass(frozen=True)
class Finding:
    severity: str
    component: str
    kind: str
    message: str
    file: str | None = None  # relative to the tree root, POSIX separators
    key: str | None = None

    def one_line(self) -> str:
        return f"{self.file}: {self.message}" if self.file else self.message

    def to_json(self) -> dict:
        body = {"severity": self.severity, "component": self.component, "kind": self.kind, "message": self.message}
        if self.file is not None:
            body["file"] = self.file
        if self.key is not None:
            body["key"] = self.key
        return body


@dataclass
class Findings:
    items: list[Finding] = field(default_factory=list)
    _seen: set[Finding] = field(default_factory=set)

    def add(self, severity: str, component: str, kind: str, message: str,
            file: str | None = None, key: str | None = None) -> None:
        if severity not in SEVERITIES:
            raise ValueError(f"unknown severity {severity!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown finding kind {kind!r}")
        finding = Finding(severity, component, kind, " ".join(message.split()), file, key)
        if finding not in self._seen:
            self._seen.add(finding)
            self.items.append(finding)

    def error(self, component: str, kind: str, message: str, file: str | None = None, key: str | None = None) -> None:
        self.add("error", component, kind, message, file, key)

    def warning(self, component: str, kind: str, message: str, file: str | None = None,
                key: str | None = None) -> None:
        self.add("warning", component, kind, message, file, key)

    def info(self, component: str, kind: str, message: str, file: str | None = None, key: str | None = None) -> None:
        self.add("info", component, kind, message, file, key)

    def count(self, severity: str) -> int:
        return sum(1 for f in self.items if f.severity == severity)

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.items)
