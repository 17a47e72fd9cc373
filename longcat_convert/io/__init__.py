"""The I/O layer: safetensors headers, positioned reads, held source files, streaming writes, shard indexes."""

from .header import SafetensorsHeader, TensorInfo, read_header
from .index import ShardIndex, index_name, read_index, shard_name, write_index
from .reader import ByteRange, decode_tensor, iter_chunks, read_bytes, read_tensor, tensor_range
from .source import FileIdentity, SourceFiles
from .writer import ShardWriter, TensorEntry, encode_header

__all__ = [
    "ByteRange", "FileIdentity", "SafetensorsHeader", "ShardIndex", "ShardWriter", "SourceFiles", "TensorEntry",
    "TensorInfo", "decode_tensor", "encode_header", "index_name", "iter_chunks", "read_bytes", "read_header",
    "read_index", "read_tensor", "shard_name", "tensor_range", "write_index",
]
