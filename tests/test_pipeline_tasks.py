"""Every task end to end on a tiny raw tree: shapes, finiteness, determinism, the documented differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from longcat_reference.bsa import BsaParams
from longcat_reference.metrics import compare_outputs
from longcat_reference.pipeline import (
    Pipeline,
    RandomStreams,
    TaskResult,
    image_to_video,
    load_pipeline,
    long_video,
    refine,
    text_to_video,
    to_pil,
    video_continuation,
)
from PIL import Image

from longcat_convert.core.errors import LongcatError

PROMPT = "a small orange cat jumps from the sofa"
TINY = {"max_sequence_length": 16}
SPARSE = BsaParams(sparsity=0.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_raw: Path) -> Pipeline:
    return load_pipeline(tiny_raw, "float32")


@pytest.fixture(scope="module")
def video() -> list[Image.Image]:
    rs = np.random.RandomState(3)
    return [Image.fromarray(rs.randint(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(7)]


def _check(result: TaskResult, latents: tuple[int, ...], frames: tuple[int, ...], steps: int) -> None:
    assert tuple(result.latents.shape) == latents
    assert result.frames.shape == frames and result.frames.dtype == np.float32
    assert len(result.steps) == steps == len(result.timesteps)
    assert torch.isfinite(result.latents).all() and np.isfinite(result.frames).all()
    assert 0.0 <= result.frames.min() and result.frames.max() <= 1.0
    assert torch.equal(result.steps[-1], result.latents.float())


def test_t2v(pipe):
    result = text_to_video(pipe, PROMPT, RandomStreams.from_seed(0), height=32, width=48, num_frames=10, steps=3,
                           **TINY)
    _check(result, (1, 16, 3, 4, 6), (9, 32, 48, 3), 3)  # 10 frames round down to 9
    again = text_to_video(pipe, PROMPT, RandomStreams.from_seed(0), height=32, width=48, num_frames=9, steps=3, **TINY)
    assert torch.equal(result.latents, again.latents)
    other = text_to_video(pipe, PROMPT, RandomStreams.from_seed(1), height=32, width=48, num_frames=9, steps=3, **TINY)
    assert not torch.equal(result.latents, other.latents)


def test_distilled_t2v_uses_the_lora_and_16_steps(pipe):
    result = text_to_video(pipe, PROMPT, RandomStreams.from_seed(0), height=32, width=48, num_frames=5, distill=True,
                           **TINY)
    _check(result, (1, 16, 2, 4, 6), (5, 32, 48, 3), 16)
    assert result.info["guidance"] == 1.0 and round(result.timesteps[-1], 2) == 510.64
    assert not pipe.dit.runtime_loras  # disabled again afterwards, as the demos do


def test_i2v_keeps_the_image_latent_clean(pipe):
    image = Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8))
    result = image_to_video(pipe, image, PROMPT, RandomStreams.from_seed(0), size=(32, 48), num_frames=9, steps=3,
                            **TINY)
    _check(result, (1, 16, 3, 4, 6), (9, 32, 48, 3), 3)
    first = [state[:, :, 0] for state in result.steps]
    assert all(torch.equal(first[0], other) for other in first)  # frame 0 never stepped
    with pytest.raises(LongcatError, match="multiples of 16"):
        image_to_video(pipe, image, PROMPT, RandomStreams.from_seed(0), size=(30, 48), **TINY)


def test_vc_with_and_without_kv_cache(pipe, video):
    """Same math for the noise tokens: without CFG the two modes agree to rounding (fp32 DiT); with CFG
    the scale is computed over different elements (noise frames vs all frames), so they differ slightly."""
    runs = {}
    for guidance in (1.0, 4.0):
        for kv in (True, False):
            runs[guidance, kv] = video_continuation(pipe, video, PROMPT, RandomStreams.from_seed(0), size=(32, 48),
                                                    num_frames=13, num_cond_frames=5, steps=3, guidance=guidance,
                                                    use_kv_cache=kv, **TINY)
    _check(runs[4.0, True], (1, 16, 4, 4, 6), (13, 32, 48, 3), 12)  # enhance_hf: 2 kept + 10 tail steps
    assert runs[4.0, True].info["num_cond_latents"] == 2
    no_cfg = compare_outputs(runs[1.0, False].latents, runs[1.0, True].latents)
    assert no_cfg["rel_l2"] < 1e-5
    with_cfg = compare_outputs(runs[4.0, False].latents, runs[4.0, True].latents)
    assert 10 * no_cfg["rel_l2"] < with_cfg["rel_l2"] < 0.2
    cond = runs[4.0, True].latents[:, :, :2]
    assert torch.equal(cond, runs[4.0, False].latents[:, :, :2])  # same draws, same cond latents


def test_vc_without_cache_keeps_the_state_in_the_dit_dtype(tiny_raw, video):
    pipe16 = load_pipeline(tiny_raw, "bfloat16")
    common = {"size": (32, 48), "num_frames": 9, "num_cond_frames": 5, "steps": 2, **TINY}
    cached = video_continuation(pipe16, video, PROMPT, RandomStreams.from_seed(0), **common)
    uncached = video_continuation(pipe16, video, PROMPT, RandomStreams.from_seed(0), use_kv_cache=False, **common)
    assert cached.latents.dtype == torch.float32 and uncached.latents.dtype == torch.bfloat16
    assert compare_outputs(uncached.latents.float(), cached.latents)["rel_l2"] < 0.1


def test_vc_argument_checks(pipe, video):
    rng = RandomStreams.from_seed(0)
    with pytest.raises(LongcatError, match="enhance_hf"):
        video_continuation(pipe, video, PROMPT, rng, size=(32, 48), num_frames=13, num_cond_frames=5, distill=True,
                           enhance_hf_schedule=True)
    with pytest.raises(LongcatError, match="7 frames"):
        video_continuation(pipe, video, PROMPT, rng, size=(32, 48), num_cond_frames=13)
    with pytest.raises(LongcatError, match="batch size 2"):
        video_continuation(pipe, video, ["a", "b"], rng, size=(32, 48), num_frames=13, num_cond_frames=5)


def test_refine_geometry_and_bsa(pipe, video):
    stage1 = video[:5]
    result = refine(pipe, stage1, RandomStreams.from_seed(0), size=(64, 128), steps=50, bsa=SPARSE, **TINY)
    _check(result, (1, 16, 4, 8, 16), (10, 64, 128, 3), 5)
    assert [round(t, 2) for t in result.timesteps] == [500.0, 443.02, 343.47, 207.77, 11.87]
    assert (result.info["pad_front"], result.info["pad_back"]) == (0, 6)
    dense = refine(pipe, stage1, RandomStreams.from_seed(0), size=(64, 128), steps=50, bsa=False, **TINY)
    assert compare_outputs(dense.latents, result.latents)["rel_l2"] > 1e-4  # block selection changes the result
    assert not pipe.dit.runtime_loras and pipe.dit.bsa is None


def test_refine_with_video_condition_and_spatial_only(pipe, video):
    cond = [frame.resize((128, 64)) for frame in video[:3]]
    result = refine(pipe, video[:5], RandomStreams.from_seed(0), video=cond, num_cond_frames=2, size=(64, 128),
                    steps=3, spatial_refine_only=True, bsa=SPARSE, **TINY)
    _check(result, (1, 16, 8, 8, 16), (5, 64, 128, 3), 2)
    assert result.info["num_cond_latents"] == 4 and result.info["pad_front"] == 11
    assert all(torch.equal(result.steps[0][:, :, :4], state[:, :, :4]) for state in result.steps)
    with pytest.raises(LongcatError, match="exactly 1 frame"):
        refine(pipe, video[:5], RandomStreams.from_seed(0), image=cond[0], num_cond_frames=2, size=(64, 128))
    with pytest.raises(LongcatError, match="multiples of 64"):
        refine(pipe, video[:5], RandomStreams.from_seed(0), size=(32, 48))


def test_long_video_chains_segments(pipe):
    result = long_video(pipe, PROMPT, RandomStreams.from_seed(0), segments=1, height=32, width=48, num_frames=9,
                        num_cond_frames=5, steps=2, vc_size=(32, 48), refine_size=(64, 64), refine_steps=3,
                        spatial_refine_only=True, bsa=SPARSE, **TINY)
    assert [segment.task for segment in result.segments] == ["t2v", "vc", "refine", "refine"]
    assert result.stage1_frames.shape == (13, 32, 48, 3) and result.stage1_frames.dtype == np.uint8
    assert result.refined_frames.shape == (13, 64, 64, 3)
    # the continuation starts from the first clip's last frames, quantized to uint8 as the demo does
    first = np.stack([np.asarray(frame) for frame in to_pil(result.segments[0].frames)])
    assert np.array_equal(result.stage1_frames[:9], first)
    assert result.segments[3].info["num_cond_latents"] == 4
