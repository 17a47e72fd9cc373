"""One CLI, one vocabulary: examples in every --help, help wrapped to the terminal, the same option spelled
the same everywhere, header-only commands without torch, and error hints that send people the right way."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from longcat_convert.cli import COMMANDS, _register, main_group
from longcat_convert.cli.common import DTYPE_ORDER
from longcat_convert.core import versions
from tests.helpers import run_cli

PROGRESS_COMMANDS = ("convert", "validate", "parity", "run", "demo")
REPORT_COMMANDS = ("convert", "validate", "parity")


def _command(name: str) -> click.Command:
    _register()
    return main_group.commands[name]


def _options(name: str) -> dict[str, click.Option]:
    return {opt: param for param in _command(name).params if isinstance(param, click.Option) for opt in param.opts}


def _help(*args: str, width: int = 80) -> str:
    _register()
    result = CliRunner().invoke(main_group, [*args, "--help"], terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_help_has_examples_of_itself(name: str) -> None:
    text = _help(name)
    assert "Examples" in text
    examples = text.split("Examples", 1)[1]
    assert f"longcat-convert {name} " in examples


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_is_wrapped_to_the_terminal(name: str | None) -> None:
    for width in (80, 100):
        text = _help(*([name] if name else []), width=width)
        too_long = [line for line in text.splitlines() if len(line) > width]
        assert not too_long, too_long


@pytest.mark.parametrize("name", PROGRESS_COMMANDS)
def test_progress_commands_take_quiet(name: str) -> None:
    options = _options(name)
    assert "-q" in options and "--quiet" in options and options["-q"].is_flag


@pytest.mark.parametrize("name", REPORT_COMMANDS)
def test_report_and_json_are_spelled_alike(name: str) -> None:
    options = _options(name)
    assert options["--report"].metavar == "PATH" and options["--report"].name == "report_path"
    assert options["--json"].is_flag and options["--json"].name == "as_json"


def test_dtype_choices_come_in_one_order() -> None:
    for name in COMMANDS:
        option = _options(name).get("--dtype")
        if option is not None:
            choices = list(option.type.choices)
            assert choices == [d for d in DTYPE_ORDER if d in choices], name


# ---- header-only commands never import torch -----------------------------------------------------------------

PROBE = """
import sys
from longcat_convert.cli import main
sys.argv = ["longcat-convert", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
print("TORCH" if "torch" in sys.modules else "NO-TORCH", code, file=sys.stderr)
"""


def _torch_free(*args: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    return done.stderr.strip().splitlines()[-1], done.stderr + done.stdout


@pytest.mark.parametrize("args", [("inspect", "TREE"), ("validate", "TREE"),
                                  ("convert", "TREE", "OUT", "--to", "fastvideo", "--dry-run"),
                                  ("tiny", "TREE")])
def test_header_only_commands_and_refusals_do_not_import_torch(tiny_raw, tmp_path, args) -> None:
    args = [str(tiny_raw) if a == "TREE" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    verdict, output = _torch_free(*args)
    assert verdict.startswith("NO-TORCH"), output
    if args[0] == "tiny":  # the tree exists: refused at once, with the fix
        assert verdict == "NO-TORCH 2" and "already exists" in output and "--overwrite" in output


# ---- hints that send people the right way ----------------------------------------------------------------------

@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "holiday"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(folder / f"img{index}.jpg")
    return folder


@pytest.mark.parametrize("args", [("convert", "PHOTOS", "OUT", "--to", "fastvideo"), ("validate", "PHOTOS"),
                                  ("validate", "PHOTOS", "--layout", "raw"), ("inspect", "PHOTOS"),
                                  ("run", "PHOTOS", "--task", "t2v", "-o", "OUT")])
def test_a_folder_of_pictures_is_told_what_a_tree_needs(photos, tmp_path, args) -> None:
    args = [str(photos) if a == "PHOTOS" else str(tmp_path / "out.npz") if a == "OUT" else a for a in args]
    result = run_cli(*args)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "no LongCat-Video tree here" in result.output and "dit/" in result.output
    assert "transformer/" in result.output and "img0.jpg" in result.output
    assert "--layout" not in result.output  # choosing a layout cannot make photos a tree


def test_a_partial_tree_is_told_what_it_lacks(tiny_raw, tmp_path) -> None:
    partial = tmp_path / "partial"
    (partial / "vae").mkdir(parents=True)
    (partial / "text_encoder").mkdir()
    result = run_cli("convert", partial, tmp_path / "out", "--to", "fastvideo")
    assert result.exit_code == 2
    assert "it has text_encoder/, vae/ but no dit/ or transformer/" in result.output


# ---- model_index.json ------------------------------------------------------------------------------------------

def test_model_index_names_the_diffusers_it_was_written_for(tiny_raw, tmp_path, monkeypatch) -> None:
    assert run_cli("convert", tiny_raw, tmp_path / "d", "--to", "diffusers", "-q").exit_code == 0
    written = json.loads((tmp_path / "d" / "model_index.json").read_text())["_diffusers_version"]
    assert written == importlib.metadata.version("diffusers")

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(versions.importlib.metadata, "version", missing)
    assert versions.diffusers_version() == versions.DIFFUSERS_FALLBACK


def test_convert_json_prints_the_manifest(tiny_raw, tmp_path) -> None:
    result = run_cli("convert", tiny_raw, tmp_path / "fv", "--to", "fastvideo", "--json")
    assert result.exit_code == 0
    manifest = json.loads(result.output)
    assert manifest == json.loads((tmp_path / "fv" / "conversion.json").read_text())
