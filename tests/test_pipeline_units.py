"""Pieces of the task pipeline that need no checkpoint: buckets, refinement padding, prompts, RNG, pixels."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from longcat_reference.pipeline import Padding, RandomStreams, bucket_size, clean_prompt
from longcat_reference.pipeline.buckets import check_size, target_size
from longcat_reference.pipeline.latents import (
    denormalize,
    latent_frames,
    normalize,
    preprocess,
    round_frames,
    to_uint8,
)
from longcat_reference.pipeline.text import single_prompt
from PIL import Image

from longcat_convert.core.errors import LongcatError
from longcat_convert.tiny_components import WAN_LATENTS_MEAN, WAN_LATENTS_STD


def test_buckets_match_the_spec_examples():
    """The examples in reference/pipeline/README.md, "Resolution buckets and frame counts"."""
    assert bucket_size(480, 832, "480p", 16) == (480, 832)
    assert bucket_size(480, 832, "720p", 64) == (704, 1280)
    assert bucket_size(1024, 1024, "480p", 16) == (608, 640)  # tie: first key in table order
    assert bucket_size(1024, 1024, "720p", 64) == (960, 960)
    assert bucket_size(832, 480, "480p", 16) == (832, 480)
    assert bucket_size(832, 480, "720p", 64) == (1280, 704)
    assert bucket_size(480, 832, "720p", 128) == (768, 1280)  # two GPUs in refinement


def test_explicit_sizes_must_divide_by_the_scale():
    assert target_size((10, 10), (32, 48), "480p", 16) == (32, 48)
    with pytest.raises(LongcatError, match="multiples of 64"):
        target_size((10, 10), (32, 48), "720p", 64)
    with pytest.raises(LongcatError, match="no bucket table"):
        bucket_size(480, 832, "1080p", 16)
    with pytest.raises(LongcatError):
        check_size(0, 16, 16)


@pytest.mark.parametrize(("frames", "cond", "cond_latents", "front", "back", "latents"), [
    (186, 0, 0, 0, 6, 48),  # t2v refine of 93 frames: 192 frames, 189 encoded
    (186, 1, 4, 12, 7, 52),  # i2v
    (186, 26, 8, 3, 0, 48),  # vc / long
    (93, 0, 0, 0, 3, 24),  # spatial_refine_only t2v
    (93, 13, 4, 0, 0, 24),  # spatial_refine_only vc
])
def test_refinement_padding_worked_cases(frames, cond, cond_latents, front, back, latents):
    """The worked cases in reference/pipeline/README.md, "Refinement (480p to 720p)"."""
    padding = Padding.compute(frames, cond)
    assert (padding.num_cond_latents, padding.front, padding.back) == (cond_latents, front, back)
    assert latent_frames(front + frames + back) == latents


def test_frame_rounding_goes_down():
    # 4·⌊n/4⌋ + 1 unless n is already 4k+1: 94 and 95 go down to 93, 96 goes to 97
    assert [round_frames(n) for n in (93, 94, 95, 96, 97, 1, 0, 3)] == [93, 93, 93, 97, 97, 1, 1, 1]
    assert latent_frames(93) == 24 and latent_frames(13) == 4


def test_prompt_cleaning():
    assert clean_prompt("  a   cat\n\tsits  on a\r\ntable ") == "a cat sits on a table"
    assert single_prompt(["one"]) == "one"
    with pytest.raises(LongcatError, match="batch size 2"):
        single_prompt(["a", "b"])


def test_prompt_cleaning_takes_upstreams_own_prompts():
    # upstream's prompt_clean: ftfy.fix_text, html.unescape twice, strip, collapse whitespace
    assert clean_prompt("sits &amp;amp; waits") == "sits & waits"
    assert clean_prompt("a café terrace") == "a café terrace"  # upstream's i2v demo prompt
    assert clean_prompt("the rider’s  horse") == "the rider's horse"  # ftfy straightens curly quotes
    assert clean_prompt("a cafÃ©") == "a café"  # and repairs mojibake


def test_default_stream_equals_the_seeded_global_rng():
    streams = RandomStreams.from_seed(7)
    ours = torch.randn(2, 16, 3, 4, 4, generator=streams.default, dtype=torch.bfloat16)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(7)
        upstream = torch.randn(2, 16, 3, 4, 4, dtype=torch.bfloat16)
    finally:
        torch.random.set_rng_state(state)
    assert torch.equal(ours, upstream)
    assert torch.equal(torch.randn(5, generator=RandomStreams.from_seed(7).user), torch.randn(
        5, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(LongcatError):
        RandomStreams.from_seed(-1)


def test_normalization_takes_the_reciprocal_in_the_latent_dtype():
    vae = SimpleNamespace(config=SimpleNamespace(z_dim=16, latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD))
    pipe = SimpleNamespace(vae=vae)
    z = torch.randn(1, 16, 2, 3, 3)
    expected = (z - torch.tensor(WAN_LATENTS_MEAN).view(1, 16, 1, 1, 1)) * (
        1.0 / torch.tensor(WAN_LATENTS_STD).view(1, 16, 1, 1, 1))
    assert torch.equal(normalize(pipe, z), expected)
    assert torch.allclose(denormalize(pipe, normalize(pipe, z)), z, atol=1e-5)
    zb = z.bfloat16()
    inverse = 1.0 / torch.tensor(WAN_LATENTS_STD).view(1, 16, 1, 1, 1).bfloat16()
    mean = torch.tensor(WAN_LATENTS_MEAN).view(1, 16, 1, 1, 1).bfloat16()
    assert torch.equal(normalize(pipe, zb), (zb - mean) * inverse)


def test_preprocess_stretches_with_lanczos_to_minus_one_one():
    frame = Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    pixels = preprocess([frame, frame], 16, 32, torch.float32, torch.device("cpu"))
    assert pixels.shape == (1, 3, 2, 16, 32)
    expected = np.asarray(frame.resize((32, 16), resample=Image.LANCZOS), dtype=np.float32) / 255.0 * 2 - 1
    assert np.allclose(pixels[0, :, 0].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    with pytest.raises(LongcatError, match="RGB"):
        preprocess([frame.convert("L")], 16, 16, torch.float32, torch.device("cpu"))


def test_uint8_conversion_truncates_like_the_demos():
    assert to_uint8(np.array([0.0, 0.999, 1.0, 0.5])).tolist() == [0, 254, 255, 127]
