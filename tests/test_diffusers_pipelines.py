"""The diffusers face: every task from the diffusers pipelines equals `run` (run_task) on the same converted
tree with the same seed; loading through diffusers' own machinery, save/reload, LoRAs, callbacks, outputs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from longcat_reference import (
    LongCatVideoImageToVideoPipeline,
    LongCatVideoPipeline,
    LongCatVideoRefinePipeline,
    LongCatVideoTransformer3DModel,
    LongCatVideoVideoContinuationPipeline,
    load_dit,
)
from longcat_reference.metrics import compare_outputs
from longcat_reference.pipeline import RandomStreams, load_pipeline, text_to_video, to_pil
from longcat_reference.pipeline.dispatch import bsa_setting, run_task
from longcat_reference.pipeline.preflight import cond_frames, long_steps, plan_run, refine_steps
from longcat_reference.pipeline.task_parity import TASKS, TaskSizes, synthetic_inputs, task_request
from safetensors.torch import load_file, save_file

from longcat_convert.conversion import ConvertRequest, convert
from longcat_convert.core.errors import LongcatError
from longcat_convert.validation.run import validate_tree
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMIT = 1e-6  # rel L2, fp32
SEED = 3
SIZES = TaskSizes()


@pytest.fixture(scope="module")
def tree(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("diffusers-face") / "dif"
    convert(ConvertRequest(src=tiny_raw, dst=dst, to="diffusers", quiet=True))
    return dst


@pytest.fixture(scope="module")
def pipe(tree: Path) -> LongCatVideoPipeline:
    loaded = LongCatVideoPipeline.from_pretrained(tree, dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def runner(tree: Path):
    return load_pipeline(tree, "float32")


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _close(got, want) -> None:
    assert np.shape(got) == np.shape(want)
    rel = compare_outputs(got, want)["rel_l2"]
    assert rel is not None and rel <= LIMIT, rel


def _pipeline_call(pipe: LongCatVideoPipeline, task: str, request, media, plan):
    """The diffusers call that does what `run` does for this request."""
    common = {"prompt": request.prompt, "generator": _generator(), "max_sequence_length": request.max_sequence_length}
    stage1 = {**common, "negative_prompt": request.negative_prompt, "num_frames": plan.num_frames,
              "num_inference_steps": request.steps, "guidance_scale": request.guidance, "distill": request.distill,
              "height": request.height, "width": request.width}
    if task in ("t2v", "t2v-distill"):
        return pipe(**stage1).frames[0]
    if task == "i2v":
        return LongCatVideoImageToVideoPipeline.from_pipe(pipe)(media.image, **stage1).frames[0]
    if task in ("vc", "vc-nokv"):
        vc = LongCatVideoVideoContinuationPipeline.from_pipe(pipe)
        return vc(media.video, num_cond_frames=request.num_cond_frames, use_kv_cache=not request.no_kv_cache,
                  **stage1).frames[0]
    if task == "refine":
        refiner = LongCatVideoRefinePipeline.from_pipe(pipe)
        return refiner(media.video, cond_video=media.cond_video, num_cond_frames=cond_frames(request, media),
                       height=request.height, width=request.width, num_inference_steps=refine_steps(request),
                       t_thresh=request.t_thresh, spatial_refine_only=request.spatial_refine_only,
                       bsa=bsa_setting(request), **common).frames[0]
    steps, window_steps = long_steps(request)
    result = pipe.long_video(request.prompt, segments=request.segments, height=request.height, width=request.width,
                             num_frames=plan.num_frames, num_cond_frames=request.num_cond_frames,
                             num_inference_steps=steps, guidance_scale=plan.guidance, continuation_size=request.size,
                             refine_size=request.refine_size, refine_steps=window_steps,
                             spatial_refine_only=request.spatial_refine_only, bsa=bsa_setting(request),
                             generator=_generator(), max_sequence_length=request.max_sequence_length)
    return result.frames, result.stage1_frames


@pytest.mark.parametrize("task", TASKS)
def test_every_task_equals_run_on_the_same_tree(task, tree, pipe, runner):
    request, media = task_request(task, SIZES, 2, SEED, "float32", "cpu", synthetic_inputs(SIZES, SEED))
    plan = plan_run(tree, request, media, measure=False)
    want = run_task(runner, plan, media).arrays
    got = _pipeline_call(pipe, task, request, media, plan)
    if task == "long":
        frames, stage1 = got
        assert frames.dtype == np.uint8 and np.array_equal(stage1, want["stage1_frames"])
        assert np.array_equal(frames, want["frames"])
    else:
        _close(got, want["frames"])


def test_the_run_command_and_the_pipelines_agree(tree, pipe, tmp_path):
    """`longcat-convert run --distill` and `run --task refine` (of that output) against the pipelines."""
    common = ("--seed", str(SEED), "--max-sequence-length", "16", "--dtype", "float32", "-q")
    distilled = tmp_path / "distilled.npz"
    done = run_cli("run", tree, "--task", "t2v", "--distill", "--prompt", "a red ball", "--height", "32",
                   "--width", "48", "--num-frames", "9", "--steps", "3", *common, "-o", distilled)
    assert done.exit_code == 0, done.output
    want = np.load(distilled)
    got = _t2v(pipe, width=48, num_frames=9, num_inference_steps=3, distill=True, output_type="pt").frames
    _close(got.permute(0, 1, 3, 4, 2)[0].numpy(), want["frames"])
    refined = tmp_path / "refined.npz"
    done = run_cli("run", tree, "--task", "refine", "--video", distilled, "--height", "64", "--width", "128",
                   "--steps", "2", *common, "-o", refined)
    assert done.exit_code == 0, done.output
    stage1 = to_pil(want["frames"])  # what `run` reads from the .npz: the demos' uint8 conversion
    got = LongCatVideoRefinePipeline.from_pipe(pipe)(stage1, height=64, width=128, num_inference_steps=2,
                                                     generator=_generator(), max_sequence_length=16,
                                                     output_type="latent").frames
    _close(got, np.load(refined)["latents"])


def test_latent_output_is_runs_final_latents(tree, pipe, runner):
    for use_kv_cache in (True, False):
        request, media = task_request("vc" if use_kv_cache else "vc-nokv", SIZES, 2, SEED, "float32", "cpu",
                                      synthetic_inputs(SIZES, SEED))
        want = run_task(runner, plan_run(tree, request, media, measure=False), media).arrays["latents"]
        got = LongCatVideoVideoContinuationPipeline.from_pipe(pipe)(
            media.video, request.prompt, height=request.height, width=request.width, num_frames=SIZES.vc_frames,
            num_cond_frames=request.num_cond_frames, num_inference_steps=2, use_kv_cache=use_kv_cache,
            generator=_generator(), output_type="latent", max_sequence_length=request.max_sequence_length).frames
        assert isinstance(got, torch.Tensor) and tuple(got.shape) == want.shape
        _close(got.float(), want)


def _t2v(pipe, **kwargs):
    call = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2, "max_sequence_length": 16,
            "generator": _generator()}
    return pipe("a red ball", **{**call, **kwargs})


def test_bfloat16_pipeline_equals_a_bfloat16_run(tree):
    """diffusers loads every component in bf16 (transformers would keep umT5's `wo` in fp32 for float16 only);
    the result is what load_pipeline(tree, "bfloat16") computes."""
    half = LongCatVideoPipeline.from_pretrained(tree, dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert {p.dtype for p in half.text_encoder.parameters()} == {torch.bfloat16} == {half.transformer.dtype}
    rng = RandomStreams.from_seed(SEED)
    want = text_to_video(load_pipeline(tree, "bfloat16"), "a red ball", rng, height=32, width=32, num_frames=5,
                         steps=2, max_sequence_length=16)
    got = _t2v(half, output_type="latent").frames
    assert torch.equal(got, want.latents)


def test_output_types_follow_diffusers_conventions(pipe):
    frames = _t2v(pipe).frames
    assert frames.shape == (1, 5, 32, 32, 3) and frames.dtype == np.float32 and 0 <= frames.min() <= frames.max() <= 1
    pt = _t2v(pipe, output_type="pt").frames
    assert tuple(pt.shape) == (1, 5, 3, 32, 32) and torch.equal(pt, torch.from_numpy(frames).permute(0, 1, 4, 2, 3))
    pil = _t2v(pipe, output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 5 and pil[0][0].size == (32, 32)
    assert np.array_equal(np.asarray(pil[0][2]), (frames[0, 2] * 255).astype(np.uint8))  # the demos' truncation
    latents = _t2v(pipe, output_type="latent").frames
    assert tuple(latents.shape) == (1, 16, 2, 4, 4)
    (tupled,) = _t2v(pipe, return_dict=False)
    assert np.array_equal(tupled, frames)
    with pytest.raises(LongcatError, match="output_type"):
        _t2v(pipe, output_type="mp4")


def test_callback_on_step_end_sees_every_step_and_can_replace_the_latents(pipe):
    seen = []

    def record(p, index, t, kwargs):
        seen.append((index, float(t), tuple(kwargs["latents"].shape)))
        return {"latents": kwargs["latents"]}

    plain = _t2v(pipe, output_type="latent").frames
    recorded = _t2v(pipe, output_type="latent", callback_on_step_end=record).frames
    assert torch.equal(plain, recorded)
    assert [index for index, _, _ in seen] == [0, 1] and seen[0][1] == 1000.0 and seen[0][2] == (1, 16, 2, 4, 4)

    def zero_at_the_end(p, index, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if index == 1 else {}

    assert not _t2v(pipe, output_type="latent", callback_on_step_end=zero_at_the_end).frames.any()
    with pytest.raises(LongcatError, match="callback_on_step_end_tensor_inputs"):
        _t2v(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_another_scheduler_is_refused_not_ignored(pipe):
    from diffusers import UniPCMultistepScheduler

    other = LongCatVideoPipeline.from_pipe(pipe, scheduler=UniPCMultistepScheduler())
    with pytest.raises(LongcatError, match="not UniPCMultistepScheduler"):
        _t2v(other)
    shifted = LongCatVideoPipeline.from_pipe(pipe, scheduler=FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=True))
    with pytest.raises(LongcatError, match="use_dynamic_shifting"):
        _t2v(shifted)


def test_progress_bar_config_and_device_move(pipe, capsys):
    pipe.set_progress_bar_config(desc="denoise-bar")
    try:
        assert pipe.to("cpu") is pipe
        _t2v(pipe)
    finally:
        pipe.set_progress_bar_config(disable=True)
    err = capsys.readouterr().err
    assert "denoise-bar" in err and "2/2" in err
    _t2v(pipe)
    assert "denoise-bar" not in capsys.readouterr().err


def test_diffusers_loaders_alone_give_the_runners_weights(tree, pipe):
    """DiffusionPipeline's and ModelMixin's own from_pretrained (not our overrides) load every component, the
    model_index entries import with this package (upstream's longcat_video is not installed)."""
    assert importlib.util.find_spec("longcat_video") is None
    index = json.loads((tree / "model_index.json").read_text())
    for name in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer"):
        library, class_name = index[name]
        assert hasattr(importlib.import_module(library), class_name), index[name]
    loaded = DiffusionPipeline.from_pretrained.__func__(LongCatVideoPipeline, tree, dtype=torch.float32)
    model = ModelMixin.from_pretrained.__func__(LongCatVideoTransformer3DModel, tree, subfolder="transformer")
    reference = load_dit(tree).state_dict()
    for dit in (loaded.transformer, model):
        assert isinstance(dit, LongCatVideoTransformer3DModel)
        state = dit.state_dict()
        assert sorted(state) == sorted(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    assert type(loaded.vae).__name__ == "AutoencoderKLWan" and type(loaded.text_encoder).__name__ == "UMT5EncoderModel"
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(_t2v(loaded).frames, _t2v(pipe).frames)


def test_transformer_dtype_and_strict_key_set(tree, tmp_path):
    bf16 = LongCatVideoTransformer3DModel.from_pretrained(tree, subfolder="transformer", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.config["depth"] == bf16.arch.depth
    broken = Path(shutil.copytree(tree / "transformer", tmp_path / "transformer"))
    weights = load_file(broken / "diffusion_pytorch_model.safetensors")
    weights.pop("blocks.1.ffn.w2.weight")
    save_file(weights, broken / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LongcatError, match=r"1 missing keys \(blocks.1.ffn.w2.weight\)"):
        LongCatVideoTransformer3DModel.from_pretrained(broken)


def test_a_sharded_transformer_loads_through_diffusers(tiny_raw, tmp_path):
    sharded = tmp_path / "sharded"
    convert(ConvertRequest(src=tiny_raw, dst=sharded, to="diffusers", quiet=True, max_shard_size="400KB"))
    assert len(list((sharded / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    state = LongCatVideoTransformer3DModel.from_pretrained(sharded, subfolder="transformer").state_dict()
    reference = load_dit(tiny_raw).state_dict()
    assert sorted(state) == sorted(reference) and all(torch.equal(state[k], reference[k]) for k in state)


def test_from_tree_reads_the_raw_and_the_fastvideo_dit(tiny_raw, tmp_path):
    fastvideo = tmp_path / "fv"
    convert(ConvertRequest(src=tiny_raw, dst=fastvideo, to="fastvideo", quiet=True))
    reference = load_dit(tiny_raw).state_dict()
    for root in (tiny_raw, fastvideo):
        model = LongCatVideoTransformer3DModel.from_tree(root, dtype=torch.bfloat16)
        state = model.state_dict()
        assert model.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
        assert sorted(state) == sorted(reference)
        assert all(torch.equal(state[k], reference[k].to(torch.bfloat16)) for k in state), root
    (fastvideo / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(LongcatError):
        LongCatVideoTransformer3DModel.from_tree(fastvideo)


def _findings(tree: Path, index: dict) -> list[tuple[str, str]]:
    (tree / "model_index.json").write_text(json.dumps(index))
    report = validate_tree(tree)
    return [(f["severity"], f["message"]) for f in report["findings"] if f["component"] == "model_index"]


def test_validate_accepts_both_model_index_forms(tree, tmp_path):
    """The entries convert wrote before the pipelines existed stay valid (with a warning saying diffusers cannot
    import them); an entry naming anything else is an error."""
    copy = Path(shutil.copytree(tree, tmp_path / "copy"))
    index = json.loads((tree / "model_index.json").read_text())
    assert _findings(copy, index) == []
    old = {**index, "tokenizer": ["transformers", "AutoTokenizer"],
           "transformer": ["longcat_video", "LongCatVideoTransformer3DModel"]}
    found = _findings(copy, old)
    assert [severity for severity, _ in found] == ["warning", "warning"]
    assert all("older longcat-convert" in message for _, message in found)
    assert _findings(copy, {**index, "_class_name": "LongCatVideoImageToVideoPipeline",
                            "tokenizer": ["transformers", "T5Tokenizer"]}) == []
    wrong = _findings(copy, {**index, "transformer": ["somewhere", "LongCatVideoTransformer3DModel"]})
    assert [severity for severity, _ in wrong] == ["error"]
    assert [severity for severity, _ in _findings(copy, {**index, "_class_name": "WanPipeline"})] == ["error"]


def test_save_pretrained_round_trip_validates_and_reloads_identically(tree, pipe, tmp_path):
    saved = tmp_path / "saved"
    LongCatVideoRefinePipeline.from_pipe(pipe).save_pretrained(saved)
    report = validate_tree(saved)
    assert report["valid"] and report["counts"]["error"] == 0, report["findings"]
    assert report["layout"]["name"] == "diffusers"
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "LongCatVideoRefinePipeline"
    for name in ("cfg_step_lora", "refinement_lora"):
        assert (saved / "lora" / f"{name}.safetensors").read_bytes() == (tree / "lora" / f"{name}.safetensors").read_bytes()
    again = LongCatVideoPipeline.from_pretrained(saved, dtype=torch.float32)
    again.set_progress_bar_config(disable=True)
    for component in ("transformer", "text_encoder", "vae"):
        mine, theirs = getattr(pipe, component).state_dict(), getattr(again, component).state_dict()
        assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), component
    assert dict(again.scheduler.config) == dict(pipe.scheduler.config)
    assert again.lora_names == pipe.lora_names
    again.save_pretrained(saved)  # over the tree it was loaded from: the LoRA files stay as they were
    assert (saved / "lora" / "cfg_step_lora.safetensors").read_bytes() == (tree / "lora" / "cfg_step_lora.safetensors").read_bytes()
    assert np.array_equal(_t2v(again, distill=True).frames, _t2v(pipe, distill=True).frames)


def test_loras_are_registered_from_the_tree_or_loaded_by_path(tree, pipe, tmp_path):
    bare = Path(shutil.copytree(tree, tmp_path / "bare", ignore=shutil.ignore_patterns("lora")))
    plain = LongCatVideoPipeline.from_pretrained(bare, dtype=torch.float32)
    plain.set_progress_bar_config(disable=True)
    assert plain.lora_names == [] and pipe.lora_names == ["cfg_step_lora", "refinement_lora"]
    with pytest.raises(LongcatError, match="no LoRA named 'cfg_step_lora'"):
        _t2v(plain, distill=True)
    plain.load_longcat_lora(tree / "lora" / "cfg_step_lora.safetensors")
    distilled = _t2v(plain, distill=True).frames
    assert np.array_equal(distilled, _t2v(pipe, distill=True).frames)
    assert not np.array_equal(distilled, _t2v(plain).frames)  # the adapter changes the output
    with pytest.raises(LongcatError, match="does not exist"):
        plain.load_longcat_lora(tmp_path / "absent.safetensors")


def test_a_fastvideo_format_lora_is_refused(tiny_raw, tmp_path, pipe):
    fastvideo = tmp_path / "fv"
    convert(ConvertRequest(src=tiny_raw, dst=fastvideo, to="fastvideo", quiet=True))
    with pytest.raises(LongcatError, match="fastvideo-format LoRA"):
        pipe.load_longcat_lora(fastvideo / "lora" / "distilled" / "cfg_step_lora.safetensors", "x")
    assert "x" not in pipe.lora_names


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="enable_model_cpu_offload needs accelerate")
def test_model_cpu_offload_computes_the_same(tree, pipe):
    """Offload hooks on every component (to the CPU itself when there is no accelerator): continuation with the
    KV cache (built outside forward) and the distilled LoRA (enabled before the DiT moves) give the same latents."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    offloaded = LongCatVideoVideoContinuationPipeline.from_pretrained(tree, dtype=torch.float32)
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload(device=device)
    inputs = synthetic_inputs(SIZES, SEED)
    call = {"height": 32, "width": 48, "num_frames": 9, "num_cond_frames": 5, "num_inference_steps": 2,
            "distill": True, "output_type": "latent", "max_sequence_length": 16}
    got = offloaded(inputs.video, "a red ball", generator=torch.Generator(device).manual_seed(SEED), **call).frames
    want = LongCatVideoVideoContinuationPipeline.from_pipe(pipe)(inputs.video, "a red ball",
                                                                 generator=_generator(), **call).frames
    if device == "cpu":
        assert torch.equal(got, want)
    else:
        assert tuple(got.shape) == tuple(want.shape) and torch.isfinite(got).all()


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="these loading options need accelerate")
def test_low_cpu_mem_usage_and_a_device_map_load_the_same_weights(tree):
    reference = load_dit(tree).state_dict()
    for options in ({"low_cpu_mem_usage": True}, {"device_map": "cpu"}):
        state = LongCatVideoTransformer3DModel.from_pretrained(tree, subfolder="transformer", **options).state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference), options


@pytest.mark.skipif(importlib.util.find_spec("imageio") is None and importlib.util.find_spec("cv2") is None,
                    reason="diffusers' export_to_video needs imageio or opencv")
def test_export_to_video_takes_the_output(pipe, tmp_path):
    from diffusers.utils import export_to_video

    path = export_to_video(_t2v(pipe).frames[0], str(tmp_path / "clip.mp4"), fps=15)
    assert Path(path).stat().st_size > 0
