"""`longcat-convert run`: help, a tiny end-to-end run per input kind, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli

TINY = ("--height", "32", "--width", "48", "--steps", "2", "--max-sequence-length", "16", "--dtype", "float32")


def test_help_names_every_task_and_the_output():
    result = run_cli("run", "--help")
    assert result.exit_code == 0
    for text in ("t2v", "i2v", "vc", "refine", "long", "--output", "--distill", "--max-sequence-length", ".npz"):
        assert text in result.output


@pytest.fixture(scope="module")
def t2v_output(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "t2v"
    result = run_cli("run", tiny_raw, "--task", "t2v", "--prompt", "a cat", "--num-frames", "9", *TINY, "-o", out)
    assert result.exit_code == 0, result.output
    assert "t2v: 9 frames 32x48, 2 steps" in result.output
    assert ".mp4" in result.output  # written, or one line saying why not
    return out.with_name("t2v.npz")


def test_t2v_writes_frames_latents_and_info(t2v_output):
    data = np.load(t2v_output)
    assert data["frames"].shape == (9, 32, 48, 3) and data["latents"].shape == (1, 16, 3, 4, 6)
    assert data["timesteps"].shape == (2,)
    info = json.loads(str(data["info"]))
    assert info["guidance"] == 4.0 and info["steps"] == 2


def test_vc_continues_an_earlier_output(tiny_raw, t2v_output, tmp_path):
    out = tmp_path / "vc.npz"
    result = run_cli("run", tiny_raw, "--task", "vc", "--video", t2v_output, "--num-cond-frames", "5",
                     "--num-frames", "13", "--no-kv-cache", "--save-steps", *TINY, "-o", out)
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert data["frames"].shape == (13, 32, 48, 3) and data["steps"].shape[0] == len(data["timesteps"])


def test_i2v_from_an_image_file(tiny_raw, tmp_path):
    image = tmp_path / "first.png"
    Image.fromarray(np.full((50, 70, 3), 90, dtype=np.uint8)).save(image)
    result = run_cli("run", tiny_raw, "--task", "i2v", "--image", image, "--num-frames", "5", "--distill", *TINY,
                     "-o", tmp_path / "i2v.npz")
    assert result.exit_code == 0, result.output
    assert json.loads(str(np.load(tmp_path / "i2v.npz")["info"]))["distill"] is True


@pytest.mark.parametrize(("args", "message"), [
    (("--task", "i2v"), "needs --image"),
    (("--task", "t2v", "--height", "30", "--width", "48"), "multiples of 16"),
    (("--task", "refine", "--distill", "--video", "x"), "--distill applies to"),
    (("--task", "t2v", "--device", "cuda:7"), "device"),
    (("--task", "vc", "--video", "missing.npz"), "video does not exist"),
])
def test_errors_are_one_line_with_exit_2(tiny_raw, tmp_path, args, message):
    result = run_cli("run", tiny_raw, *args, "-o", tmp_path / "out.npz")
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.npz").exists()
