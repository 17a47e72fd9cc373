"""The source cannot change under a conversion.

Every byte converted comes from the files the plan was made from (read from the descriptors the tree was
read from), and a source file that another process replaces, rewrites (even with its mtime put back),
truncates, extends or removes at any point between planning and the commit ends the conversion with one
line naming that file, exit code 2, and nothing at the destination. A conversion hook at a named
crash point (`longcat_convert.execute.crash_point`) changes the file at an exact moment.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from longcat_convert import conversion as convert_module
from longcat_convert import execute as execute_module
from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.io import SourceFiles, read_header, tensor_range
from tests.helpers import run_cli

CHANGED = "changed while it was being converted"


# ---- what another process might do to a file -----------------------------------------------------------


def replace_with_longer_header(path: Path) -> None:
    """Same tensors, same values, a longer header (so every offset moves), atomically renamed into place."""
    tensors = load_file(path)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, temporary, metadata={"format": "pt", "padding": "x" * 4096})
    os.replace(temporary, path)


def replace_with_identical_copy(path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    shutil.copy2(path, temporary)
    os.replace(temporary, path)


def rewrite_in_place_keeping_mtime(path: Path) -> None:
    """Flip the last 16 bytes (tensor data, not the header) and put the timestamps back."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(stat.st_size - 16)
        data = handle.read(16)
        handle.seek(stat.st_size - 16)
        handle.write(bytes(b ^ 0x5A for b in data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 8)


def extend(path: Path) -> None:
    with open(path, "ab") as handle:
        handle.write(bytes(8))


def remove(path: Path) -> None:
    path.unlink()


Mutation = Callable[[Path], None]

# (source file, what happens to it, crash point label it happens at (first label containing this text))
CASES: list[tuple[str, Mutation, str]] = [
    # the reproduction: replaced after planning, same tensors, longer header
    ("dit/diffusion_pytorch_model-00002-of-00006.safetensors", replace_with_longer_header, "planned"),
    ("dit/diffusion_pytorch_model-00002-of-00006.safetensors", replace_with_longer_header, "tensor blocks.1."),
    ("dit/diffusion_pytorch_model-00003-of-00006.safetensors", rewrite_in_place_keeping_mtime, "planned"),
    ("dit/diffusion_pytorch_model-00005-of-00006.safetensors", rewrite_in_place_keeping_mtime, "manifest written"),
    ("dit/diffusion_pytorch_model-00006-of-00006.safetensors", truncate, "tensor blocks.0."),
    ("dit/diffusion_pytorch_model-00001-of-00006.safetensors", extend, "LoRA refinement_lora checked"),
    ("dit/diffusion_pytorch_model-00004-of-00006.safetensors", remove, "index written"),
    ("dit/diffusion_pytorch_model-00006-of-00006.safetensors", replace_with_identical_copy, "configs written"),
    # read while planning: the DiT config (the output's config is made from it) and the shard index
    ("dit/config.json", rewrite_in_place_keeping_mtime, "planned"),
    ("dit/diffusion_pytorch_model.safetensors.index.json", replace_with_identical_copy, "manifest written"),
    ("lora/cfg_step_lora.safetensors", rewrite_in_place_keeping_mtime, "planned"),
    ("lora/refinement_lora.safetensors", replace_with_longer_header, "refinement_lora.safetensors complete"),
    # copied components: changed while being copied, after their copy, or before it
    ("vae/diffusion_pytorch_model.safetensors", rewrite_in_place_keeping_mtime,
     "copying vae/diffusion_pytorch_model.safetensors"),
    ("text_encoder/model.safetensors", replace_with_longer_header, "copied text_encoder/model.safetensors"),
    ("tokenizer/tokenizer.json", truncate, "copying tokenizer/tokenizer.json"),
    ("tokenizer/tokenizer.json", remove, "planned"),
    ("scheduler/scheduler_config.json", extend, "manifest written"),
]


def _change_at(monkeypatch: pytest.MonkeyPatch, label_part: str, action: Callable[[], None]) -> list[str]:
    """Run `action` once, at the first crash point whose label contains `label_part`; returns the labels hit."""
    real = execute_module.crash_point
    fired: list[str] = []

    def hooked(label: str) -> None:
        real(label)
        if not fired and label_part in label:
            fired.append(label)
            action()

    monkeypatch.setattr(execute_module, "crash_point", hooked)
    return fired


def _request(src: Path, dst: Path, **options) -> ConvertRequest:
    return ConvertRequest(src=src, dst=dst, to="fastvideo", max_shard_size="300KB", quiet=True, **options)


@pytest.mark.parametrize("relative, mutation, when", CASES,
                         ids=[f"{Path(r).parent}-{m.__name__}-at-{w.split()[0]}" for r, m, w in CASES])
def test_a_source_changed_mid_conversion_is_refused_and_nothing_is_written(
        raw_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str, mutation: Mutation,
        when: str) -> None:
    victim = raw_copy / relative
    dst = tmp_path / "out" / "fv"
    fired = _change_at(monkeypatch, when, lambda: mutation(victim))
    with pytest.raises(LongcatError) as error:
        convert(_request(raw_copy, dst))
    assert fired, f"no crash point matched {when!r}"
    message = error.value.one_line()
    assert CHANGED in message and str(victim) in message and "nothing was written" in message, message
    assert "\n" not in message and "rerun when nothing writes to the source" in message
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_command_line_says_it_in_one_line_with_exit_code_2(raw_copy: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    victim = raw_copy / "dit/diffusion_pytorch_model-00002-of-00006.safetensors"
    fired = _change_at(monkeypatch, "planned", lambda: replace_with_longer_header(victim))
    result = run_cli("convert", raw_copy, tmp_path / "fv", "--to", "fastvideo", "-q")
    assert fired and result.exit_code == 2
    assert result.output.count("\n") == 1 and CHANGED in result.output and str(victim) in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == [raw_copy]


def test_an_unchanged_source_and_changes_elsewhere_pass(raw_copy: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook itself is harmless: touching a file outside the tree mid-run changes nothing."""
    bystander = tmp_path / "bystander.safetensors"
    shutil.copy(raw_copy / "lora/cfg_step_lora.safetensors", bystander)
    fired = _change_at(monkeypatch, "tensor blocks.1.", lambda: rewrite_in_place_keeping_mtime(bystander))
    manifest = convert(_request(raw_copy, tmp_path / "fv"))
    assert fired and (tmp_path / "fv" / "conversion.json").is_file() and manifest["tensors"]


@pytest.mark.parametrize("relative, mutation", [
    ("dit/diffusion_pytorch_model-00002-of-00006.safetensors", replace_with_longer_header),
    ("dit/config.json", rewrite_in_place_keeping_mtime),
    ("lora/refinement_lora.safetensors", rewrite_in_place_keeping_mtime),
])
def test_a_file_changed_between_validation_and_reading_is_refused(
        raw_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str, mutation: Mutation) -> None:
    """Validation and reading go through the same held files: what is converted is what was validated."""
    victim = raw_copy / relative
    real_read_tree = convert_module.read_tree

    def read_after_a_change(*args, **kwargs):
        mutation(victim)
        return real_read_tree(*args, **kwargs)

    monkeypatch.setattr(convert_module, "read_tree", read_after_a_change)
    with pytest.raises(LongcatError) as error:
        convert(_request(raw_copy, tmp_path / "fv"))
    message = error.value.one_line()
    assert CHANGED in message and str(victim) in message, message
    assert not (tmp_path / "fv").exists()


# ---- the source-file layer itself --------------------------------------------------------------------------


def test_reads_come_from_the_file_that_was_opened_even_after_it_is_replaced(raw_copy: Path) -> None:
    path = raw_copy / "dit/diffusion_pytorch_model-00002-of-00006.safetensors"
    original = path.read_bytes()
    with SourceFiles() as files:
        header = files.header(path)
        name = sorted(header.tensors)[0]
        byte_range = tensor_range(header, name)
        expected = original[byte_range.offset:byte_range.offset + byte_range.length]
        replace_with_longer_header(path)
        assert read_header(path).data_start != header.data_start  # the offsets on disk moved
        assert files.read(byte_range) == expected  # still the planned file's bytes
        with pytest.raises(LongcatError, match="the path now names another file"):
            files.verify()


def test_a_truncated_held_file_reads_as_changed(raw_copy: Path) -> None:
    path = raw_copy / "dit/diffusion_pytorch_model-00001-of-00006.safetensors"
    with SourceFiles() as files:
        header = files.header(path)
        last = max(header.tensors.values(), key=lambda info: info.end)
        os.truncate(path, header.data_start + last.begin)
        with pytest.raises(LongcatError, match="truncated") as error:
            files.read(tensor_range(header, last.name))
        assert CHANGED in str(error.value)


def test_a_file_read_twice_must_still_be_the_file_read_first(raw_copy: Path) -> None:
    path = raw_copy / "dit/config.json"
    with SourceFiles() as files:
        first = files.read_file(path)
        assert files.read_file(path) == first
        rewrite_in_place_keeping_mtime(path)
        with pytest.raises(LongcatError, match=CHANGED):
            files.read_file(path)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    with SourceFiles() as files, pytest.raises(LongcatError, match="not a regular file"):
        files.header(fifo)
    with pytest.raises(LongcatError, match="not a regular file"):
        read_header(fifo)


PROPERTY = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(content=st.binary(min_size=1, max_size=256), change=st.sampled_from(["none", "rewrite", "truncate",
                                                                            "extend", "replace", "remove"]),
       offset=st.integers(0, 255), data=st.binary(min_size=0, max_size=8), keep_times=st.booleans(),
       streamed=st.booleans())
def test_verify_passes_exactly_when_nothing_changed(tmp_path: Path, content: bytes, change: str, offset: int,
                                                    data: bytes, keep_times: bool, streamed: bool) -> None:
    """Any write, whatever it writes (even the same bytes) and whatever it does to the timestamps, is seen."""
    path = tmp_path / "component.bin"
    path.unlink(missing_ok=True)
    path.write_bytes(content)
    with SourceFiles() as files:
        if streamed:
            assert b"".join(files.stream(path)) == content
        else:  # held open, as a safetensors source is (raw range reads need no header)
            assert files.read(_whole(path, len(content))) == content
        before = path.stat()
        _apply(path, change, offset % len(content), data)
        if keep_times and change != "none" and path.exists():
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if change == "none":
            files.verify()
        else:
            with pytest.raises(LongcatError, match=CHANGED):
                files.verify()


def _whole(path: Path, length: int):
    from longcat_convert.core.io import ByteRange

    return ByteRange(path, 0, length)


def _apply(path: Path, change: str, offset: int, data: bytes) -> None:
    if change == "rewrite":
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write(data or b"\0")
    elif change == "truncate":
        os.truncate(path, offset)
    elif change == "extend":
        with open(path, "ab") as handle:
            handle.write(data or b"\0")
    elif change == "replace":
        temporary = path.with_name("replacement.bin")
        temporary.write_bytes(path.read_bytes())
        os.replace(temporary, path)
    elif change == "remove":
        path.unlink()
