"""Unit tests of the reference runner's pieces that need no checkpoint tree: RoPE, BSA, embeddings, LoRA files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from longcat_reference.bsa import BsaParams, block_sparse_attention, chunk_index
from longcat_reference.embeddings import timestep_frequencies
from longcat_reference.lora_layers import FastvideoLoraTarget, read_fastvideo_lora, read_upstream_lora
from longcat_reference.metrics import compare_outputs
from longcat_reference.rope import apply_rope, grid_angles, rope_split
from safetensors.torch import save_file

from longcat_convert.core.errors import LongcatError
from longcat_convert.core.lora_delta import Term, relative_delta_error
from longcat_convert.core.lora_format import decode_module as decode_module_name
from longcat_convert.core.lora_format import encode_module as encode_module_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- RoPE ---------------------------------------------------------------------------------------


def test_rope_split_matches_published_head_dim():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(32) == (12, 10, 10)
    with pytest.raises(LongcatError):
        rope_split(36)


def test_rope_layout_t_then_h_then_w_with_adjacent_pairs():
    head_dim = 32
    t_width, h_width, _ = rope_split(head_dim)
    angles = grid_angles((3, 2, 2), head_dim)
    token = (1 * 2 + 1) * 2 + 0  # t=1, h=1, w=0 in t-major order
    x = torch.zeros(1, 1, 12, head_dim)
    x[0, 0, token, 0] = 1.0  # first channel of the t part
    x[0, 0, token, t_width] = 1.0  # first channel of the h part
    x[0, 0, token, t_width + h_width] = 1.0  # first channel of the w part (w = 0: no rotation)
    out = apply_rope(x, angles)[0, 0, token]
    # the first frequency of every part is base^0 = 1, so position 1 rotates its pair by exactly 1 radian
    assert out[0] == pytest.approx(math.cos(1.0)) and out[1] == pytest.approx(math.sin(1.0))
    assert out[t_width] == pytest.approx(math.cos(1.0)) and out[t_width + 1] == pytest.approx(math.sin(1.0))
    assert out[t_width + h_width] == 1.0 and out[t_width + h_width + 1] == 0.0


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 32
    gen = torch.Generator().manual_seed(0)
    angles = grid_angles((6, 4, 5), head_dim)
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)

    def score(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
        ia, ib = (a[0] * 4 + a[1]) * 5 + a[2], (b[0] * 4 + b[1]) * 5 + b[2]
        return float(apply_rope(q, angles[ia]) @ apply_rope(k, angles[ib]))

    assert score((1, 2, 0), (3, 0, 4)) == pytest.approx(score((2, 3, 0), (4, 1, 4)), abs=1e-5)
    assert score((1, 2, 0), (3, 0, 4)) != pytest.approx(score((1, 2, 0), (4, 0, 4)), abs=1e-3)
    x = torch.randn(2, 3, 120, head_dim, generator=gen)
    assert torch.allclose(apply_rope(x, angles).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


# ---- block-sparse attention -----------------------------------------------------------------------


def _qkv(sq: int, sk: int, seed: int = 0, d: int = 16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, s, d, generator=gen).to(dtype) for s in (sq, sk, sk))


def test_bsa_keeping_every_block_equals_dense_attention():
    q, k, v = _qkv(4 * 4 * 4, 6 * 4 * 4)
    params = BsaParams(sparsity=0.0, chunk_q=(2, 2, 2), chunk_k=(2, 2, 2))
    out = block_sparse_attention(q, k, v, (4, 4, 4), (6, 4, 4), params)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)


def test_bsa_with_no_block_selected_is_exactly_zero():
    q, k, v = _qkv(64, 64)
    params = BsaParams(sparsity=0.9375, chunk_q=(2, 2, 2), chunk_k=(2, 2, 2))  # 8 key chunks: int(0.5) = 0
    out = block_sparse_attention(q, k, v, (4, 4, 4), (4, 4, 4), params)
    assert torch.equal(out, torch.zeros_like(out))


def _brute_force_bsa(q, k, v, grid_q, grid_k, chunk_q, chunk_k, keep) -> torch.Tensor:
    """Loop-by-loop restatement of reference/README.md, "Block-sparse attention" (top-k or cdf selection),
    for a cross-check."""

    def blocks(grid, chunk):
        n = (grid[1] // chunk[1], grid[2] // chunk[2])
        members: dict[int, list[int]] = {}
        for t in range(grid[0]):
            for y in range(grid[1]):
                for x in range(grid[2]):
                    block = ((t // chunk[0]) * n[0] + y // chunk[1]) * n[1] + x // chunk[2]
                    members.setdefault(block, []).append((t * grid[1] + y) * grid[2] + x)
        return [members[b] for b in sorted(members)]

    q_blocks, k_blocks = blocks(grid_q, chunk_q), blocks(grid_k, chunk_k)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            k_means = torch.stack([k[b, h, idx].mean(0) for idx in k_blocks])
            for idx in q_blocks:
                scores = k_means @ q[b, h, idx].mean(0)
                chosen = keep(scores)
                tokens = [j for c in chosen for j in k_blocks[c]]
                if not tokens:
                    continue
                weights = torch.softmax(q[b, h, idx] @ k[b, h, tokens].T / math.sqrt(q.shape[-1]), dim=-1)
                out[b, h, idx] = weights @ v[b, h, tokens]
    return out


def test_bsa_matches_a_loop_restatement_topk_and_cdf():
    grid_q, grid_k, chunk = (4, 4, 4), (6, 4, 4), (2, 2, 2)
    q, k, v = _qkv(64, 96, seed=3)
    top = BsaParams(sparsity=0.75, chunk_q=chunk, chunk_k=chunk)  # 12 key chunks -> keep 3
    expected = _brute_force_bsa(q, k, v, grid_q, grid_k, chunk, chunk, lambda s: torch.topk(s, 3).indices.tolist())
    assert torch.allclose(block_sparse_attention(q, k, v, grid_q, grid_k, top), expected, atol=1e-5)

    for threshold, sparsity in ((0.3, 0.75), (0.3, 0.9), (0.8, None)):
        floor = int((1 - sparsity) * 12) if sparsity is not None else 0

        def cdf_keep(scores: torch.Tensor, threshold=threshold, floor=floor) -> list[int]:
            weights = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)
            order = torch.argsort(weights, descending=True)
            count = int((torch.cumsum(weights[order], 0) <= threshold).sum())
            return order[:max(count, floor)].tolist()

        params = BsaParams(sparsity=sparsity, cdf_threshold=threshold, chunk_q=chunk, chunk_k=chunk)
        expected = _brute_force_bsa(q, k, v, grid_q, grid_k, chunk, chunk, cdf_keep)
        assert torch.allclose(block_sparse_attention(q, k, v, grid_q, grid_k, params), expected, atol=1e-5)


def test_bsa_refuses_grids_not_divisible_by_the_chunk():
    with pytest.raises(LongcatError, match="not divisible"):
        chunk_index((4, 4, 6), (4, 4, 4))
    with pytest.raises(LongcatError):
        BsaParams(sparsity=None, cdf_threshold=None)


def test_bsa_params_from_config_fill_kernel_defaults():
    params = BsaParams.from_config({"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]})
    assert params == BsaParams(0.9375, None, (4, 4, 4), (4, 4, 4))
    assert BsaParams.from_config({}) == BsaParams(0.875, None, (4, 4, 8), (4, 4, 8))
    with pytest.raises(LongcatError, match="unknown"):
        BsaParams.from_config({"sparsty": 0.5})


# ---- embeddings ---------------------------------------------------------------------------------------


def test_timestep_frequencies_put_cosines_first():
    emb = timestep_frequencies(torch.tensor([0.0, 1.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(freqs), torch.sin(freqs)]))
    assert timestep_frequencies(torch.tensor([3.0]), 7).shape == (1, 7)


# ---- LoRA files -----------------------------------------------------------------------------------------


def test_lora_module_names_round_trip():
    encoded = encode_module_name("blocks.7.attn.qkv")
    assert encoded == "lora___lorahyphen___blocks___lorahyphen___7___lorahyphen___attn___lorahyphen___qkv"
    assert decode_module_name(encoded) == "blocks.7.attn.qkv"


def test_upstream_lora_reader_is_strict(tmp_path):
    name = encode_module_name("blocks.0.attn.qkv")
    good = {f"{name}.lora_down.weight": torch.ones(6, 4), f"{name}.alpha_scale": torch.tensor(0.5),
            **{f"{name}.lora_up.blocks.{j}.weight": torch.ones(4, 2) for j in range(3)}}
    save_file(good, tmp_path / "good.safetensors")
    module = read_upstream_lora(tmp_path / "good.safetensors")["blocks.0.attn.qkv"]
    assert (module.rank, module.out_features, len(module.ups)) == (2, 12, 3)

    cases = {
        "alpha": ({k: v for k, v in good.items() if not k.endswith("alpha_scale")}, "missing alpha_scale"),
        "tail": ({**good, f"{name}.lora_mid.weight": torch.ones(1)}, "unexpected key"),
        "rank": ({**good, f"{name}.lora_down.weight": torch.ones(5, 4)}, "inconsistent shapes"),
        "numbering": ({**{k: v for k, v in good.items() if "blocks.1" not in k},
                       f"{name}.lora_up.blocks.5.weight": torch.ones(4, 2)}, "numbered"),
    }
    for label, (tensors, message) in cases.items():
        path = tmp_path / f"{label}.safetensors"
        save_file(tensors, path)
        with pytest.raises(LongcatError, match=message):
            read_upstream_lora(path)


def test_fastvideo_lora_reader_and_scale(tmp_path):
    tensors = {"blocks.0.ffn.w1.lora_A": torch.ones(4, 8), "blocks.0.ffn.w1.lora_B": torch.ones(16, 4),
               "blocks.0.ffn.w1.lora_alpha": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "a.safetensors")
    assert read_fastvideo_lora(tmp_path / "a.safetensors")["blocks.0.ffn.w1"].scale == 0.5
    save_file({"blocks.0.ffn.w1.lora_A": torch.ones(4, 8)}, tmp_path / "orphan.safetensors")
    with pytest.raises(LongcatError, match="needs lora_A and lora_B"):
        read_fastvideo_lora(tmp_path / "orphan.safetensors")
    # FastVideo truncates alpha with int(): 2.9 acts as 2, and 0.7 -> 0 falls back to scale 1
    a, b = torch.ones(4, 8), torch.ones(16, 4)
    assert FastvideoLoraTarget("m", a, b, torch.tensor(2.9)).scale == 0.5
    assert FastvideoLoraTarget("m", a, b, torch.tensor(0.7)).scale == 1.0
    assert FastvideoLoraTarget("m", a, b, None).scale == 1.0


# ---- low-rank ΔW comparison ---------------------------------------------------------------------------------


def test_relative_delta_error_matches_the_dense_computation():
    gen = torch.Generator().manual_seed(5)
    ups = [torch.randn(6, 2, generator=gen, dtype=torch.float64) for _ in range(3)]
    down = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    blocks = [Term(6 * j, ups[j], down[2 * j:2 * j + 2], 0.5) for j in range(3)]  # 3 row blocks, rank 2 each
    dense = torch.cat([0.5 * ups[j] @ down[2 * j:2 * j + 2] for j in range(3)])
    block_diagonal = [Term(0, torch.block_diag(*ups), down, 0.5)]  # the same ΔW as one target
    assert relative_delta_error(blocks, block_diagonal, 18) < 1e-14

    other = [Term(0, torch.randn(12, 3, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64), 2.0)]
    other_dense = torch.cat([2.0 * other[0].up @ other[0].down, torch.zeros(6, 5, dtype=torch.float64)])
    expected = float((other_dense - dense).norm() / dense.norm())
    assert relative_delta_error(blocks, other, 18) == pytest.approx(expected, rel=1e-10)
    assert relative_delta_error([], [], 18) == 0.0
    assert relative_delta_error([], other, 18) == math.inf


def test_relative_delta_error_of_moved_factors_is_zero_and_any_change_is_measured():
    """Terms equal bit for bit (listed in another order) give exactly 0 without a float64 pass; one changed element,
    a changed scale or a changed dtype each give the dense computation's error."""
    gen = torch.Generator().manual_seed(6)
    terms = [Term(4 * j, torch.randn(4, 3, generator=gen).bfloat16(), torch.randn(3, 7, generator=gen).bfloat16(), 0.25)
             for j in range(3)]

    def dense(ts: list[Term]) -> torch.Tensor:
        return torch.cat([t.scale * t.up.double() @ t.down.double() for t in sorted(ts, key=lambda t: t.row)])

    assert relative_delta_error(terms, [Term(t.row, t.up.clone(), t.down.clone(), t.scale) for t in reversed(terms)], 12) == 0.0
    changed_up = terms[1].up.clone()
    changed_up[2, 1] += 1.0
    variants = [
        [terms[0], Term(4, changed_up, terms[1].down, 0.25), terms[2]],
        [terms[0], Term(4, terms[1].up, terms[1].down, 0.5), terms[2]],
        [terms[0], Term(4, terms[1].up.float(), terms[1].down, 0.25), terms[2]],  # same values: still 0
    ]
    for variant in variants:
        expected = float((dense(variant) - dense(terms)).norm() / dense(terms).norm())
        assert relative_delta_error(terms, variant, 12) == pytest.approx(expected, rel=1e-10, abs=1e-15)
    assert relative_delta_error(terms, variants[0], 12) > 0 and relative_delta_error(terms, variants[1], 12) > 0


# ---- comparing outputs -------------------------------------------------------------------------------


def test_compare_outputs_figures_from_numpy_and_torch_alike():
    found = compare_outputs(np.array([3.0, 5.0], dtype=np.float32), torch.tensor([3.0, 4.0]), peak=4.0)
    assert found == pytest.approx({"max_abs": 1.0, "rel_l2": 0.2, "cosine": 29 / (5 * math.sqrt(34)),
                                   "psnr": 10 * math.log10(32)}, rel=1e-12)
    assert compare_outputs(torch.tensor([3.0, 5.0], dtype=torch.bfloat16), np.array([3.0, 4.0])) == {
        key: found[key] for key in ("max_abs", "rel_l2", "cosine")}


@pytest.mark.parametrize(("output", "reference", "expected"), [
    ([3.0, 4.0], [3.0, 4.0], {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "psnr": None}),  # identical
    ([1.0, 1.0], [0.0, 0.0], {"max_abs": 1.0, "rel_l2": None, "cosine": 0.0, "psnr": 0.0}),  # zero reference
    ([math.nan, 0.0], [1.0, 0.0], {"max_abs": None, "rel_l2": None, "cosine": None, "psnr": None}),
    ([math.inf, 0.0], [1.0, 0.0], {"max_abs": None, "rel_l2": None, "cosine": None, "psnr": None}),
    ([], [], {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 0.0, "psnr": None}),
])
def test_compare_outputs_numbers_are_strict_json(output, reference, expected):
    found = compare_outputs(np.array(output), np.array(reference), peak=1.0)
    assert found == expected
    json.dumps(found, allow_nan=False)


def test_compare_outputs_psnr_against_a_zero_peak_is_null():
    assert compare_outputs(np.array([0.5, 0.0]), np.zeros(2), peak=0.0)["psnr"] is None
