"""`run` checks every argument and its input media before any model loads, says what it will run, and records
what reproduces the output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import longcat_reference.pipeline as pipeline_package
import numpy as np
import pytest
from click.testing import CliRunner
from longcat_reference import loading
from longcat_reference.pipeline import components, preflight
from longcat_reference.pipeline.estimate import Rates
from longcat_reference.pipeline.preflight import Media, RunRequest, check_request, plan_run
from PIL import Image

from longcat_convert import __version__
from longcat_convert.cli import _register, main_group
from longcat_convert.core.errors import LongcatError
from tests.helpers import run_cli

SMALL = ("--steps", "2", "--max-sequence-length", "8")


class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a model fails the test."""
    def refuse(*args, **kwargs):
        raise ModelLoaded("a model was loaded")

    for module, name in ((pipeline_package, "load_pipeline"), (components, "load_pipeline"),
                         (components, "load_dit"), (loading, "load_dit")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 9-frame 32x48 clip as an earlier run's .npz would hold it."""
    path = tmp_path_factory.mktemp("clip") / "clip.npz"
    frames = np.random.RandomState(0).rand(9, 32, 48, 3).astype(np.float32)
    np.savez(path, frames=frames)
    return path


def _invoke(*args):
    """Like run_cli, but an exception (a model loaded) comes back in the result with the output before it."""
    _register()
    return CliRunner().invoke(main_group, [str(a) for a in args], catch_exceptions=True)


@pytest.mark.parametrize(("args", "message"), [
    (("--task", "t2v", "--height", "63", "--width", "64"), "--height/--width must be positive multiples of 16"),
    (("--task", "t2v", "--height", "64"), "give both --height and --width"),
    (("--task", "t2v", "--steps", "0"), "--steps must be at least 1, got 0"),
    (("--task", "t2v", "--num-frames", "0"), "--num-frames must be at least 1, got 0"),
    (("--task", "t2v", "--num-frames", "-5"), "--num-frames must be at least 1"),
    (("--task", "t2v", "--seed", "-1"), "--seed must lie in"),
    (("--task", "t2v", "--guidance", "nan"), "--guidance must be a finite number"),
    (("--task", "t2v", "--max-sequence-length", "0"), "--max-sequence-length must be at least 1"),
    (("--task", "t2v", "--distill", "--steps", "51"), "at most 50 steps"),
    (("--task", "t2v", "--device", "cuda:7"), "device"),
    (("--task", "refine", "--video", "CLIP", "--height", "32", "--width", "48"), "positive multiples of 64"),
    (("--task", "refine", "--video", "CLIP", "--t-thresh", "1"), "--t-thresh must lie in [0, 1)"),
    (("--task", "long", "--segments", "-1"), "--segments must be at least 0"),
    (("--task", "long", "--num-frames", "9", "--num-cond-frames", "9"), "must be below the 9 frames"),
    (("--task", "vc", "--video", "CLIP", "--num-cond-frames", "0"), "--num-cond-frames must be at least 1"),
    (("--task", "vc", "--video", "CLIP", "--num-cond-frames", "12", "--num-frames", "17"),
     "the video has 9 frames; 12 conditioning frames are needed"),
    (("--task", "vc", "--video", "CLIP", "--num-cond-frames", "9", "--num-frames", "9"), "fill all 9 output frames"),
    (("--task", "vc"), "--task vc needs --video"),
    (("--task", "i2v", "--image", "missing.png"), "image file does not exist"),
    (("--task", "vc", "--video", "missing.npz"), "video does not exist"),
    (("--task", "vc", "--video", "NOT_A_VIDEO"), "cannot read frames"),
])
def test_bad_arguments_fail_before_any_model_loads(tiny_raw, clip, tmp_path, no_model, args, message):
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    args = [str(clip) if a == "CLIP" else str(tmp_path / "broken.npz") if a == "NOT_A_VIDEO" else a for a in args]
    result = run_cli("run", tiny_raw, *args, "-o", tmp_path / "out.npz")
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out.npz").exists()


def test_output_folder_and_missing_tree_fail_before_loading(tiny_raw, tmp_path, no_model):
    result = run_cli("run", tiny_raw, "--task", "t2v", "-o", tmp_path)
    assert result.exit_code == 2 and "-o names the .npz file" in result.output
    result = run_cli("run", tmp_path / "nothing", "--task", "t2v", "-o", tmp_path / "out.npz")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_frame_counts_are_rounded_with_a_notice(tiny_raw, tmp_path):
    result = run_cli("run", tiny_raw, "--task", "t2v", "--num-frames", "10", "--height", "32", "--width", "32",
                     *SMALL, "-o", tmp_path / "out.npz")
    assert result.exit_code == 0, result.output
    assert "note: --num-frames 10 becomes 9" in result.output
    assert np.load(tmp_path / "out.npz")["frames"].shape[0] == 9
    result = run_cli("run", tiny_raw, "--task", "t2v", "--num-frames", "3", "--height", "32", "--width", "32",
                     *SMALL, "-o", tmp_path / "one.npz")
    assert "note: --num-frames 3 becomes 1" in result.output and "t2v: 1 frames" in result.output


def test_the_plan_line_explains_bucketing_and_enhance_hf_steps(tiny_raw, clip, tmp_path, no_model, monkeypatch):
    # the README's old vc line: a 32x48 clip without --height/--width goes to the 480p bucket
    monkeypatch.setattr(preflight, "measure_rates", lambda *a: Rates(1e9, 1e9, 1e9))
    result = _invoke("run", tiny_raw, "--task", "vc", "--video", clip, "--num-frames", "9", "--num-cond-frames", "5",
                     "--steps", "4", "-o", tmp_path / "vc.npz")
    line = next(line for line in result.output.splitlines() if line.startswith("run vc:"))
    assert "512x768" in line and "the 480p bucket of the 32x48 video" in line  # ratio 0.667: the 0.67 bucket
    assert "13 steps (enhance_hf: the 3 of the 4 steps above t=500, then 10" in line
    assert "--no-enhance-hf runs exactly 4" in line and "float32 (the CPU default) on cpu" in line
    assert "estimated ~" in line  # 1 GFLOP/s makes this run long enough to be worth an estimate
    assert isinstance(result.exception, ModelLoaded)  # the line came before loading


def test_an_absurd_cpu_run_is_refused_unless_yes(tiny_raw, tmp_path, no_model, monkeypatch):
    monkeypatch.setattr(preflight, "measure_rates", lambda *a: Rates(1e6, 1e6, 1e6))  # a very slow machine
    result = run_cli("run", tiny_raw, "--task", "t2v", "-o", tmp_path / "out.npz")
    assert result.exit_code == 2 and "would take ~" in result.output and "--yes" in result.output
    assert "--device cuda" in result.output and not (tmp_path / "out.npz").exists()
    result = _invoke("run", tiny_raw, "--task", "t2v", "--yes", "-o", tmp_path / "out.npz")
    assert isinstance(result.exception, ModelLoaded)  # --yes goes on to load


def test_more_memory_than_the_machine_has_is_refused(tiny_raw, tmp_path, no_model, monkeypatch):
    monkeypatch.setattr(preflight, "physical_memory", lambda: 1024)
    result = run_cli("run", tiny_raw, "--task", "t2v", "--height", "32", "--width", "32", *SMALL, "-o",
                     tmp_path / "out.npz")
    assert result.exit_code == 2 and "needs ~" in result.output and "this machine has 1.02 KB" in result.output


@pytest.mark.parametrize(("task", "extra", "calls"), [
    ("t2v", ["--height", "32", "--width", "48", "--num-frames", "5"], 1),
    ("t2v", ["--height", "32", "--width", "48", "--num-frames", "5", "--distill"], 1),
    ("i2v", ["--image", "IMAGE", "--height", "32", "--width", "48", "--num-frames", "5"], 1),
    ("vc", ["--video", "CLIP", "--num-cond-frames", "5", "--num-frames", "13", "--height", "32", "--width", "48"], 1),
    ("vc", ["--video", "CLIP", "--num-cond-frames", "5", "--num-frames", "13", "--height", "32", "--width", "48",
            "--no-enhance-hf", "--no-kv-cache"], 1),
    ("refine", ["--video", "CLIP", "--height", "64", "--width", "64", "--spatial-refine-only"], 1),
    ("long", ["--segments", "1", "--num-frames", "9", "--num-cond-frames", "5", "--height", "32", "--width", "48",
              "--refine-height", "64", "--refine-width", "64", "--spatial-refine-only"], 4),  # t2v, vc, 2 windows
])
def test_the_plan_agrees_with_what_ran(tiny_raw, clip, tmp_path, task, extra, calls):
    image = tmp_path / "first.png"
    Image.fromarray(np.full((40, 60, 3), 90, dtype=np.uint8)).save(image)
    extra = [str(clip) if a == "CLIP" else str(image) if a == "IMAGE" else a for a in extra]
    result = run_cli("run", tiny_raw, "--task", task, *extra, *SMALL, "--prompt", "a café, the rider’s horse",
                     "-o", tmp_path / "out.npz")
    assert result.exit_code == 0, result.output
    info = json.loads(str(np.load(tmp_path / "out.npz")["info"]))
    ran = info["segments"] if task == "long" else [info]
    plan = plan_run(tiny_raw, RunRequest(**info["options"]), _media(task, image, clip), measure=False)
    planned = [call for call in plan.calls for _ in range(call.repeat)]
    assert len(planned) == len(ran) == calls
    for call, done in zip(planned, ran, strict=True):
        assert (call.height, call.width, call.steps) == (done["height"], done["width"], done["steps"])


def _media(task: str, image: Path, clip: Path) -> Media:
    from longcat_reference.pipeline.media import load_image, load_video

    if task == "i2v":
        return Media(image=load_image(image))
    return Media(video=load_video(clip)) if task in ("vc", "refine") else Media()


def test_info_records_what_reproduces_the_output(tiny_raw, tmp_path):
    converted = tmp_path / "fv"
    assert run_cli("convert", tiny_raw, converted, "--to", "fastvideo", "-q").exit_code == 0
    result = run_cli("run", converted, "--task", "t2v", "--prompt", "a cat", "--negative-prompt", "blur",
                     "--height", "32", "--width", "48", "--num-frames", "5", "--seed", "7", *SMALL, "-o",
                     tmp_path / "out.npz")
    assert result.exit_code == 0, result.output
    info = json.loads(str(np.load(tmp_path / "out.npz")["info"]))
    assert {k: info[k] for k in ("task", "prompt", "negative_prompt", "seed", "dtype", "device", "height", "width",
                                 "num_frames", "steps", "guidance")} == {
        "task": "t2v", "prompt": "a cat", "negative_prompt": "blur", "seed": 7, "dtype": "float32", "device": "cpu",
        "height": 32, "width": 48, "num_frames": 5, "steps": 2, "guidance": 4.0}
    manifest = hashlib.sha256((converted / "conversion.json").read_bytes()).hexdigest()
    assert info["tree"] == {"path": str(converted.resolve()), "layout": "fastvideo", "manifest_sha256": manifest}
    assert info["tool"] == {"name": "longcat-convert", "version": __version__}
    assert info["options"]["max_sequence_length"] == 8 and info["options"]["dtype"] is None


def test_the_dtype_defaults_to_float32_on_cpu(tiny_raw):
    plan = plan_run(tiny_raw, RunRequest(task="t2v", height=32, width=32, num_frames=5), Media(), measure=False)
    assert plan.dtype == "float32" and plan.dtype_defaulted
    plan = plan_run(tiny_raw, RunRequest(task="t2v", dtype="bfloat16", height=32, width=32), Media(), measure=False)
    assert plan.dtype == "bfloat16" and not plan.dtype_defaulted


def test_a_tree_without_the_pipeline_components_is_refused_before_loading(tiny_raw, tmp_path, no_model):
    import shutil

    tree = Path(shutil.copytree(tiny_raw, tmp_path / "raw"))
    shutil.rmtree(tree / "vae")
    with pytest.raises(LongcatError, match="no vae/ folder"):
        plan_run(tree, RunRequest(task="t2v"), Media(), measure=False)


def test_options_another_task_reads_are_noted_as_ignored(tiny_raw, clip, tmp_path, no_model):
    result = _invoke("run", tiny_raw, "--task", "t2v", "--segments", "3", "--t-thresh", "0.3", "--video", clip,
                     "--height", "32", "--width", "32", "-o", tmp_path / "out.npz")
    assert isinstance(result.exception, ModelLoaded)
    for note in ("note: --segments applies to long, not t2v; ignored",
                 "note: --t-thresh applies to refine, not t2v; ignored",
                 "note: --video applies to vc, refine, not t2v; ignored"):
        assert note in result.output, result.output


def test_request_fields_without_a_flag_are_checked_like_the_others():
    with pytest.raises(LongcatError, match=r"BSA sparsity must lie in \[0, 1\], got 2"):
        check_request(RunRequest("refine", bsa_params={"sparsity": 2.0}))
    with pytest.raises(LongcatError, match="bsa_params has unknown fields"):
        check_request(RunRequest("long", bsa_params={"sparsity": 0.5, "chunk": [4, 4, 4]}))
    with pytest.raises(LongcatError, match="refine_steps must be at least 1, got 0"):
        check_request(RunRequest("long", refine_steps=0))
    assert "--refine-steps applies to long, not t2v; ignored" in check_request(RunRequest("t2v", refine_steps=4))


def test_an_absurd_segment_count_is_planned_at_once_and_refused(tiny_raw, tmp_path, no_model):
    result = run_cli("run", tiny_raw, "--task", "long", "--segments", "1000000000", "-o", tmp_path / "out.npz")
    assert result.exit_code == 2 and ("would take" in result.output or "this machine has" in result.output)
