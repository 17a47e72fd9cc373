"""Progress: shown on a terminal only, each bar naming its stage; silent in pipes, logs, tests and the API."""

from __future__ import annotations

import io

import numpy as np
from longcat_reference.forward_parity import forward_parity
from longcat_reference.pipeline import RandomStreams, load_pipeline, text_to_video
from longcat_reference.pipeline.task_parity import task_parity

from longcat_convert.core import progress
from longcat_convert.validation.run import ValidateOptions, validate_tree
from tests.helpers import run_cli


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_wanted_on_a_terminal_unless_quiet():
    assert progress.wanted(False, Terminal())
    assert not progress.wanted(True, Terminal())
    assert not progress.wanted(False, io.StringIO())


def test_nothing_is_reported_unless_a_command_asks():
    assert not progress.active()
    with progress.stage("quiet"):
        pass
    assert list(progress.steps(range(3), 3, "quiet")) == [0, 1, 2]
    with progress.reporting(False, Terminal()):
        assert not progress.active()


def test_a_task_names_each_of_its_stages(tiny_raw):
    screen = Terminal()
    with progress.reporting(True, screen), progress.scope("t2v"):
        pipe = load_pipeline(tiny_raw, "float32")
        result = text_to_video(pipe, "a cat", RandomStreams.from_seed(0), height=32, width=32, num_frames=5,
                               steps=3, max_sequence_length=8)
    shown = screen.getvalue()
    for stage in ("t2v: loading the model", "t2v: text encoding", "t2v: denoising", "0/3", "t2v: VAE decode"):
        assert stage in shown, stage
    # the same run without reporting gives the same result (progress never touches the computation)
    again = text_to_video(pipe, "a cat", RandomStreams.from_seed(0), height=32, width=32, num_frames=5, steps=3,
                          max_sequence_length=8)
    assert np.array_equal(result.frames, again.frames)


def test_long_video_names_segments_and_refine_windows(tiny_raw):
    screen = Terminal()
    with progress.reporting(True, screen):
        report = task_parity(tiny_raw, tiny_raw, tasks=["long"], steps=2)
    assert report["passed"]
    shown = screen.getvalue()
    for stage in ("raw tree: task 1/1 long: t2v: denoising", "continuation 1/1: VAE encode",
                  "refine window 2/2: denoising", "converted tree: loading the model"):
        assert stage in shown, stage


def test_validate_deep_and_forward_parity_report_progress(tiny_raw):
    screen = Terminal()
    with progress.reporting(True, screen):
        assert validate_tree(tiny_raw, ValidateOptions(deep=True))["valid"]
        assert forward_parity(tiny_raw, tiny_raw, cases=["plain"])["passed"]
    shown = screen.getvalue()
    assert "validate --deep" in shown and "raw tree: forward cases" in shown
    assert "converted tree: loading the DiT" in shown


def test_the_cli_shows_no_progress_when_stderr_is_not_a_terminal(tiny_raw, tmp_path):
    result = run_cli("run", tiny_raw, "--task", "t2v", "--height", "32", "--width", "32", "--num-frames", "5",
                     "--steps", "2", "--max-sequence-length", "8", "-o", tmp_path / "out.npz")
    assert result.exit_code == 0, result.output
    assert "denoising" not in result.output and "run t2v: 32x32" in result.output
    quiet = run_cli("run", tiny_raw, "--task", "t2v", "--height", "32", "--width", "32", "--num-frames", "5",
                    "--steps", "2", "--max-sequence-length", "8", "-q", "-o", tmp_path / "quiet.npz")
    assert "run t2v" not in quiet.output and "t2v: 5 frames 32x32" in quiet.output
