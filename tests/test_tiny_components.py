"""The tiny tokenizer, text encoder, VAE and scheduler load with the classes the upstream demo uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from longcat_convert.core.errors import LongcatError
from longcat_convert.core.jsonschemas import schema_errors
from longcat_convert.tiny_components import (
    tokenizer_vocab_size,
    write_components,
    write_scheduler,
    write_text_encoder,
    write_tokenizer,
    write_vae,
)

CAPTION_CHANNELS = 32
SHIFT = 12.0
# Wan 2.1 VAE statistics, copied from its published vae/config.json (not from the module under test)
WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip
LONG_PROMPT = (
    "A young woman in a red coat walks through a snowy forest while soft snow keeps falling "
    "from a grey sky and the camera slowly follows her"
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_components(root, CAPTION_CHANNELS, seed=0, dtype=torch.float32)
    return root


@pytest.fixture(scope="module")
def tokenizer(tree: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tree, subfolder="tokenizer")


@pytest.fixture(scope="module")
def encoder(tree: Path):
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel.from_pretrained(tree, subfolder="text_encoder").eval()


@pytest.fixture(scope="module")
def vae(tree: Path):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(tree, subfolder="vae").eval()


def _batch(tokenizer, texts: list[str], max_length: int = 16):
    return tokenizer(
        texts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )


# ---------------------------------------------------------------- layout


def test_tree_has_the_published_files(tree: Path) -> None:
    expected = {
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    }
    written = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    assert written == expected
    assert sum(p.stat().st_size for p in tree.rglob("*") if p.is_file()) < 8_000_000


@pytest.mark.parametrize(
    ("schema", "relative"),
    [
        ("text-encoder-config", "text_encoder/config.json"),
        ("vae-config", "vae/config.json"),
        ("scheduler-config", "scheduler/scheduler_config.json"),
    ],
)
def test_configs_match_the_project_schemas(tree: Path, schema: str, relative: str) -> None:
    document = json.loads((tree / relative).read_text())
    assert schema_errors(schema, document) == []


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_a_fast_t5_tokenizer(tokenizer, tree: Path) -> None:
    assert tokenizer.is_fast
    assert type(tokenizer).__name__ == "T5Tokenizer"
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 2)
    assert tokenizer.bos_token is None
    assert 300 <= len(tokenizer) <= 1100
    assert len(tokenizer) == tokenizer_vocab_size(tree / "tokenizer")
    config = json.loads((tree / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "T5Tokenizer"


def test_extra_ids_are_special_and_count_down_from_the_end(tokenizer) -> None:
    extra = [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(8)]
    assert extra == list(range(len(tokenizer) - 1, len(tokenizer) - 9, -1))
    assert tokenizer("x <extra_id_0>", add_special_tokens=False).input_ids[-1] == extra[0]
    assert tokenizer.decode(extra, skip_special_tokens=True) == ""


def test_batch_pads_right_and_appends_eos(tokenizer) -> None:
    batch = _batch(tokenizer, ["a cat", ""])
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.shape == mask.shape == (2, 16)
    assert tokenizer.convert_ids_to_tokens(ids[0][:3].tolist()) == ["\u2581a", "\u2581cat", "</s>"]
    assert ids[0].tolist() == ids[0][:3].tolist() + [0] * 13
    assert mask[0].tolist() == [1] * 3 + [0] * 13
    assert ids[1].tolist() == [1] + [0] * 15  # the empty prompt is just </s>
    assert mask[1].tolist() == [1] + [0] * 15
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == "a cat"


def test_truncation_keeps_eos_last(tokenizer) -> None:
    full = tokenizer(LONG_PROMPT).input_ids
    assert len(full) > 16 and full[-1] == 1 and 1 not in full[:-1]
    batch = _batch(tokenizer, [LONG_PROMPT])
    assert batch.input_ids[0].tolist() == full[:15] + [1]
    assert batch.attention_mask[0].tolist() == [1] * 16


def test_text_round_trips_and_unknown_characters_map_to_unk(tokenizer) -> None:
    ids = tokenizer(LONG_PROMPT).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == LONG_PROMPT
    assert 2 not in ids
    assert 2 in tokenizer("caf\u00e9 \u00fcber").input_ids


def test_tokenizers_library_reads_the_same_ids(tokenizer, tree: Path) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tree / "tokenizer" / "tokenizer.json"))
    for text in ["a cat", "", LONG_PROMPT, "Zebras  eat\tgrass, 42 times!"]:
        assert raw.encode(text).ids == tokenizer(text).input_ids


def test_tokenizer_vocab_size_needs_a_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(LongcatError, match="tokenizer.json"):
        tokenizer_vocab_size(tmp_path)


# ---------------------------------------------------------------- text encoder


def test_encoder_config(encoder, tokenizer) -> None:
    config = encoder.config
    assert config.architectures == ["UMT5EncoderModel"]
    assert config.model_type == "umt5"
    assert config.d_model == CAPTION_CHANNELS
    assert config.num_layers == 2
    assert config.feed_forward_proj == "gated-gelu"
    assert config.relative_attention_num_buckets == 32
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (0, 1, 0)
    assert config.vocab_size >= len(tokenizer)
    assert config.vocab_size % 128 == 0


def test_encoder_output_shape_and_mask(encoder, tokenizer) -> None:
    batch = _batch(tokenizer, ["a cat", LONG_PROMPT])
    with torch.no_grad():
        out = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    assert out.shape == (2, 16, CAPTION_CHANNELS)
    assert torch.isfinite(out).all()
    assert out.std() > 0.01

    real = int(batch.attention_mask[0].sum())
    changed = batch.input_ids.clone()
    changed[0, real:] = 7  # any non-pad id in the padded positions
    with torch.no_grad():
        masked = encoder(input_ids=changed, attention_mask=batch.attention_mask).last_hidden_state
        unmasked = encoder(input_ids=changed, attention_mask=torch.ones_like(changed)).last_hidden_state
    torch.testing.assert_close(masked[0, :real], out[0, :real], rtol=0, atol=1e-6)
    torch.testing.assert_close(masked[1], out[1], rtol=0, atol=0)
    # the check above can fail: with the mask ignored, the padded ids do reach the real tokens
    assert not torch.allclose(unmasked[0, :real], out[0, :real], atol=1e-4)


def test_bfloat16_encoder_is_stored_and_loaded_as_bfloat16(tmp_path: Path) -> None:
    from transformers import UMT5EncoderModel

    write_text_encoder(tmp_path, d_model=16, vocab_size=256, seed=3, dtype=torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert f.get_slice("shared.weight").get_shape() == [256, 16]
    model = UMT5EncoderModel.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 1, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    assert out.shape == (1, 4, 16) and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------- VAE


def test_vae_config(vae) -> None:
    config = vae.config
    assert config.z_dim == 16
    assert list(config.dim_mult) == [1, 2, 4, 4]
    assert config.num_res_blocks == 1
    assert list(config.attn_scales) == []
    assert list(config.temperal_downsample) == [False, True, True]
    assert list(config.latents_mean) == WAN_MEAN
    assert list(config.latents_std) == WAN_STD


def test_vae_round_trips_shapes(vae) -> None:
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(video).latent_dist
        assert posterior.mean.shape == (1, 16, 2, 4, 4)
        assert posterior.logvar.shape == (1, 16, 2, 4, 4)
        decoded = vae.decode(posterior.mean).sample
    assert decoded.shape == (1, 3, 5, 32, 32)
    assert torch.isfinite(decoded).all()
    assert posterior.mean.std() > 0  # seeded weights, not zeros


def test_bfloat16_vae_is_stored_as_bfloat16(tmp_path: Path) -> None:
    write_vae(tmp_path, seed=0, dtype=torch.bfloat16)
    with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


# ---------------------------------------------------------------- scheduler


def _shifted(sigmas: np.ndarray) -> np.ndarray:
    return SHIFT * sigmas / (1 + (SHIFT - 1) * sigmas)


def test_scheduler_config(tree: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tree, subfolder="scheduler")
    assert scheduler.config.shift == SHIFT
    raw = json.loads((tree / "scheduler" / "scheduler_config.json").read_text())
    assert raw["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert "_diffusers_version" in raw
    expected = {
        "num_train_timesteps": 1000, "shift": 12.0, "use_dynamic_shifting": False, "invert_sigmas": False,
        "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
        "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "time_shift_type": "linear", "stochastic_sampling": False,
    }  # fmt: skip
    assert {k: raw.get(k, "missing") for k in expected} == expected


def test_scheduler_shifts_explicit_sigmas_by_12(tree: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tree, subfolder="scheduler")
    sigmas = np.linspace(1.0, 0.001, 50)
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    expected = _shifted(sigmas)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-5)
    assert scheduler.sigmas[-1] == 0
    np.testing.assert_allclose(scheduler.timesteps.numpy(), expected * 1000, rtol=1e-5)
    # shift 12 pushes the schedule towards noise: the midpoint sigma 0.5 becomes 12/13
    assert abs(float(_shifted(np.array(0.5))) - 12 / 13) < 1e-12


def test_scheduler_default_steps_use_shift_12(tree: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tree, subfolder="scheduler")
    scheduler.set_timesteps(50)
    assert len(scheduler.timesteps) == 50
    assert scheduler.timesteps[0] == pytest.approx(1000.0)
    assert scheduler.sigmas[0] == pytest.approx(1.0)
    # diffusers spaces the defaults between sigma_max and the (already shifted) training sigma_min,
    # then shifts them again
    expected = _shifted(np.linspace(1.0, float(_shifted(np.array(1 / 1000))), 50))
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-5)
    unshifted_second = np.linspace(1.0, 1 / 1000, 50)[1]
    assert scheduler.sigmas[1] > unshifted_second + 0.01


# ---------------------------------------------------------------- determinism and bad input


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    def write(name: str, seed: int, global_seed: int) -> tuple[bytes, bytes]:
        torch.manual_seed(global_seed)  # must not matter
        write_text_encoder(tmp_path / name / "te", CAPTION_CHANNELS, 256, seed, torch.bfloat16)
        write_vae(tmp_path / name / "vae", seed, torch.bfloat16)
        return (
            (tmp_path / name / "te" / "model.safetensors").read_bytes(),
            (tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors").read_bytes(),
        )

    first, again, other = write("a", 5, 0), write("b", 5, 1234), write("c", 6, 0)
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]


def test_writers_leave_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(99)
    expected = torch.rand(4)
    torch.manual_seed(99)
    write_text_encoder(tmp_path / "te", 16, 128, 0, torch.float32)
    write_vae(tmp_path / "vae", 0, torch.float32)
    assert torch.equal(torch.rand(4), expected)


def test_tokenizer_and_scheduler_files_are_reproducible(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_tokenizer(tmp_path / name / "tokenizer")
        write_scheduler(tmp_path / name / "scheduler")
    for sub in ("tokenizer", "scheduler"):
        for path in (tmp_path / "a" / sub).iterdir():
            assert path.read_bytes() == (tmp_path / "b" / sub / path.name).read_bytes(), path.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": torch.int8}, "unsupported dtype"),
        ({"d_model": 0}, "d_model"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_text_encoder_input(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"d_model": 16, "vocab_size": 128, "seed": 0, "dtype": torch.float32} | kwargs
    with pytest.raises(LongcatError, match=message):
        write_text_encoder(tmp_path / "te", **args)
    assert not (tmp_path / "te").exists()


def test_destination_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "vae"
    target.write_text("not a folder")
    with pytest.raises(LongcatError, match="not a folder"):
        write_vae(target, 0, torch.float32)
