"""`convert` refuses whatever `validate` rejects, and accepts (with valid output) whatever it accepts.

Two sources of trees: the validation corpus (one defect each, tests/test_validate_corpus.py) and random
mutations of a tiny tree (configs, dtypes, files, LoRA alphas). For each tree: validate exits non-zero ⇒
convert exits 2 with one line and leaves nothing at the destination; validate exits 0 ⇒ convert succeeds
and its output passes validate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from longcat_convert.core.errors import LongcatError
from longcat_convert.core.tree import read_tree
from longcat_convert.validation.run import validate_tree
from tests.helpers import run_cli
from tests.test_validate_corpus import DEFECTS, MARKER, Defect
from tests.test_validate_helpers import converted

TARGET = {"raw": "fastvideo", "fastvideo": "raw", "diffusers": "fastvideo"}


@pytest.fixture(scope="module")
def bases(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("agree-bases")
    return {layout: converted(tiny_raw, base / layout, layout) for layout in ("raw", "fastvideo", "diffusers")}


def check_agreement(tree: Path, target: str, dst: Path) -> tuple[int, int]:
    """(validate's exit code, convert's exit code), after checking the implication both ways."""
    validated = run_cli("validate", tree)
    result = run_cli("convert", tree, dst, "--to", target, "--lora-alpha-fix", "rescale", "-q")
    assert "Traceback" not in result.output, result.output
    if validated.exit_code != 0:
        assert result.exit_code == 2, f"validate said {validated.exit_code}, convert {result.exit_code}:\n" \
                                      f"{validated.output}\n{result.output}"
        assert result.output.startswith("error: ") and result.output.strip().count("\n") == 0, result.output
        assert not dst.exists()
        assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    else:
        assert result.exit_code == 0, f"validate accepted the tree, convert said:\n{result.output}"
        again = run_cli("validate", dst)
        assert again.exit_code == 0, again.output
    return validated.exit_code, result.exit_code


CORPUS = [d for d in DEFECTS if not d.args]  # --deep and --dtype checks are validate's options, not convert's


@pytest.mark.parametrize("defect", CORPUS, ids=[d.name for d in CORPUS])
def test_convert_refuses_every_tree_of_the_validation_corpus(defect: Defect, bases: dict[str, Path],
                                                              tmp_path: Path) -> None:
    tree = Path(shutil.copytree(bases[defect.base], tmp_path / "tree", symlinks=True))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    defect.damage(tree, scratch, bases)
    validate_code, convert_code = check_agreement(tree, TARGET[defect.base], tmp_path / "out")
    assert validate_code == defect.exit_code and convert_code == 2
    assert not (scratch / MARKER).exists(), "a pickle was loaded"


# The kinds of finding the shared shard-folder scanner produces (longcat_convert/shard_folder.py).
SCANNER_KINDS = {"pickle_file", "unreadable_file", "no_weights", "several_indexes", "weight_file_name", "bad_index",
                 "missing_shard", "index_key_not_in_shard", "unindexed_file", "unindexed_tensor",
                 "total_size_mismatch", "no_index", "duplicate_key"}


@pytest.mark.parametrize("defect", CORPUS, ids=[d.name for d in CORPUS])
def test_reading_a_tree_refuses_the_dit_folder_defects_validate_reports_in_its_words(
        defect: Defect, bases: dict[str, Path], tmp_path: Path) -> None:
    """One scanner for validate and for reading a tree (convert, inspect, run): the first DiT-folder error
    validate reports is the error reading the tree raises, naming the same file."""
    tree = Path(shutil.copytree(bases[defect.base], tmp_path / "tree", symlinks=True))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    defect.damage(tree, scratch, bases)
    try:
        findings = validate_tree(tree)["findings"]
    except LongcatError:
        return  # refused before any folder is scanned (symlink escapes, loops): reading refuses it as well
    scanned = [f for f in findings if f["component"] == "dit" and f["kind"] in SCANNER_KINDS
               and f["severity"] == "error"]
    if not scanned:
        return
    with pytest.raises(LongcatError) as refused:
        read_tree(tree)
    assert refused.value.message == scanned[0]["message"]
    assert Path(refused.value.path) == tree.resolve() / scanned[0]["file"]
    assert not (scratch / MARKER).exists(), "a pickle was loaded"


# --- random mutations ----------------------------------------------------------------------------------------

CONFIGS = ["dit/config.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
           "scheduler/scheduler_config.json", "model_index.json"]
JSON_VALUES = st.one_of(st.integers(-3, 3), st.sampled_from([0, 10**6, 10**30, 2**63]),
                        st.floats(allow_nan=False, allow_infinity=False, width=32), st.none(), st.booleans(),
                        st.text(max_size=4), st.lists(st.integers(0, 4), max_size=4))
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.float8_e4m3fn, torch.uint8]
ALPHAS = [0.0, -0.5, 0.3, 1 / 3, 1e30, -1e-30, math.nan, math.inf, -math.inf, 64.0, 0.125]


def _files(tree: Path, suffix: str = "") -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file() and p.name.endswith(suffix))


def set_config_field(tree: Path, data: st.DataObject) -> None:
    path = tree / data.draw(st.sampled_from([c for c in CONFIGS if (tree / c).is_file()]))
    config = json.loads(path.read_text())
    field = data.draw(st.sampled_from(sorted(config)))
    config[field] = data.draw(JSON_VALUES)
    path.write_text(json.dumps(config))


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    """A shard's tensors, or None when an earlier mutation made it unreadable (the mutation is then skipped)."""
    try:
        return load_file(path)
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        return None


def retype_tensor(tree: Path, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_files(tree, ".safetensors")))
    state = _load(path)
    if not state:
        return
    key = data.draw(st.sampled_from(sorted(state)))
    state[key] = state[key].to(data.draw(st.sampled_from(DTYPES)))
    save_file(state, path, metadata={"format": "pt"})


def set_alpha(tree: Path, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_files(tree / "lora", ".safetensors")))
    state = _load(path)
    if not state or not any(k.endswith(("alpha_scale", "lora_alpha")) for k in state):
        return
    key = data.draw(st.sampled_from(sorted(k for k in state if k.endswith(("alpha_scale", "lora_alpha")))))
    value = data.draw(st.sampled_from(ALPHAS))
    state[key] = torch.tensor(value, dtype=data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64])))
    save_file(state, path)


def delete_file(tree: Path, data: st.DataObject) -> None:
    data.draw(st.sampled_from(_files(tree))).unlink()


def add_file(tree: Path, data: st.DataObject) -> None:
    folder = data.draw(st.sampled_from([tree] + sorted(p for p in tree.rglob("*") if p.is_dir())))
    name = data.draw(st.sampled_from(["notes.txt", "extra.safetensors", "model.pt", "weights.bin", "x.json"]))
    content = data.draw(st.sampled_from([b"", b"hello\n", b"{}", b"\x80\x04K\x01."]))
    (folder / name).write_bytes(content)


def truncate_file(tree: Path, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_files(tree)))
    os.truncate(path, max(0, path.stat().st_size - data.draw(st.integers(1, 64))))


MUTATIONS = [set_config_field, retype_tensor, set_alpha, delete_file, add_file, truncate_file]


@settings(max_examples=int(os.environ.get("AGREE_EXAMPLES", "30")), deadline=None, derandomize=not os.environ.get("AGREE_EXAMPLES"), phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_mutations_validate_and_convert_agree(data: st.DataObject, bases: dict[str, Path],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("mutation")
    layout = data.draw(st.sampled_from(["raw", "fastvideo"]))
    tree = Path(shutil.copytree(bases[layout], work / "tree"))
    for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=2)):
        mutation(tree, data)
    check_agreement(tree, TARGET[layout], work / "out")
    shutil.rmtree(work)
