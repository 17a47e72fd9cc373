"""A big output is written several files at a time (execute.PARALLEL_BYTES): the result must be byte-identical to
writing file by file, a failure in one file must stop the others and leave nothing behind, and a run killed
anywhere must resume to the same bytes. The tiny tree is far below the threshold, so these tests lower it."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

import pytest

from longcat_convert import execute
from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core.errors import LongcatError
from tests.helpers import file_digests, run_convert_process

# the CLI with every output written in parallel, as a full-size tree would be
PARALLEL_CLI = "import longcat_convert.execute as e; e.PARALLEL_BYTES = 0; from longcat_convert.cli import main; main()"


def _convert(src: Path, dst: Path) -> dict:
    return convert(ConvertRequest(src=src, dst=dst, to="fastvideo", max_shard_size="300KB", quiet=True))


def _output_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("longcat-output")]


@pytest.fixture(scope="module")
def serial_output(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("serial") / "fv"
    _convert(tiny_raw, dst)
    return dst


def test_parallel_output_is_byte_identical_to_serial(tiny_raw: Path, serial_output: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execute, "PARALLEL_BYTES", 0)
    started: list[str] = []
    original = execute._Outputs.write_shard

    def recording(self: execute._Outputs, shard) -> None:
        started.append(threading.current_thread().name)
        original(self, shard)

    monkeypatch.setattr(execute._Outputs, "write_shard", recording)
    manifest = _convert(tiny_raw, tmp_path / "fv")
    assert started and all(name.startswith("longcat-output") for name in started)  # the parallel path did run
    assert file_digests(tmp_path / "fv") == file_digests(serial_output)  # the manifest too: records in plan order
    assert [c["adapter"] for c in manifest["lora_checks"]] == ["cfg_step_lora", "refinement_lora"]
    assert _output_threads() == []


def test_a_failed_file_stops_the_file_being_written_beside_it(tiny_raw: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The VAE copy fails while a shard is half written on the other thread: the error is the copy's, the shard
    stops at its next chunk, and nothing is left at the destination."""
    monkeypatch.setattr(execute, "PARALLEL_BYTES", 0)
    original_place_file, original_update = execute._place_file, execute._SharedProgress.update
    original_write_shard = execute._write_shard
    in_shard = threading.local()
    held: list[str] = []  # the one thread held half-way through a shard
    claim = threading.Lock()
    shard_half_written = threading.Event()
    stopped: list[str] = []

    def marked_write_shard(*args, **kwargs):
        in_shard.active = True
        try:
            return original_write_shard(*args, **kwargs)
        finally:
            in_shard.active = False

    def held_update(self: execute._SharedProgress, count: int) -> None:
        name = threading.current_thread().name
        if getattr(in_shard, "active", False):
            with claim:
                if not held:
                    held.append(name)
                    shard_half_written.set()
            if held == [name]:
                assert self.stop.wait(30)  # until the conversion has failed
        try:
            original_update(self, count)
        except execute._Stopped:
            stopped.append(name)
            raise

    def failing_place_file(files, source, target, relative, progress, link):
        if relative.startswith("vae/"):
            assert shard_half_written.wait(30)
            raise LongcatError("cannot read this file", source, "replace it")
        return original_place_file(files, source, target, relative, progress, link)

    monkeypatch.setattr(execute, "_write_shard", marked_write_shard)
    monkeypatch.setattr(execute._SharedProgress, "update", held_update)
    monkeypatch.setattr(execute, "_place_file", failing_place_file)
    dst = tmp_path / "out" / "fv"
    dst.parent.mkdir()
    with pytest.raises(LongcatError, match="cannot read this file"):
        _convert(tiny_raw, dst)
    assert held and held[0] in stopped  # the half-written shard stopped at its next chunk
    assert list(dst.parent.iterdir()) == []
    assert _output_threads() == []


def test_shared_progress_stops_every_thread_at_its_next_update() -> None:
    counted: list[int] = []

    class Bar:
        def update(self, count: int) -> None:
            counted.append(count)

    progress = execute._SharedProgress(Bar())  # type: ignore[arg-type]
    progress.update(3)
    progress.stop.set()
    with pytest.raises(execute._Stopped):
        progress.update(4)
    assert counted == [3]


def _run(src: Path, dst: Path, *extra: str, kill_at: int | None = None, trace: bool = False
         ) -> subprocess.CompletedProcess:
    return run_convert_process(src, dst, *extra, kill_at=kill_at, trace=trace, cli=PARALLEL_CLI)


def test_parallel_run_killed_anywhere_resumes_to_the_same_bytes(tiny_raw: Path, serial_output: Path,
                                                                tmp_path: Path) -> None:
    traced = _run(tiny_raw, tmp_path / "traced", kill_at=10**9, trace=True)
    assert traced.returncode == 0, traced.stderr
    total = sum(line.startswith("crash point ") for line in traced.stderr.splitlines())
    for point in sorted({1 + (total - 1) * i // 5 for i in range(6)}):
        dst = tmp_path / f"fv-{point}"
        killed = _run(tiny_raw, dst, kill_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        resumed = _run(tiny_raw, dst, "--resume")
        assert resumed.returncode == 0, (point, resumed.stderr)
        assert file_digests(dst) == file_digests(serial_output), point
        assert not [p for p in tmp_path.iterdir() if ".longcat-partial-" in p.name], point
