"""Pure pieces of planning: key map expansion, shard grouping, sizes, dtype policy, LoRA factor slicing."""

from __future__ import annotations

import pytest
import torch

from longcat_convert.core import keymap
from longcat_convert.core.dtypes import DTYPE_NAMES, FRIENDLY, DtypePolicy, torch_dtype
from longcat_convert.core.errors import LongcatError
from longcat_convert.core.lora_format import decode_module, encode_module, fused_targets
from longcat_convert.sharding import group_into_shards, parse_size

PUBLISHED = dict(hidden_size=4096, depth=48, num_heads=32, caption_channels=4096, adaln_tembed_dim=512,
                 frequency_embedding_size=256, mlp_ratio=4, in_channels=16, out_channels=16, patch_size=[1, 2, 2])


def test_full_size_map_matches_the_published_checkpoint() -> None:
    expanded = keymap.expand(PUBLISHED)
    # reference/README.md, "DiT key sets and sizes": 1022 raw tensors, 1310 FastVideo tensors,
    # 13,581,071,424 parameters
    assert len(expanded.expected_shapes("upstream")) == 1022
    assert len(expanded.expected_shapes("fastvideo")) == 1310
    assert expanded.num_params == 13_581_071_424
    assert expanded.config_symbols["F"] == 11008
    shapes = expanded.expected_shapes("fastvideo")
    assert shapes["blocks.47.self_attn.to_v.weight"] == (4096, 4096)
    assert shapes["final_layer.proj.weight"] == (64, 4096)
    assert expanded.expected_shapes("upstream")["x_embedder.proj.weight"] == (4096, 16, 1, 2, 2)


def test_fastvideo_config_naming_gives_the_same_map() -> None:
    fastvideo = {**{k: v for k, v in PUBLISHED.items() if k != "num_heads"}, "num_attention_heads": 32}
    assert keymap.expand(fastvideo, "fastvideo").expected_shapes("fastvideo") == \
        keymap.expand(PUBLISHED).expected_shapes("fastvideo")


def test_config_conversion_is_reversible_and_refuses_conflicts() -> None:
    converted = keymap.convert_config(PUBLISHED, "upstream", "fastvideo")
    assert converted["num_attention_heads"] == 32 and "num_heads" not in converted
    back = keymap.convert_config(converted, "fastvideo", "upstream")
    assert {k: v for k, v in back.items() if k != "_class_name"} == PUBLISHED
    with pytest.raises(LongcatError, match="disagree"):
        keymap.convert_config({**PUBLISHED, "num_attention_heads": 16}, "upstream", "fastvideo")


@pytest.mark.parametrize("field,value", [("hidden_size", 0), ("depth", "48"), ("num_heads", 33), ("patch_size", [1, 2])])
def test_bad_config_fields_are_named(field: str, value) -> None:
    with pytest.raises(LongcatError, match=field if field != "num_heads" else "divisible"):
        keymap.expand({**PUBLISHED, field: value})


def test_ffn_width_rule() -> None:
    assert keymap.ffn_hidden_size(4096, 4) == 11008
    assert keymap.ffn_hidden_size(128, 4) == 512


def test_shard_grouping_is_greedy_and_keeps_order() -> None:
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)]
    assert group_into_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert group_into_shards(sizes, 100) == [["a", "b", "c", "d", "e"]]


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), (123, 123)])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5 bananas", "", "-1GB", "0"])
def test_parse_size_rejects(text) -> None:
    with pytest.raises(LongcatError):
        parse_size(text)


def test_dtype_policy() -> None:
    policy = DtypePolicy.from_options("bfloat16", ("*adaln*",))
    assert policy.resolve("blocks.0.adaln_linear_1.weight", "F32") == "F32"
    assert policy.resolve("blocks.0.ffn.w1.weight", "F32") == "BF16"
    assert policy.resolve("counter", "I64") == "I64"
    assert DtypePolicy.from_options("keep", ()).resolve("x", "BF16") == "BF16"
    with pytest.raises(LongcatError):
        DtypePolicy.from_options("int8", ())


def test_lora_module_names_round_trip() -> None:
    encoded = encode_module("blocks.7.attn.qkv")
    assert encoded == "lora___lorahyphen___blocks___lorahyphen___7___lorahyphen___attn___lorahyphen___qkv"
    assert decode_module(encoded) == "blocks.7.attn.qkv"
    assert decode_module("blocks.7") is None


def test_factors_one_block_per_target() -> None:
    part = fused_targets(12, 3, 3, 4)[1]
    assert part.down_rows == (4, 8) and part.blocks == (1,) and part.whole_block(0) and part.rank == 4


def test_factors_single_up_shared_by_targets() -> None:
    part = fused_targets(12, 1, 3, 4)[2]
    assert part.down_rows == (0, 4) and part.blocks == (0,) and part.rows == ((8, 12),) and part.rank == 4


def test_factors_many_blocks_one_target_is_block_diagonal() -> None:
    (part,) = fused_targets(12, 6, 1, 4)
    assert part.down_rows == (0, 24) and part.blocks == tuple(range(6)) and part.rank == 24
    assert all(part.whole_block(i) for i in range(6))


def test_factors_blocks_that_straddle_targets() -> None:
    """4 up blocks of 3 rows over 3 targets of 4 rows: each target meets two blocks, partly."""
    parts = fused_targets(12, 4, 3, 2)
    assert [p.blocks for p in parts] == [(0, 1), (1, 2), (2, 3)]
    assert [p.rows for p in parts] == [((0, 3), (0, 1)), ((1, 3), (0, 2)), ((2, 3), (0, 3))]
    assert [p.down_rows for p in parts] == [(0, 4), (2, 6), (4, 8)] and {p.rank for p in parts} == {4}


@pytest.mark.parametrize("n,k", [(1, 3), (3, 3), (6, 3), (6, 1), (2, 1), (4, 3), (5, 3), (1, 2), (2, 2), (3, 2)])
def test_factors_reproduce_the_fused_delta(n: int, k: int) -> None:
    """Assembled from the TargetParts, the k targets' B_t·A_t stacked give blockdiag(U_0..U_{n-1})·D exactly."""
    out, r, width = 60, 2, 5
    generator = torch.Generator().manual_seed(n * 10 + k)
    down = torch.randn(n * r, width, generator=generator, dtype=torch.float64)
    ups = [torch.randn(out // n, r, generator=generator, dtype=torch.float64) for _ in range(n)]
    fused = torch.block_diag(*ups) @ down
    stacked = []
    for part in fused_targets(out, n, k, r):
        b = torch.block_diag(*[ups[j][lo:hi] for j, (lo, hi) in zip(part.blocks, part.rows, strict=True)])
        a = down[part.down_rows[0]:part.down_rows[1]]
        assert b.shape == (out // k, part.rank) and a.shape == (part.rank, width)
        stacked.append(b @ a)
    assert torch.allclose(torch.cat(stacked), fused, rtol=0, atol=1e-12)


def test_user_dtype_names_are_torchs_and_each_user_takes_what_it_supports() -> None:
    assert {name: getattr(torch, name) for name in DTYPE_NAMES} == {
        "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
    assert all(FRIENDLY[safetensors] == name for name, safetensors in DTYPE_NAMES.items())
    assert torch_dtype("bfloat16", ("float32", "bfloat16")) is torch.bfloat16
    assert torch_dtype(torch.float32, ("float32", "bfloat16")) is torch.float32
    for refused in ("float16", torch.float16, "bf16", "keep", None):
        with pytest.raises(LongcatError, match="unsupported dtype .*; choose float32 or bfloat16$"):
            torch_dtype(refused, ("float32", "bfloat16"))
