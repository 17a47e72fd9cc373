"""The I/O layer: safetensors headers, positioned reads, held source files, streaming writes, shard indexes,
JSON files."""

from .header import SafetensorsHeader, TensorInfo, read_header
from .index import ShardIndex, index_from_document, index_name, read_index, shard_name, write_index
from .jsonfile import JsonFileError, parse_json, read_json, read_json_object
from .reader import ByteRange, decode_tensor, iter_chunks, read_bytes, read_tensor, tensor_range
from .source import DirectFiles, FileIdentity, FileReader, SourceFiles
from .writer import ShardWriter, TensorEntry, encode_header, tensor_bytes

__all__ = [
    "ByteRange", "DirectFiles", "FileIdentity", "FileReader", "JsonFileError", "SafetensorsHeader",
    "ShardIndex", "ShardWriter", "SourceFiles", "TensorEntry", "TensorInfo", "decode_tensor", "encode_header",
    "index_from_document", "index_name", "iter_chunks", "parse_json", "read_bytes", "read_header",
    "read_index", "read_json", "read_json_object", "read_tensor", "shard_name", "tensor_bytes",
    "tensor_range", "write_index",
]
