"""The safetensors I/O layer against the official `safetensors` library, its error paths, and shard indexes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longcat_convert.core.errors import HeaderError, LongcatError
from longcat_convert.core.io import (
    ShardWriter,
    TensorEntry,
    encode_header,
    index_name,
    iter_chunks,
    read_bytes,
    read_header,
    read_index,
    read_tensor,
    shard_name,
    tensor_range,
    write_index,
)
from longcat_convert.core.io import header as header_module
from longcat_convert.core.io.header import MAX_HEADER_BYTES

# safetensors dtype names, written out here rather than taken from longcat_convert.core.dtypes
ST_NAME: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
METADATA = {"format": "pt", "note": "päinted ünicode", "empty": ""}


def as_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert tuple(actual.shape) == tuple(expected.shape)
    assert as_bytes(actual) == as_bytes(expected)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    bf16 = torch.randn(5, 6, generator=g).to(torch.bfloat16)
    bf16[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")])
    return {
        "model.bf16": bf16,
        "model.f16": torch.randn(7, generator=g).to(torch.float16),
        "model.f32": torch.randn(4, 3, 2, generator=g),
        "model.f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "model.i64": torch.randint(-(2**62), 2**62, (6,), generator=g, dtype=torch.int64),
        "model.i32": torch.randint(-(2**30), 2**30, (2, 5), generator=g, dtype=torch.int32),
        "model.i16": torch.randint(-(2**15), 2**15, (3,), generator=g, dtype=torch.int16),
        "model.i8": torch.randint(-128, 128, (4, 1), generator=g, dtype=torch.int8),
        "model.u8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "model.bool": torch.randint(0, 2, (3, 3), generator=g).bool(),
        "model.f8e4m3": torch.randn(4, 2, generator=g).to(torch.float8_e4m3fn),
        "model.f8e5m2": torch.randn(2, 4, generator=g).to(torch.float8_e5m2),
        "scalar.f32": torch.tensor(3.25),
        "scalar.bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "scalar.i64": torch.tensor(-(2**40), dtype=torch.int64),
        "empty.rows": torch.zeros(0, 4),
        "empty.cols": torch.zeros(3, 0, dtype=torch.bfloat16),
        "empty.1d": torch.zeros(0, dtype=torch.int64),
    }


def raw_header(path: Path) -> tuple[int, dict]:
    """The header length and JSON of a safetensors file, parsed here without the code under test."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return length, json.loads(blob[8 : 8 + length])


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "reference.safetensors"
    save_file(sample_tensors(), str(path), metadata=METADATA)
    return path


# --- reading files written by the official library ------------------------------------------------------


def test_read_header_matches_official_file(reference_file: Path) -> None:
    tensors = sample_tensors()
    header_len, raw = raw_header(reference_file)
    header = read_header(reference_file)

    assert header.path == reference_file
    assert header.header_len == header_len
    assert header.data_start == 8 + header_len
    assert header.file_size == reference_file.stat().st_size
    assert header.metadata == METADATA
    assert set(header.tensors) == set(tensors)
    for name, tensor in tensors.items():
        info = header.tensors[name]
        assert info.name == name
        assert info.dtype == ST_NAME[tensor.dtype]
        assert info.shape == tuple(tensor.shape)
        assert [info.begin, info.end] == raw[name]["data_offsets"]
        assert info.nbytes == tensor.numel() * tensor.element_size()
        assert info.numel == tensor.numel()


def test_read_tensor_matches_official_loader(reference_file: Path) -> None:
    header = read_header(reference_file)
    expected = load_file(str(reference_file))
    assert set(expected) == set(header.tensors)
    for name, tensor in expected.items():
        assert_bitwise_equal(read_tensor(header, name), tensor)


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("model.bf16", (1, 4)),
        ("model.bf16", (0, 5)),
        ("model.bf16", (5, 5)),
        ("model.f32", (2, 3)),
        ("model.i64", (0, 1)),
        ("model.bool", (1, 3)),
        ("model.f8e4m3", (3, 4)),
        ("empty.rows", (0, 0)),
        ("empty.cols", (1, 3)),
    ],
)
def test_read_tensor_row_block_matches_official(reference_file: Path, name: str, rows: tuple[int, int]) -> None:
    header = read_header(reference_file)
    full = load_file(str(reference_file))[name]
    block = read_tensor(header, name, rows=rows)
    assert_bitwise_equal(block, full[rows[0] : rows[1]])
    with safe_open(str(reference_file), framework="pt") as handle:
        assert_bitwise_equal(block, handle.get_slice(name)[rows[0] : rows[1]])


def test_read_header_of_empty_official_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    header = read_header(path)
    assert header.tensors == {}
    assert header.data_start == path.stat().st_size


# --- writing files the official library reads ------------------------------------------------------------


def chunked(data: bytes, sizes: tuple[int, ...] = (1, 0, 3, 7, 64)) -> Iterator[bytes]:
    """`data` in pieces of varying sizes, including empty pieces."""
    position, turn = 0, 0
    while position < len(data):
        size = sizes[turn % len(sizes)]
        yield data[position : position + size]
        position += size
        turn += 1


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, str]:
    entries = [TensorEntry(name, ST_NAME[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    with ShardWriter(path, entries, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write_tensor(name, chunked(as_bytes(tensor)))
    return writer.digests


@pytest.mark.parametrize("metadata", [METADATA, None])
def test_shard_writer_output_loads_with_official_library(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    tensors = sample_tensors()
    path = tmp_path / "written.safetensors"
    digests = write_shard(path, tensors, metadata)

    assert digests == {name: hashlib.sha256(as_bytes(t)).hexdigest() for name, t in tensors.items()}
    header_len, _ = raw_header(path)
    assert header_len % 8 == 0
    assert path.stat().st_size == 8 + header_len + sum(t.numel() * t.element_size() for t in tensors.values())

    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert_bitwise_equal(loaded[name], tensor)

    with safe_open(str(path), framework="pt") as handle:
        assert (handle.metadata() or {}) == (metadata or {})
        assert set(handle.keys()) == set(tensors)
        for name, tensor in tensors.items():
            assert_bitwise_equal(handle.get_tensor(name), tensor)

    header = read_header(path)
    assert header.metadata == (metadata or {})
    for name, tensor in tensors.items():
        assert_bitwise_equal(read_tensor(header, name), tensor)


def test_encode_header_round_trips_through_read_header(tmp_path: Path) -> None:
    entries = [
        TensorEntry("w", "BF16", (3, 4)),
        TensorEntry("scalar", "F32", ()),
        TensorEntry("empty", "I64", (0, 5)),
        TensorEntry("mask", "BOOL", (7,)),
        TensorEntry("big", "F64", (2, 2, 2)),
    ]
    sizes = {"w": 24, "scalar": 4, "empty": 0, "mask": 7, "big": 64}  # by hand: numel * itemsize
    blob = encode_header(entries, {"a": "b"})
    (length,) = struct.unpack("<Q", blob[:8])
    assert length == len(blob) - 8 and length % 8 == 0

    path = tmp_path / "encoded.safetensors"
    path.write_bytes(blob + bytes(range(256))[: sum(sizes.values())])
    header = read_header(path)
    assert header.metadata == {"a": "b"}
    assert list(header.tensors) == [e.name for e in entries]
    offset = 0
    for entry in entries:
        info = header.tensors[entry.name]
        assert (info.dtype, info.shape, info.begin, info.end) == (entry.dtype, entry.shape, offset,
                                                                 offset + sizes[entry.name])
        offset += sizes[entry.name]
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"a": "b"}
        assert as_bytes(handle.get_tensor("w")) == bytes(range(24))
        assert as_bytes(handle.get_tensor("big")) == bytes(range(35, 99))
        assert handle.get_tensor("empty").shape == (0, 5)


# --- writer misuse ---------------------------------------------------------------------------------------


ENTRIES = [TensorEntry("a", "F32", (2,)), TensorEntry("b", "I64", (1,))]


def test_writer_rejects_out_of_order_tensor(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "x.safetensors", ENTRIES)
    with pytest.raises(LongcatError, match="'b' written out of order .expected a"):
        writer.write_tensor("b", [bytes(8)])
    writer.write_tensor("a", [bytes(8)])
    writer.write_tensor("b", [bytes(8)])
    with pytest.raises(LongcatError, match="expected nothing"):
        writer.write_tensor("a", [bytes(8)])
    writer.close()
    assert read_header(tmp_path / "x.safetensors").tensors.keys() == {"a", "b"}


def test_writer_tensor_digests_are_per_tensor_and_only_after_close(tmp_path: Path) -> None:
    a_bytes, b_bytes = bytes(range(8)), b"\xff" * 8
    writer = ShardWriter(tmp_path / "x.safetensors", ENTRIES)
    writer.write_tensor("a", [a_bytes[:3], a_bytes[3:]])
    writer.write_tensor("b", [b_bytes])
    with pytest.raises(LongcatError, match="only after the shard is closed"):
        writer.digests  # noqa: B018  # hashed on a thread: incomplete until close
    writer.close()
    assert writer.digests == {"a": hashlib.sha256(a_bytes).hexdigest(), "b": hashlib.sha256(b_bytes).hexdigest()}


@pytest.mark.parametrize("chunks", [[bytes(7)], [bytes(4), bytes(5)], [], [bytes(8), b"\0"]])
def test_writer_rejects_wrong_byte_count(tmp_path: Path, chunks: list[bytes]) -> None:
    writer = ShardWriter(tmp_path / "x.safetensors", ENTRIES)
    with pytest.raises(LongcatError, match=f"received {sum(map(len, chunks))} bytes, expected 8"):
        writer.write_tensor("a", chunks)
    writer.abort()


def test_writer_close_before_all_tensors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    writer = ShardWriter(path, ENTRIES)
    writer.write_tensor("a", [bytes(8)])
    with pytest.raises(LongcatError, match="closed after 1 of 2 tensors") as info:
        writer.close()
    assert str(path) in str(info.value)
    with pytest.raises(HeaderError, match="past the data buffer"):
        read_header(path)  # the partial shard is not mistaken for a valid one


def test_writer_context_manager_error_aborts(tmp_path: Path) -> None:
    with pytest.raises(LongcatError, match="closed after 0 of 2"):
        with ShardWriter(tmp_path / "x.safetensors", ENTRIES):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "y.safetensors", ENTRIES) as writer:
            writer.write_tensor("a", [bytes(8)])
            raise RuntimeError("boom")


def test_writer_rejects_duplicate_names(tmp_path: Path) -> None:
    path = tmp_path / "dup.safetensors"
    with pytest.raises(LongcatError, match="duplicate"):
        ShardWriter(path, [TensorEntry("a", "F32", (1,)), TensorEntry("a", "F32", (1,))])
    assert not path.exists()


# --- header error paths ----------------------------------------------------------------------------------


def header_bytes(obj: object) -> bytes:
    text = json.dumps(obj).encode()
    return struct.pack("<Q", len(text)) + text


def raw_bytes(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


GOOD = {"a": entry("F32", (2,), (0, 8)), "b": entry("I64", (1,), (8, 16))}

BAD_FILES: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "truncated: 0 bytes, shorter than the 8-byte header length"),
    "shorter than 8 bytes": (b"\x02\0\0\0\0", "truncated: 5 bytes"),
    "header length beyond file": (struct.pack("<Q", 100) + b"{}", "header length 100 runs past the end of the file"),
    "header length above limit": (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds the"),
    "header length 2**63": (struct.pack("<Q", 2**63) + b"{}", "exceeds the"),
    "non-utf8 header": (struct.pack("<Q", 4) + b"{\xff\xfe}", "not valid JSON"),
    "non-json header": (struct.pack("<Q", 6) + b"{abc: ", "not valid JSON"),
    "int with 5000 digits": (raw_bytes(b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}'),
                             "not valid JSON"),
    "deeply nested json": (struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    "header is a list": (header_bytes([GOOD]), "header is not a JSON object"),
    "header is a string": (header_bytes("abc"), "header is not a JSON object"),
    "entry not an object": (header_bytes({"a": [1, 2]}), "entry 'a' is not an object"),
    "unknown dtype": (header_bytes({"a": entry(dtype="F128")}) + bytes(8), "unknown dtype 'F128'"),
    "lowercase dtype": (header_bytes({"a": entry(dtype="f32")}) + bytes(8), "unknown dtype 'f32'"),
    "dtype is a list": (header_bytes({"a": entry(dtype=["F32"])}) + bytes(8), "unknown dtype"),
    "dtype is an object": (header_bytes({"a": entry(dtype={"x": 1})}) + bytes(8), "unknown dtype"),
    "dtype missing": (header_bytes({"a": {"shape": [2], "data_offsets": [0, 8]}}) + bytes(8), "unknown dtype None"),
    "negative shape": (header_bytes({"a": entry(shape=[-2])}) + bytes(8), "invalid shape [-2]"),
    "float shape": (header_bytes({"a": entry(shape=[2.0])}) + bytes(8), "invalid shape [2.0]"),
    "bool shape": (header_bytes({"a": entry("F32", [True, True], (0, 4))}) + bytes(4), "invalid shape [True, True]"),
    "string shape": (header_bytes({"a": entry(shape="2")}) + bytes(8), "invalid shape '2'"),
    "nested shape": (header_bytes({"a": entry(shape=[[2]])}) + bytes(8), "invalid shape"),
    "offsets too short": (header_bytes({"a": entry(offsets=[8])}) + bytes(8), "invalid data_offsets [8]"),
    "offsets too long": (header_bytes({"a": entry(offsets=[0, 8, 8])}) + bytes(8), "invalid data_offsets [0, 8, 8]"),
    "offsets reversed": (header_bytes({"a": entry(offsets=[8, 0])}) + bytes(8), "invalid data_offsets [8, 0]"),
    "offsets negative": (header_bytes({"a": entry("F32", (0,), (-1, -1))}), "invalid data_offsets"),
    "offsets float": (header_bytes({"a": entry(offsets=[0, 8.0])}) + bytes(8), "invalid data_offsets [0, 8.0]"),
    "offsets strings": (header_bytes({"a": entry(offsets=["0", "8"])}) + bytes(8), "invalid data_offsets"),
    "offsets bool": (header_bytes({"a": entry("U8", (1,), (False, True))}) + bytes(1), "invalid data_offsets"),
    "byte count mismatch": (header_bytes({"a": entry("F32", (3,), (0, 8))}) + bytes(8),
                            "'a' spans 8 bytes but F32[3] needs 12"),
    "byte count mismatch bf16": (header_bytes({"a": entry("BF16", (2, 2), (0, 16))}) + bytes(16),
                                 "spans 16 bytes but BF16[2, 2] needs 8"),
    "overlapping tensors": (header_bytes({"a": entry("F32", (2,), (0, 8)), "b": entry("I64", (1,), (4, 12))})
                            + bytes(12), "'b' overlaps the previous tensor"),
    "duplicated range": (header_bytes({"a": entry("F32", (2,), (0, 8)), "b": entry("F32", (2,), (0, 8))})
                         + bytes(8), "overlaps"),
    "gap between tensors": (header_bytes({"a": entry("F32", (2,), (0, 8)), "b": entry("I64", (1,), (12, 20))})
                            + bytes(20), "gap in the data buffer before tensor 'b' (bytes 8..12)"),
    "gap at start": (header_bytes({"a": entry("F32", (2,), (4, 12))}) + bytes(12), "gap in the data buffer"),
    "trailing bytes": (header_bytes(GOOD) + bytes(20), "4 trailing bytes after the last tensor"),
    "trailing bytes, no tensors": (header_bytes({}) + bytes(3), "3 trailing bytes"),
    "truncated data": (header_bytes(GOOD) + bytes(10), "'b' ends at byte 16, past the data buffer (10 bytes)"),
    "data one byte short": (header_bytes(GOOD) + bytes(15), "'b' ends at byte 16, past the data buffer (15 bytes)"),
    "no data at all": (header_bytes(GOOD), "past the data buffer (0 bytes): the file is truncated"),
    "metadata value not a string": (header_bytes({"__metadata__": {"k": 1}, **GOOD}) + bytes(16),
                                    "__metadata__ must map strings to strings"),
    "metadata is a list": (header_bytes({"__metadata__": ["k"], **GOOD}) + bytes(16), "__metadata__"),
    "metadata nested": (header_bytes({"__metadata__": {"k": {"x": "y"}}}), "__metadata__"),
}


def assert_one_line_naming(exc: BaseException, path: Path, defect: str) -> None:
    message = str(exc)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert defect in message


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_read_header_rejects_bad_file(tmp_path: Path, case: str) -> None:
    blob, defect = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert_one_line_naming(info.value, path, defect)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_official_library_also_rejects_bad_file(tmp_path: Path, case: str) -> None:
    """Every file we refuse is refused by the reference implementation too, so no check is spurious."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_FILES[case][0])
    with pytest.raises(Exception):  # noqa: B017 - the library raises SafetensorError or OSError variants
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)


def test_read_header_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(HeaderError) as info:
        read_header(tmp_path)
    assert_one_line_naming(info.value, tmp_path, "is a directory")


def test_read_header_rejects_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert_one_line_naming(info.value, path, "does not exist")


def test_read_header_rejects_path_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    path = tmp_path / "file" / "x.safetensors"
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert_one_line_naming(info.value, path, "not a folder")


def test_read_header_rejects_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.safetensors"
    path.write_bytes(header_bytes(GOOD) + bytes(16))

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(header_module, "open", refuse, raising=False)  # tests run as root, so chmod 0 won't do
    with pytest.raises(HeaderError) as info:
        read_header(path)
    assert_one_line_naming(info.value, path, "permission denied")


def test_read_header_accepts_zero_size_tensors_anywhere(tmp_path: Path) -> None:
    body = {"e0": entry("F32", (0, 3), (0, 0)), "a": entry("F32", (2,), (0, 8)),
            "e1": entry("BF16", (4, 0), (8, 8)), "b": entry("I64", (1,), (8, 16)), "e2": entry("U8", (0,), (16, 16))}
    path = tmp_path / "zeros.safetensors"
    path.write_bytes(header_bytes(body) + bytes(range(16)))
    header = read_header(path)
    assert set(header.tensors) == set(body)
    official = load_file(str(path))
    for name in body:
        assert_bitwise_equal(read_tensor(header, name), official[name])


# --- byte ranges and chunked reads -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rows"), [("model.bf16", (1, 4)), ("model.f32", (0, 4)), ("model.i64", (3, 6)),
                                            ("model.i32", (2, 2)), ("scalar.f32", None), ("empty.cols", (0, 3))])
def test_tensor_range_covers_exactly_the_slice(reference_file: Path, name: str, rows: tuple[int, int] | None) -> None:
    header = read_header(reference_file)
    tensor = load_file(str(reference_file))[name]
    expected = as_bytes(tensor if rows is None else tensor[rows[0] : rows[1]])
    byte_range = tensor_range(header, name, rows)
    assert byte_range.path == reference_file
    assert byte_range.length == len(expected)
    with open(reference_file, "rb") as handle:
        handle.seek(byte_range.offset)
        assert handle.read(byte_range.length) == expected
    assert read_bytes(byte_range) == expected


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 1000])
def test_iter_chunks_reassembles_exactly(reference_file: Path, chunk: int) -> None:
    header = read_header(reference_file)
    tensor = load_file(str(reference_file))["model.f32"]
    byte_range = tensor_range(header, "model.f32", rows=(1, 4))
    pieces = list(iter_chunks(byte_range, chunk))
    assert all(0 < len(p) <= chunk for p in pieces)
    assert len(pieces) == math.ceil(byte_range.length / chunk)
    assert b"".join(pieces) == as_bytes(tensor[1:4])


def test_iter_chunks_of_empty_range_yields_nothing(reference_file: Path) -> None:
    header = read_header(reference_file)
    assert list(iter_chunks(tensor_range(header, "empty.rows"), 4)) == []
    assert read_tensor(header, "empty.rows").shape == (0, 4)


@pytest.mark.parametrize(("name", "rows"), [("model.bf16", (0, 6)), ("model.bf16", (3, 2)), ("model.bf16", (-1, 2)),
                                            ("scalar.f32", (0, 1)), ("scalar.f32", (0, 0))])
def test_bad_row_block_raises_longcat_error(reference_file: Path, name: str, rows: tuple[int, int]) -> None:
    header = read_header(reference_file)
    with pytest.raises(LongcatError, match="row block"):
        tensor_range(header, name, rows)
    with pytest.raises(LongcatError, match="row block"):
        read_tensor(header, name, rows)


@pytest.mark.parametrize("read", [
    lambda header: read_tensor(header, "model.f64"),
    lambda header: read_tensor(header, "model.f64", rows=(1, 3)),
    lambda header: read_bytes(tensor_range(header, "model.f64")),
    lambda header: list(iter_chunks(tensor_range(header, "model.f64"), 4)),
])
def test_file_truncated_after_header_read(tmp_path: Path, read: Callable) -> None:
    tensors = {"first": torch.arange(6, dtype=torch.int32), "model.f64": torch.arange(6, dtype=torch.float64).reshape(3, 2)}
    path = tmp_path / "shrinking.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    begin, end = header.absolute_range(header.tensors["model.f64"])
    os.truncate(path, begin + (end - begin) // 2 + 3)
    with pytest.raises(LongcatError, match="file ended while reading") as info:
        read(header)
    assert str(path) in str(info.value)


# --- shard indexes ---------------------------------------------------------------------------------------


def write_json(path: Path, body: object) -> Path:
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


def test_read_index_valid(tmp_path: Path) -> None:
    body = {"metadata": {"total_size": 4096, "format": "pt"},
            "weight_map": {"a.weight": "m-00002-of-00002.safetensors", "b.weight": "m-00001-of-00002.safetensors",
                           "c.bias": "m-00001-of-00002.safetensors"}}
    path = write_json(tmp_path / "m.safetensors.index.json", body)
    index = read_index(path)
    assert index.path == path
    assert index.weight_map == body["weight_map"]
    assert index.total_size == 4096
    assert index.metadata == body["metadata"]
    assert index.shard_files == ["m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors"]


def test_read_index_without_metadata(tmp_path: Path) -> None:
    index = read_index(write_json(tmp_path / "i.json", {"weight_map": {"a": "x.safetensors"}}))
    assert index.total_size is None
    assert index.shard_files == ["x.safetensors"]


@pytest.mark.parametrize("name", ["../x.safetensors", "/abs/x.safetensors", "sub/x.safetensors", "a\\b", "",
                                  "..", ".", "./x.safetensors", "x.safetensors/", "sub/../x.safetensors",
                                  "C:\\x.safetensors", "//x"])
def test_read_index_refuses_non_bare_names(tmp_path: Path, name: str) -> None:
    path = write_json(tmp_path / "i.json", {"weight_map": {"ok": "x.safetensors", "bad": name}})
    with pytest.raises(LongcatError) as info:
        read_index(path)
    assert_one_line_naming(info.value, path, f"weight_map names {name!r}")


@pytest.mark.parametrize(("text", "defect"), [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ('{"weight_map": {"a": "x"}, "metadata": {"total_size": 1' + "0" * 5000 + "}}", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),
    ("[]", "no `weight_map` object"),
    ('{"metadata": {"total_size": 1}}', "no `weight_map` object"),
    ('{"weight_map": ["x.safetensors"]}', "no `weight_map` object"),
    ('{"weight_map": {"a": 3}}', "weight_map entry 'a' is not a file name"),
    ('{"weight_map": {"a": null}}', "weight_map entry 'a' is not a file name"),
    ('{"weight_map": {}, "metadata": ["x"]}', "`metadata` is not an object"),
    ('{"weight_map": {}, "metadata": {"total_size": "12"}}', "total_size is not a byte count: '12'"),
    ('{"weight_map": {}, "metadata": {"total_size": 1.5}}', "total_size is not a byte count: 1.5"),
    ('{"weight_map": {}, "metadata": {"total_size": true}}', "total_size is not a byte count: True"),
    ('{"weight_map": {}, "metadata": {"total_size": -1}}', "total_size is not a byte count: -1"),
])
def test_read_index_rejects_bad_documents(tmp_path: Path, text: str, defect: str) -> None:
    path = tmp_path / "i.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LongcatError) as info:
        read_index(path)
    assert_one_line_naming(info.value, path, defect)


def test_read_index_rejects_non_utf8_missing_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "i.json"
    path.write_bytes(b'{"weight_map": {"\xff": "x"}}')
    with pytest.raises(LongcatError, match="not valid JSON"):
        read_index(path)
    with pytest.raises(LongcatError, match="does not exist"):
        read_index(tmp_path / "missing.json")
    with pytest.raises(LongcatError, match="directory"):
        read_index(tmp_path)


def test_write_index_round_trip(tmp_path: Path) -> None:
    weight_map = {"z.w": "p-00002-of-00002.safetensors", "a.w": "p-00001-of-00002.safetensors"}
    path = tmp_path / index_name("p")
    write_index(path, weight_map, 123456789012)
    assert json.loads(path.read_text(encoding="utf-8")) == {"metadata": {"total_size": 123456789012},
                                                           "weight_map": weight_map}
    index = read_index(path)
    assert index.weight_map == weight_map
    assert index.total_size == 123456789012
    assert index.shard_files == ["p-00001-of-00002.safetensors", "p-00002-of-00002.safetensors"]


def test_shard_and_index_names() -> None:
    assert shard_name("p", 1, 6) == "p-00001-of-00006.safetensors"
    assert shard_name("diffusion_pytorch_model", 6, 6) == "diffusion_pytorch_model-00006-of-00006.safetensors"
    assert shard_name("model", 1, 1) == "model.safetensors"
    assert shard_name("model", 12, 123456) == "model-00012-of-123456.safetensors"
    assert index_name("diffusion_pytorch_model") == "diffusion_pytorch_model.safetensors.index.json"
