"""Property tests: corrupt safetensors headers and index files only ever raise the tool's own errors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from longcat_convert.core.errors import HeaderError, LongcatError
from longcat_convert.core.io import header as header_module
from longcat_convert.core.io import read_header, read_index, read_tensor
from longcat_convert.core.io.header import MAX_HEADER_BYTES, SafetensorsHeader

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# safetensors dtype sizes, written out here rather than taken from longcat_convert.core.dtypes
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("io-fuzz")


def with_prefix(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


json_scalars = (st.none() | st.booleans() | st.integers(-3, 70) | st.integers(-(2**70), 2**70)
                | st.floats() | st.text(max_size=6) | st.sampled_from(sorted(ITEMSIZE)))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def valid_files(draw: st.DrawFn) -> bytes:
    """A well-formed safetensors file, built here by hand: header order and buffer order may differ."""
    names = draw(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=5))
    assume("__metadata__" not in names)
    specs = {name: (draw(st.sampled_from(sorted(ITEMSIZE))), draw(st.lists(st.integers(0, 4), max_size=3)))
             for name in names}
    offsets, cursor = {}, 0
    for name in draw(st.permutations(names)):
        dtype, shape = specs[name]
        size = math.prod(shape) * ITEMSIZE[dtype]
        offsets[name] = [cursor, cursor + size]
        cursor += size
    body: dict[str, Any] = {}
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3))
    if metadata is not None:
        body["__metadata__"] = metadata
    for name in names:
        body[name] = {"dtype": specs[name][0], "shape": specs[name][1], "data_offsets": offsets[name]}
    text = json.dumps(body).encode() + b" " * draw(st.integers(0, 7))
    return with_prefix(text) + bytes(i % 251 for i in range(cursor))


def mutate(data: st.DataObject, blob: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "prefix", "json", "append", "splice",  # mostly invalid
                                      "same-size dtype", "reshape", "swap offsets", "reformat"]))  # often valid
    event(f"mutation: {kind}")
    if kind == "flip":
        out = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4))):
            position = data.draw(st.integers(0, len(out) - 1))
            out[position] ^= data.draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return blob[: data.draw(st.integers(0, len(blob) - 1))]
    if kind == "append":
        return blob + data.draw(st.binary(min_size=1, max_size=16))
    if kind == "prefix":
        length = data.draw(st.integers(0, 2**64 - 1) | st.integers(0, len(blob) + 16))
        return struct.pack("<Q", length) + blob[8:]
    (length,) = struct.unpack("<Q", blob[:8])
    body = json.loads(blob[8 : 8 + length])
    if not isinstance(body, dict):  # an earlier mutation left no JSON object to edit
        return blob
    rest = blob[8 + length :]
    if kind == "splice":  # the header gains or loses bytes while its length prefix stays
        text = json.dumps(body).encode()
        cut = data.draw(st.integers(0, len(text)))
        text = text[:cut] + data.draw(st.binary(max_size=6)) + text[cut + data.draw(st.integers(0, 3)) :]
        return struct.pack("<Q", length) + text + rest
    tensors = sorted(k for k, v in body.items() if k != "__metadata__" and isinstance(v, dict))
    if kind == "reformat":  # same JSON, different whitespace and key order, length prefix updated
        text = json.dumps(body, indent=data.draw(st.integers(0, 3)), sort_keys=data.draw(st.booleans())).encode()
        return with_prefix(text) + rest
    if kind in ("same-size dtype", "reshape", "swap offsets") and tensors:
        target = body[data.draw(st.sampled_from(tensors))]
        if kind == "same-size dtype" and isinstance(target.get("dtype"), str) and target["dtype"] in ITEMSIZE:
            size = ITEMSIZE[target["dtype"]]
            target["dtype"] = data.draw(st.sampled_from(sorted(d for d, n in ITEMSIZE.items() if n == size)))
        elif kind == "reshape" and isinstance(target.get("shape"), list):
            target["shape"] = data.draw(st.permutations(target["shape"]).map(list) | st.lists(st.integers(0, 3),
                                                                                             max_size=3))
        elif kind == "swap offsets":
            other = body[data.draw(st.sampled_from(tensors))]
            target["data_offsets"], other["data_offsets"] = other.get("data_offsets"), target.get("data_offsets")
        return with_prefix(json.dumps(body).encode()) + rest
    key = data.draw(st.sampled_from(sorted(body) + ["__metadata__", "new"]))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None, "delete"]))
    if field is None or not isinstance(body.get(key), dict) or key == "__metadata__":
        body[key] = data.draw(json_values)
    elif field == "delete":
        body[key].pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    else:
        body[key][field] = data.draw(json_values)
    return with_prefix(json.dumps(body).encode()) + rest


def check_outcome(path: Path, blob: bytes) -> SafetensorsHeader | None:
    """read_header either raises HeaderError naming the file, or returns ranges that tile the data buffer."""
    path.write_bytes(blob)
    try:
        header = read_header(path)
    except HeaderError as exc:
        event("rejected")
        assert "\n" not in str(exc)
        assert str(exc).startswith(f"{path}: ")
        return None
    event("accepted")
    size = len(blob)
    (length,) = struct.unpack("<Q", blob[:8])
    assert (header.header_len, header.data_start, header.file_size) == (length, 8 + length, size)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())
    cursor = 0
    for info in sorted(header.tensors.values(), key=lambda t: (t.begin, t.end)):
        start, end = header.absolute_range(info)
        assert 0 <= start <= end <= size
        assert info.begin == cursor  # no gap, no overlap
        cursor = info.end
        assert info.dtype in ITEMSIZE
        assert all(type(d) is int and d >= 0 for d in info.shape)
        assert info.end - info.begin == math.prod(info.shape) * ITEMSIZE[info.dtype]
        tensor = read_tensor(header, info.name)
        assert tuple(tensor.shape) == info.shape
        assert tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == blob[start:end]
        if info.shape and info.shape[0]:
            assert read_tensor(header, info.name, rows=(0, 1)).shape[0] == 1
    assert header.data_start + cursor == size  # nothing after the last tensor
    return header


def official_view(path: Path) -> dict[str, tuple[str, list[int]]] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: (handle.get_slice(k).get_dtype(), list(handle.get_slice(k).get_shape())) for k in handle.keys()}
    except Exception:
        return None


@FUZZ
@given(blob=valid_files())
def test_valid_files_are_accepted_like_the_official_library(fuzz_dir: Path, blob: bytes) -> None:
    path = fuzz_dir / "valid.safetensors"
    header = check_outcome(path, blob)
    assert header is not None
    official = official_view(path)
    assert official == {n: (i.dtype, list(i.shape)) for n, i in header.tensors.items()}


@FUZZ
@given(blob=st.binary(max_size=96) | st.binary(max_size=64).map(with_prefix)
       | st.tuples(st.integers(0, 80), st.binary(max_size=80)).map(lambda t: struct.pack("<Q", t[0]) + t[1]))
def test_random_bytes_raise_only_header_error(fuzz_dir: Path, blob: bytes) -> None:
    check_outcome(fuzz_dir / "random.safetensors", blob)


@FUZZ
@given(blob=valid_files(), data=st.data())
def test_mutated_headers_raise_only_header_error(fuzz_dir: Path, blob: bytes, data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(1, 3))):
        if len(blob) < 9:
            break
        try:
            blob = mutate(data, blob)
        except (ValueError, UnicodeDecodeError):  # an earlier mutation broke the JSON the next one edits
            break
    path = fuzz_dir / "mutated.safetensors"
    header = check_outcome(path, blob)
    if header is not None:
        # whatever we accept, the reference implementation reads the same way (when it accepts it too)
        official = official_view(path)
        event("official library accepts too" if official is not None else "official library refuses")
        if official is not None:
            assert official == {n: (i.dtype, list(i.shape)) for n, i in header.tensors.items()}


class CountingFile:
    """Wraps a binary file and records the size of every read request."""

    def __init__(self, handle: Any, requests: list[int]) -> None:
        self._handle, self._requests = handle, requests

    def read(self, size: int = -1) -> bytes:
        self._requests.append(size)
        return self._handle.read(size)

    def fileno(self) -> int:
        return self._handle.fileno()

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def counting_open(requests: list[int]) -> Any:
    return lambda path, mode="r", *args, **kwargs: CountingFile(open(path, mode, *args, **kwargs), requests)


def test_huge_header_length_is_rejected_before_reading(fuzz_dir: Path) -> None:
    path = fuzz_dir / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    requests: list[int] = []
    with mock.patch.object(header_module, "open", counting_open(requests), create=True):
        with pytest.raises(HeaderError, match="exceeds"):
            read_header(path)
    assert requests and all(0 <= n <= 8 for n in requests)  # never asks for the claimed 2**60 bytes


@FUZZ
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=32))
def test_header_length_is_checked_before_reading(fuzz_dir: Path, length: int, body: bytes) -> None:
    assume(length > len(body))
    path = fuzz_dir / "length.safetensors"
    path.write_bytes(struct.pack("<Q", length) + body)
    requests: list[int] = []
    with mock.patch.object(header_module, "open", counting_open(requests), create=True):
        with pytest.raises(HeaderError, match="exceeds" if length > MAX_HEADER_BYTES else "runs past the end"):
            read_header(path)
    assert all(0 <= n <= 8 for n in requests)


shard_names = (st.text(alphabet="./\\ax:", max_size=6)
               | st.sampled_from(["", ".", "..", "../x", "/x", "x/", "./x", "a/./b", "x.safetensors", "\\x", "x/.."])
               | st.text(max_size=8))
index_documents = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"weight_map": st.dictionaries(st.text(max_size=4), shard_names | json_values, max_size=4)},
        optional={"metadata": json_values | st.fixed_dictionaries({"total_size": json_values})},
    ),
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=4), shard_names, max_size=4)}),
)


def check_index(path: Path) -> None:
    try:
        index = read_index(path)
    except LongcatError as exc:
        assert "\n" not in str(exc)
        assert str(path) in str(exc)
        return
    for file in index.weight_map.values():
        assert isinstance(file, str)
        assert file not in ("", ".", "..")
        assert "/" not in file and "\\" not in file
        assert (path.parent / file).parent == path.parent
    assert index.total_size is None or (type(index.total_size) is int and index.total_size >= 0)
    assert isinstance(index.metadata, dict)


@FUZZ
@given(document=index_documents)
def test_read_index_on_random_documents(fuzz_dir: Path, document: Any) -> None:
    path = fuzz_dir / "model.safetensors.index.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    check_index(path)


@FUZZ
@given(blob=st.binary(max_size=64) | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_read_index_on_random_bytes(fuzz_dir: Path, blob: bytes) -> None:
    path = fuzz_dir / "bytes.safetensors.index.json"
    path.write_bytes(blob)
    check_index(path)
