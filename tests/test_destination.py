"""One owner per destination: real concurrent `convert` processes, folders appearing at DST mid-run, runs in
another PID namespace, the commit under every kind of interference (with and without renameat2), and
destination and report paths that must fail before any work or just work, leaving nothing behind.

Runs are stopped at exact points with LONGCAT_CONVERT_PAUSE_AT / LONGCAT_CONVERT_KILL_AT
(longcat_convert/faults.py), never with sleeps.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_convert import atomic, execute
from longcat_convert import conversion as convert_module
from longcat_convert.atomic import AtomicDirectory, DestinationLock, lock_file, sibling_stem
from longcat_convert.core.errors import LongcatError
from tests.helpers import run_cli

CONVERT = "from longcat_convert.cli import main; main()"
INVISIBLE_PID = 4_194_999  # above Linux's largest pid_max: no process here can have it


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGCAT_CONVERT_")}
    env.update(extra)
    return env


def _start(src: Path, dst: Path, *args: str, pause_at: str | None = None, pause_dir: Path | None = None,
           prefix: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    if pause_at is not None:
        assert pause_dir is not None
        env.update(LONGCAT_CONVERT_PAUSE_AT=pause_at, LONGCAT_CONVERT_PAUSE_DIR=str(pause_dir))
    command = [*prefix, sys.executable, "-c", CONVERT, "convert", str(src), str(dst), "--to", "fastvideo", "-q",
               "--max-shard-size", "300KB", *args]
    return subprocess.Popen(command, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def _convert_here(src: Path, dst: Path, *args: str) -> tuple[int, str]:
    """The same command in this process (torch is already imported: a rival that fails costs nothing)."""
    result = run_cli("convert", src, dst, "--to", "fastvideo", "-q", "--max-shard-size", "300KB", *args)
    return result.exit_code, result.output


def _wait_until_paused(pause_dir: Path, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 300
    while not (pause_dir / "paused").exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its pause point: {process.communicate()[1]}")
        assert time.monotonic() < deadline, "the run never reached its pause point"
        time.sleep(0.02)
    return (pause_dir / "paused").read_text()


def _one_line_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


def _siblings(dst: Path) -> list[str]:
    """Everything longcat-convert may leave beside DST: its lock file, partials, old trees."""
    stem = sibling_stem(dst.name)
    return sorted(p.name for p in dst.parent.iterdir() if p.name.startswith(f"{stem}."))


def _dtype_of(dst: Path) -> str:
    return json.loads((dst / "conversion.json").read_text())["dtype_policy"]["dtype"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def pause_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "pause"
    folder.mkdir()
    return folder


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# ------------------------------------------------------------------ issue reproductions, real processes


def test_a_folder_created_at_dst_mid_run_is_never_deleted(tiny_raw: Path, out: Path, pause_dir: Path) -> None:
    """The issue's reproduction; the same with --overwrite, and every other kind of intruder, with and
    without renameat2, is in test_commit_replaces_only_what_it_owns."""
    dst = out / "fv"
    run = _start(tiny_raw, dst, pause_at="committing", pause_dir=pause_dir)
    _wait_until_paused(pause_dir, run)
    dst.mkdir()
    (dst / "precious.txt").write_text("x")
    (pause_dir / "go").touch()
    code, stderr = _finish(run)
    assert code == 2 and "appeared" in _one_line_error(stderr) and str(dst) in stderr
    assert _snapshot(dst) == {"precious.txt": b"x"}
    assert _siblings(dst) == []


def test_two_runs_for_one_destination_one_owner(tiny_raw: Path, out: Path, pause_dir: Path) -> None:
    """The holder is paused mid-run with a partial folder full of finished shards; a rival asking to
    overwrite and resume must fail at once, naming the holder, and touch nothing."""
    dst = out / "fv"
    holder = _start(tiny_raw, dst, "--dtype", "bfloat16", pause_at="copied", pause_dir=pause_dir)
    holder_pid = int(_wait_until_paused(pause_dir, holder).split()[0])
    partial = next(p for p in out.iterdir() if ".longcat-partial-" in p.name)
    before = _snapshot(partial)
    code, output = _convert_here(tiny_raw, dst, "--overwrite", "--resume")
    line = _one_line_error(output)
    assert code == 2 and "another longcat-convert run" in line and f"pid {holder_pid} " in line and str(dst) in line
    assert _snapshot(partial) == before and not dst.exists()
    (pause_dir / "go").touch()
    assert _finish(holder)[0] == 0
    assert _dtype_of(dst) == "BF16" and _siblings(dst) == []


def test_simultaneous_runs_exactly_one_wins(tiny_raw: Path, out: Path) -> None:
    """Whatever the interleaving: one run exits 0 and DST holds its output, the other fails in one line
    (the lock is held, or DST already exists)."""
    dst = out / "fv"
    runs = {"BF16": _start(tiny_raw, dst, "--dtype", "bfloat16"), "keep": _start(tiny_raw, dst)}
    results = {dtype: _finish(run) for dtype, run in runs.items()}
    winners = [dtype for dtype, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    loser = next(dtype for dtype in results if dtype not in winners)
    code, stderr = results[loser]
    line = _one_line_error(stderr)
    assert code == 2 and ("another longcat-convert run" in line or "already exists" in line), line
    assert _dtype_of(dst) == winners[0] and _siblings(dst) == []


def _can_unshare_pid() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_live_run_in_another_pid_namespace_is_respected(tiny_raw: Path, out: Path, pause_dir: Path) -> None:
    """As a run in another container on the same volume: its PID means nothing here, its lock does."""
    if not _can_unshare_pid():
        pytest.skip("cannot create a PID namespace here; test_a_partial_named_by_an_invisible_pid covers the logic")
    dst = out / "fv"
    holder = _start(tiny_raw, dst, pause_at="copied", pause_dir=pause_dir, prefix=("unshare", "--pid", "--fork"))
    holder_pid = int(_wait_until_paused(pause_dir, holder).split()[0])
    assert holder_pid != holder.pid  # it sees itself under a PID that is not its PID here
    partial = next(p for p in out.iterdir() if ".longcat-partial-" in p.name)
    before = _snapshot(partial)
    code, output = _convert_here(tiny_raw, dst, "--resume")
    assert code == 2 and "another longcat-convert run" in _one_line_error(output)
    assert _snapshot(partial) == before
    (pause_dir / "go").touch()
    assert _finish(holder)[0] == 0
    assert (dst / "conversion.json").is_file() and _siblings(dst) == []


LOCK_HOLDER = """
import sys
from pathlib import Path
from longcat_convert.atomic import DestinationLock, lock_file
dst = Path(sys.argv[1])
lock = DestinationLock(lock_file(dst), dst)
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def test_a_partial_named_by_an_invisible_pid_is_neither_deleted_nor_adopted(tiny_raw: Path, out: Path,
                                                                           pause_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial named the old way, by a PID that does not exist here, whose run's lock is held: liveness is
    the lock. Once the lock dies, the same partial is adopted by --resume."""
    dst = out / "fv"
    killed = _start(tiny_raw, dst, pause_at="copied", pause_dir=pause_dir)
    _wait_until_paused(pause_dir, killed)
    killed.kill()
    killed.communicate(timeout=60)
    partial = next(p for p in out.iterdir() if ".longcat-partial-" in p.name)
    invisible = partial.rename(out / f".fv.longcat-partial-{INVISIBLE_PID}-0123abcd")
    before = _snapshot(invisible)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(dst)], env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, output = _convert_here(tiny_raw, dst, "--resume")
        assert code == 2 and "another longcat-convert run" in _one_line_error(output)
        assert _snapshot(invisible) == before and not dst.exists()
    finally:
        holder.communicate(input="", timeout=60)
    written = []
    real_write_shard = execute._write_shard
    monkeypatch.setattr(execute, "_write_shard", lambda *a, **k: written.append(a[1].file) or real_write_shard(*a, **k))
    code, output = _convert_here(tiny_raw, dst, "--resume")
    assert code == 0, output
    assert written == [], "the partial was not adopted"
    assert _siblings(dst) == []


def test_overwrite_has_no_moment_without_destination(tiny_raw: Path, out: Path, pause_dir: Path) -> None:
    """Killed right after the swap: DST is already the complete new tree, the old one sits in a leftover
    that the next run deletes."""
    dst = out / "fv"
    assert _convert_here(tiny_raw, dst)[0] == 0
    run = _start(tiny_raw, dst, "--overwrite", "--dtype", "bfloat16", pause_at="old destination swapped out",
                 pause_dir=pause_dir)
    _wait_until_paused(pause_dir, run)
    run.kill()
    run.communicate(timeout=60)
    assert _dtype_of(dst) == "BF16"
    from longcat_convert.validation.run import ValidateOptions, validate_tree

    assert validate_tree(dst, ValidateOptions(deep=True))["valid"]
    assert len([name for name in _siblings(dst) if ".longcat-partial-" in name]) == 1
    assert _convert_here(tiny_raw, dst, "--overwrite")[0] == 0
    assert _dtype_of(dst) == "keep" and _siblings(dst) == []


# ------------------------------------------------------------------------------------------- the lock


CHURN = """
import os, sys
from pathlib import Path
from longcat_convert.atomic import DestinationLock, lock_file
from longcat_convert.core.errors import LongcatError
dst, inside, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
held = 0
while held < rounds:
    lock = DestinationLock(lock_file(dst), dst)
    try:
        lock.acquire()
    except LongcatError:
        continue
    try:
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
    except FileExistsError:
        sys.exit("two holders at once")
    os.close(fd)
    os.unlink(inside)
    held += 1
    lock.release()
"""


def test_the_lock_has_one_holder_under_churn(tmp_path: Path) -> None:
    """Three processes take and release (and so unlink) the lock file of one DST as fast as they can: never
    two holders at once, whatever the unlink/flock interleaving, and no lock file left at the end."""
    dst = tmp_path / "fv"
    inside = tmp_path / "inside"
    workers = [subprocess.Popen([sys.executable, "-c", CHURN, str(dst), str(inside), "400"], env=_env(),
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(w.wait(timeout=300), w.stderr.read() if w.stderr else "") for w in workers]
    assert all(code == 0 for code, _ in results), results
    assert list(tmp_path.iterdir()) == []


def test_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    dst = tmp_path / "fv"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(dst)], env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    rival = DestinationLock(lock_file(dst), dst)
    with pytest.raises(LongcatError, match=f"another longcat-convert run .*pid {holder.pid} on "):
        rival.acquire()
    holder.kill()  # SIGKILL: no cleanup ran, the lock file stays, the lock itself is gone
    holder.communicate(timeout=60)
    assert lock_file(dst).exists()
    rival.acquire()
    rival.release()
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- the commit under interference (in-process)


def _write_old(dst: Path) -> None:
    dst.mkdir()
    (dst / "old.txt").write_text("old")


def _new_folder_with_precious(dst: Path) -> None:
    dst.mkdir()
    (dst / "precious.txt").write_text("x")


def _replace_with_precious(dst: Path) -> None:
    dst.rename(dst.with_name("moved-away"))
    _new_folder_with_precious(dst)


def _replace_with_file(dst: Path) -> None:
    shutil.rmtree(dst)
    dst.write_text("x")


# (name, DST existed at the start, overwrite, what happens to DST during the run, commits?)
SCENARIOS: list[tuple[str, bool, bool, Callable[[Path], None] | None, bool]] = [
    ("free", False, False, None, True),
    ("folder appears", False, False, _new_folder_with_precious, False),
    ("folder appears, overwrite", False, True, _new_folder_with_precious, False),
    ("empty folder appears", False, False, lambda d: d.mkdir(), False),
    ("file appears", False, False, lambda d: d.write_text("x"), False),
    ("symlink appears", False, True, lambda d: d.symlink_to(d.parent), False),
    ("overwrite, unchanged", True, True, None, True),
    ("overwrite, same folder with new content", True, True, lambda d: (d / "new.txt").write_text("n"), True),
    ("overwrite, removed", True, True, shutil.rmtree, True),
    ("overwrite, replaced by another folder", True, True, _replace_with_precious, False),
    ("overwrite, replaced by a file", True, True, _replace_with_file, False),
]

RENAMES = {
    "renameat2": None,
    "no renameat2 in libc": lambda: None,
    "file system refuses the flags": lambda: _failing_renameat2(errno.EINVAL),
}


def _failing_renameat2(code: int) -> Callable[..., int]:
    def refuse(*args) -> int:
        ctypes.set_errno(code)
        return -1
    return refuse


@pytest.mark.parametrize("rename", list(RENAMES))
@pytest.mark.parametrize("name,existed,overwrite,interfere,commits", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_commit_replaces_only_what_it_owns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename: str, name: str,
                                           existed: bool, overwrite: bool, interfere: Callable[[Path], None] | None,
                                           commits: bool) -> None:
    if RENAMES[rename] is not None:
        monkeypatch.setattr(atomic, "_renameat2", RENAMES[rename]())
    dst = tmp_path / "fv"
    if existed:
        _write_old(dst)
    try:
        with AtomicDirectory(dst, overwrite=overwrite) as work:
            (work / "new.bin").write_bytes(b"new")
            if interfere is not None:
                interfere(dst)
                intruder = None if not os.path.lexists(dst) else (
                    _snapshot(dst) if dst.is_dir() and not dst.is_symlink() else os.lstat(dst).st_ino)
    except LongcatError as error:
        assert not commits, error
        assert "left untouched" in error.one_line()
        after = _snapshot(dst) if dst.is_dir() and not dst.is_symlink() else os.lstat(dst).st_ino
        assert after == intruder
    else:
        assert commits
        assert _snapshot(dst) == {"new.bin": b"new"}
    assert _siblings(dst) == []
    if (tmp_path / "moved-away").exists():
        assert _snapshot(tmp_path / "moved-away") == {"old.txt": b"old"}


def test_a_swap_that_caught_an_intruder_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DST replaced between the identity check and the exchange: the exchange is verified and swapped back."""
    dst = tmp_path / "fv"
    _write_old(dst)
    real = atomic.renameat2
    intruded = []

    def intruding_rename(source: Path, target: Path, flags: int) -> None:
        if flags == atomic.RENAME_EXCHANGE and not intruded:
            _replace_with_precious(dst)
            intruded.append(True)
        real(source, target, flags)

    monkeypatch.setattr(atomic, "renameat2", intruding_rename)
    with pytest.raises(LongcatError, match="left untouched"):
        with AtomicDirectory(dst, overwrite=True) as work:
            (work / "new.bin").write_bytes(b"new")
    assert intruded
    assert _snapshot(dst) == {"precious.txt": b"x"}
    assert _snapshot(tmp_path / "moved-away") == {"old.txt": b"old"}
    assert _siblings(dst) == []


def test_leftovers_named_like_partials_are_never_followed(tmp_path: Path) -> None:
    """A symlink or a file named like a partial is removed as a name; its target is not adopted or deleted."""
    dst = tmp_path / "fv"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("k")
    (tmp_path / ".fv.longcat-partial-0123456789ab").symlink_to(elsewhere)
    (tmp_path / ".fv.longcat-old-0123456789ab").write_text("junk")
    adopted = []
    with AtomicDirectory(dst, adopt=lambda p: adopted.append(p) or True) as work:
        (work / "a").write_text("a")
    assert adopted == [] and _snapshot(elsewhere) == {"keep.txt": b"k"}
    assert _siblings(dst) == []


# ---------------------------------------------------------------------------- sibling names (property)


NAME_CHARS = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))


@settings(max_examples=300, deadline=None)
@given(first=st.text(NAME_CHARS, min_size=1, max_size=255), second=st.text(NAME_CHARS, min_size=1, max_size=255),
       limit=st.sampled_from([143, 255]))
def test_sibling_names_fit_and_never_mix_destinations(first: str, second: str, limit: int) -> None:
    names = [n for n in (first, second) if len(os.fsencode(n)) <= limit]
    for name in names:
        stem = sibling_stem(name, limit)
        assert stem == sibling_stem(name, limit)
        for suffix in (".longcat-lock", ".longcat-partial-0123456789ab", ".longcat-old-0123456789ab"):
            assert len(os.fsencode(stem + suffix)) <= limit
    if len(names) == 2 and first != second:
        stems = [sibling_stem(n, limit) for n in names]
        assert stems[0] != stems[1]
        pattern = atomic._leftover_pattern(stems[0])
        assert not pattern.fullmatch(f"{stems[1]}.longcat-partial-0123456789ab")


# ------------------------------------------------------------------- destination and report paths (CLI)


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any reading of the source tree means the refusal came too late."""
    def refuse(*args, **kwargs):
        raise AssertionError("the source was read before the destination was checked")
    monkeypatch.setattr(convert_module, "read_tree", refuse)


def _case_file_at_dst(tmp: Path) -> Path:
    (tmp / "fv").write_text("mine")
    return tmp / "fv"


def _case_symlink_to_folder(tmp: Path) -> Path:
    (tmp / "real").mkdir()
    (tmp / "real" / "keep.txt").write_text("k")
    (tmp / "fv").symlink_to(tmp / "real")
    return tmp / "fv"


def _case_dangling_symlink(tmp: Path) -> Path:
    (tmp / "fv").symlink_to(tmp / "nowhere")
    return tmp / "fv"


def _case_parent_is_a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("f")
    return tmp / "file" / "fv"


def _case_ancestor_is_a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("f")
    return tmp / "file" / "a" / "b" / "fv"


# (name, setup returning DST, extra arguments, text the one-line error must hold)
REFUSALS: list[tuple[str, Callable[[Path], Path], tuple[str, ...], str]] = [
    ("file at DST", _case_file_at_dst, (), "already exists"),
    ("file at DST, overwrite", _case_file_at_dst, ("--overwrite",), "not a directory"),
    ("symlink to a folder", _case_symlink_to_folder, (), "symbolic link"),
    ("symlink to a folder, overwrite", _case_symlink_to_folder, ("--overwrite",), "symbolic link"),
    ("dangling symlink", _case_dangling_symlink, ("--overwrite",), "symbolic link"),
    ("parent is a file", _case_parent_is_a_file, (), "is not a folder"),
    ("ancestor is a file", _case_ancestor_is_a_file, (), "is not a folder"),
    ("name of 256 bytes", lambda tmp: tmp / ("n" * 256), (), "256 bytes"),
    ("name of 256 bytes in 2-byte characters", lambda tmp: tmp / ("é" * 128), (), "256 bytes"),
    ("name reserved for the lock file", lambda tmp: tmp / ".fv.longcat-lock", (), "reserved"),
    ("name reserved for partials", lambda tmp: tmp / ".fv.longcat-partial-0123456789ab", (), "reserved"),
    ("report in a missing folder", lambda tmp: tmp / "fv", ("--report", "{tmp}/missing/r.json"), "does not exist"),
    ("report inside DST", lambda tmp: tmp / "fv", ("--report", "{tmp}/fv/r.json"), "inside the destination"),
    ("report inside SRC", lambda tmp: tmp / "fv", ("--report", "{src}/r.json"), "inside the source"),
    ("report is a folder", lambda tmp: tmp / "fv", ("--report", "{tmp}"), "is a folder"),
]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("name,setup,extra,expected", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_destination_or_report_fails_before_any_work(tiny_raw: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, name: str,
                                                         setup: Callable[[Path], Path], extra: tuple[str, ...],
                                                         expected: str, dry_run: bool) -> None:
    dst = setup(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    source_before = _snapshot(tiny_raw)
    _no_work(monkeypatch)
    args = [a.format(tmp=tmp_path, src=tiny_raw) for a in extra] + (["--dry-run"] if dry_run else [])
    result = run_cli("convert", tiny_raw, dst, "--to", "fastvideo", "-q", *args)
    assert result.exit_code == 2 and expected in _one_line_error(result.output), result.output
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert _snapshot(tiny_raw) == source_before


def test_a_destination_held_by_another_run_fails_before_any_work(tiny_raw: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """DST is claimed before planning: the rival reads nothing, whatever it asks for."""
    dst = tmp_path / "fv"
    lock = DestinationLock(lock_file(dst), dst)
    lock.acquire()
    try:
        _no_work(monkeypatch)
        result = run_cli("convert", tiny_raw, dst, "--to", "fastvideo", "-q", "--overwrite", "--resume")
        line = _one_line_error(result.output)
        assert result.exit_code == 2 and "another longcat-convert run" in line and f"pid {os.getpid()} " in line
    finally:
        lock.release()
    assert list(tmp_path.iterdir()) == []


def test_read_only_parent_fails_before_any_work(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(parent)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        parent.chmod(0o500)
        if os.access(parent, os.W_OK):
            pytest.skip("neither a read-only mount nor file modes can make a folder unwritable here")
    try:
        _no_work(monkeypatch)
        result = run_cli("convert", tiny_raw, parent / "out" / "fv", "--to", "fastvideo", "-q")
        assert result.exit_code == 2 and "not writable" in _one_line_error(result.output)
        assert list(parent.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(parent)], capture_output=True)
        parent.chmod(0o700)


def test_longest_name_and_missing_parents_just_work(tiny_raw: Path, tmp_path: Path) -> None:
    longest = tmp_path / "a" / "b" / ("n" * atomic.name_max(tmp_path))
    report = tmp_path / "report.json"
    result = run_cli("convert", tiny_raw, longest, "--to", "fastvideo", "-q", "--report", report)
    assert result.exit_code == 0, result.output
    assert (longest / "conversion.json").is_file() and _siblings(longest) == []
    assert json.loads(report.read_text())["tool"] == "longcat-convert"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "report.json"]


def test_failed_run_removes_the_parents_it_created(tiny_raw: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from longcat_convert import execute

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(execute, "_write_shard", full)
    result = run_cli("convert", tiny_raw, tmp_path / "a" / "b" / "fv", "--to", "fastvideo", "-q")
    assert result.exit_code == 2 and "no space left" in _one_line_error(result.output)
    assert list(tmp_path.iterdir()) == []


def test_report_through_a_symlink_is_written_to_its_target_whole(tiny_raw: Path, tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    target = tmp_path / "reports" / "r.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    result = run_cli("convert", tiny_raw, tmp_path / "fv", "--to", "fastvideo", "-q", "--dry-run",
                     "--report", tmp_path / "link.json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link.json").is_symlink() and json.loads(target.read_text())["dry_run"] is True
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["r.json"]


def test_validate_and_parity_check_the_report_path_first(tiny_raw: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import longcat_reference.dit_parity as parity

    from longcat_convert.cli import validate as cli_validate

    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the report path was checked")

    monkeypatch.setattr(cli_validate, "validate_tree", refuse)
    monkeypatch.setattr(parity, "weights_parity", refuse)
    missing = tmp_path / "missing" / "r.json"
    for command in (("validate", tiny_raw), ("parity", tiny_raw, tiny_raw)):
        result = run_cli(*command, "--report", missing)
        assert result.exit_code == 2 and "does not exist" in _one_line_error(result.output), result.output
    assert list(tmp_path.iterdir()) == []
