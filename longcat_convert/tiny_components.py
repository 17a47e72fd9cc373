"""Tiny, seeded stand-ins for the non-DiT parts of a LongCat-Video checkpoint tree.

`longcat-convert tiny` writes a small checkpoint laid out exactly as published; this module writes the
tokenizer (umT5-style Unigram), the umT5 text encoder, the Wan 2.1 VAE and the flow-matching scheduler.
Every weight comes from a local `torch.Generator`, so the same seed gives byte-identical files whatever
the global RNG state is.
"""

from __future__ import annotations

import contextlib
import json
import math
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from longcat_convert.core.errors import LongcatError
from longcat_convert.core.quiet import quiet_libraries

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import UMT5Config

# ---------------------------------------------------------------- tokenizer

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPACE = "\u2581"  # SentencePiece's "▁" word-boundary marker
EXTRA_IDS = 8
MODEL_MAX_LENGTH = 512
TOKENIZER_PIECES = 640  # learned pieces, on top of the 3 specials and the extra ids
MAX_PIECE_CHARS = 8

# Our own text, in the register of video prompts, so common prompt words become whole pieces.
CORPUS = """
A cat sits on a wooden table next to a window while rain falls outside.
The cat watches the drops slide down the glass and slowly closes its eyes.
A small orange cat jumps from the sofa to the floor and runs across the room.
The camera slowly pans across a busy city street at night, with neon signs reflecting on the wet road.
People with umbrellas walk past a glowing shop window and a yellow taxi stops at the corner.
A young woman in a red coat walks through a snowy forest, and her breath is visible in the cold air.
Tall pine trees stand in silence while soft snow keeps falling from a grey sky.
A dog runs along the beach at sunset, chasing a ball thrown by a child.
Waves roll onto the sand and the light turns gold, then pink, then deep blue.
An old man plays the violin on a bridge over a quiet river in the early morning.
Birds fly over the water and a boat moves slowly under the bridge.
A close-up shot of coffee being poured into a white cup, steam rising in the warm kitchen light.
The camera follows a cyclist riding down a mountain road with green hills on both sides.
A group of friends laugh around a campfire under a sky full of stars.
Sparks rise from the fire and the faces of the friends glow in orange light.
A train crosses a long bridge in the desert as the sun rises behind the mountains.
A chef slices fresh vegetables on a cutting board, then tosses them into a hot pan.
Time-lapse of clouds moving over a green valley, shadows racing across the fields.
A little girl blows bubbles in a park, and the bubbles float past the trees in the wind.
The camera zooms in on a clock tower as the hands move toward midnight.
A horse gallops across an open field, its mane flowing in the wind.
A robot walks through an empty factory, its lights blinking blue and red.
Slow motion video of a drop of water falling into a still pool, sending ripples outward.
A man in a black suit opens a door and steps into a bright room full of flowers.
A cat and a dog sleep next to each other on a soft blanket by the fire.
The city skyline at dusk, with lights turning on one by one in the tall buildings.
A hot air balloon rises over a river valley in the morning mist.
A woman paints a picture of the sea while the wind moves her hair.
Two children build a sand castle, and a wave slowly washes part of it away.
A drone shot over a forest in autumn, with red, orange and yellow leaves.
A street musician plays the guitar while people stop to listen and smile.
The camera moves through a library with tall shelves full of old books.
A candle burns on a dark table, and the flame moves in a gentle draft.
A fox walks through the snow at night, looking around before it runs into the woods.
Heavy rain falls on a tin roof while a cat sleeps inside the warm house.
A fast car drives along a coastal road, the sea shining under the bright sun.
High quality, realistic, cinematic lighting, smooth motion, sharp detail, 4k video.
"""


def _piece_counts(corpus: str, max_chars: int) -> Counter[str]:
    """How often each substring (up to max_chars) of every "▁word" occurs in the corpus."""
    counts: Counter[str] = Counter()
    for word in corpus.split():
        token = SPACE + word
        for start in range(len(token)):
            for end in range(start + 1, min(len(token), start + max_chars) + 1):
                counts[token[start:end]] += 1
    return counts


def _unigram_vocab(corpus: str, pieces: int) -> list[tuple[str, float]]:
    """A Unigram vocabulary built directly from substring frequencies.

    `tokenizers.trainers.UnigramTrainer` is not reproducible (its scores and piece order change from run
    to run), so the pieces are chosen by a fixed rule: every single character (the corpus's and printable
    ASCII, so English text rarely hits <unk>), then the multi-character substrings that save the most
    characters, ties broken alphabetically. Scores are log relative frequencies, as in SentencePiece.
    """
    counts = _piece_counts(corpus, MAX_PIECE_CHARS)
    fallback = string.ascii_letters + string.digits + string.punctuation
    chosen = {p: c for p, c in counts.items() if len(p) == 1}
    chosen |= {p: counts.get(p, 1) for char in fallback for p in (char, SPACE + char)}
    longer = sorted(
        ((p, c) for p, c in counts.items() if c > 1 and p not in chosen),
        key=lambda item: (-item[1] * (len(item[0]) - 1), item[0]),
    )
    chosen |= dict(longer[: max(0, pieces - len(chosen))])
    total = sum(chosen.values())
    scored = [(p, round(math.log(c / total), 6)) for p, c in chosen.items()]
    return sorted(scored, key=lambda item: (-item[1], item[0]))


def _extra_tokens() -> list[str]:
    return [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]


def build_tokenizer() -> Tokenizer:
    """The `tokenizers.Tokenizer`: T5 layout, <pad>=0 </s>=1 <unk>=2, extra ids last in reverse order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)]
    vocab += _unigram_vocab(CORPUS, TOKENIZER_PIECES)
    vocab += [(token, 0.0) for token in reversed(_extra_tokens())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    # the same pipeline transformers' T5Tokenizer rebuilds on load, so both readings of tokenizer.json agree
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", EOS], pair=["$A", EOS, "$B", EOS], special_tokens=[(EOS, 1)]
    )
    specials = [PAD, EOS, UNK, *_extra_tokens()]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def _added_token_entry(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_config(tokenizer: Tokenizer) -> dict[str, object]:
    specials = [PAD, EOS, UNK, *_extra_tokens()]
    decoder = {str(tokenizer.token_to_id(t)): _added_token_entry(t) for t in specials}
    return {
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda item: int(item[0]))),
        "additional_special_tokens": _extra_tokens(),
        "clean_up_tokenization_spaces": True,
        "eos_token": EOS,
        "extra_ids": EXTRA_IDS,
        "legacy": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": UNK,
    }


def _special_tokens_map() -> dict[str, object]:
    return {
        "additional_special_tokens": _extra_tokens(),
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
    }


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(folder: Path) -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the vocabulary size."""
    folder = _make_folder(folder)
    tokenizer = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(tokenizer))
    _write_json(folder / "special_tokens_map.json", _special_tokens_map())
    return tokenizer.get_vocab_size(with_added_tokens=True)


def tokenizer_vocab_size(folder: Path) -> int:
    """Number of ids a tokenizer folder can produce (the text encoder's vocab_size must be at least this)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise LongcatError("no tokenizer.json here", path, "write the tokenizer first (write_tokenizer)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise LongcatError(f"cannot read tokenizer: {exc}", path, "rewrite it with write_tokenizer") from exc
    return tokenizer.get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------- shared helpers

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _make_folder(folder: Path) -> Path:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LongcatError("exists and is not a folder", folder, "choose another destination")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_dtype(dtype: torch.dtype, folder: Path) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise LongcatError(f"unsupported dtype {dtype}", folder, f"use one of {names}")


def _check_positive(name: str, value: int, folder: Path) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LongcatError(f"{name} must be a positive integer, got {value!r}", folder)


def _generator(seed: int, folder: Path) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise LongcatError(f"seed must be a non-negative integer, got {seed!r}", folder)
    return torch.Generator(device="cpu").manual_seed(seed)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library chatter and leave the global RNG untouched."""
    with quiet_libraries(), torch.random.fork_rng(devices=[]):
        yield


def _uniform_(tensor: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    values = torch.rand(tensor.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    tensor.copy_(values)


def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)


# ---------------------------------------------------------------- text encoder

ENCODER_LAYERS = 2
ENCODER_HEADS = 4
ENCODER_D_KV = 8
ENCODER_D_FF = 64


def _text_encoder_config(d_model: int, vocab_size: int) -> UMT5Config:
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=ENCODER_D_KV,
        d_ff=ENCODER_D_FF,
        num_layers=ENCODER_LAYERS,
        num_decoder_layers=ENCODER_LAYERS,
        num_heads=ENCODER_HEADS,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        architectures=["UMT5EncoderModel"],
    )


def _encoder_std(name: str, shape: torch.Size, d_model: int) -> float:
    """Mesh-TensorFlow T5 init (what transformers uses), keyed on parameter names."""
    if name.endswith(("shared.weight", "embed_tokens.weight")):
        return 1.0
    if name.endswith(".q.weight"):
        return (d_model * ENCODER_D_KV) ** -0.5
    # nn.Linear weights are [out, in]; the relative bias table is [buckets, heads]
    fan_in = shape[0] if name.endswith("relative_attention_bias.weight") else shape[1]
    return fan_in**-0.5


def _seed_text_encoder(model: torch.nn.Module, d_model: int, generator: torch.Generator) -> None:
    with torch.no_grad():
        # named_parameters() yields tied tensors once, so the embedding is drawn once
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.fill_(1.0)
            else:
                _normal_(param, _encoder_std(name, param.shape, d_model), generator)


def write_text_encoder(folder: Path, d_model: int, vocab_size: int, seed: int, dtype: torch.dtype) -> None:
    """A 2-layer `UMT5EncoderModel` with hidden size d_model, saved as config.json + model.safetensors."""
    _check_positive("d_model", d_model, folder)
    _check_positive("vocab_size", vocab_size, folder)
    _check_dtype(dtype, folder)
    generator = _generator(seed, folder)
    folder = _make_folder(folder)
    from transformers import UMT5EncoderModel

    with _quiet():
        model = UMT5EncoderModel(_text_encoder_config(d_model, vocab_size))
        _seed_text_encoder(model, d_model, generator)
        model = model.to(dtype).eval()
        model.save_pretrained(folder, safe_serialization=True)


# ---------------------------------------------------------------- VAE

# Wan 2.1 VAE per-channel latent statistics, as published in its vae/config.json.
WAN_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
VAE_BASE_DIM = 8


def _vae_kwargs() -> dict[str, object]:
    return {
        "base_dim": VAE_BASE_DIM,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 1,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "latents_mean": list(WAN_LATENTS_MEAN),
        "latents_std": list(WAN_LATENTS_STD),
    }


def _seed_vae(model: torch.nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default conv init, U(±1/sqrt(fan_in)) for weight and bias, drawn from our generator."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith("gamma"):  # RMS norm scale
                param.fill_(1.0)
                continue
            weight = (
                params.get(name.removesuffix("bias") + "weight", param) if name.endswith("bias") else param
            )
            fan_in = weight[0].numel() if weight.dim() > 1 else weight.numel()
            _uniform_(param, fan_in**-0.5, generator)


def write_vae(folder: Path, seed: int, dtype: torch.dtype) -> None:
    """A small `AutoencoderKLWan` (Wan 2.1 layout, base_dim 8), saved as config.json + safetensors."""
    _check_dtype(dtype, folder)
    generator = _generator(seed, folder)
    folder = _make_folder(folder)
    from diffusers import AutoencoderKLWan

    with _quiet():
        model = AutoencoderKLWan(**_vae_kwargs())
        _seed_vae(model, generator)
        model = model.to(dtype).eval()
        model.save_pretrained(folder, safe_serialization=True)


# ---------------------------------------------------------------- scheduler

SCHEDULER_SETTINGS: dict[str, object] = {
    "num_train_timesteps": 1000,
    "shift": 12.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "linear",
    "stochastic_sampling": False,
}


def write_scheduler(folder: Path, shift: float = 12.0) -> None:
    """scheduler_config.json for `FlowMatchEulerDiscreteScheduler` with LongCat's shift of 12 (the avatar 1.5
    repository ships its own with 7)."""
    folder = _make_folder(folder)
    from diffusers import FlowMatchEulerDiscreteScheduler

    settings = {**SCHEDULER_SETTINGS, "shift": shift}
    with _quiet():
        FlowMatchEulerDiscreteScheduler(**settings).save_pretrained(folder)
    path = folder / "scheduler_config.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    wrong = {k: written.get(k) for k, v in settings.items() if written.get(k) != v}
    if wrong:
        raise LongcatError(
            f"diffusers wrote unexpected scheduler settings {wrong}", path, "report the diffusers version"
        )


# ---------------------------------------------------------------- all four


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def write_components(root: Path, caption_channels: int, seed: int, dtype: torch.dtype) -> None:
    """Write root/tokenizer, root/text_encoder, root/vae and root/scheduler."""
    root = _make_folder(root)
    vocab_size = write_tokenizer(root / "tokenizer")
    # umT5 pads its embedding table past the tokenizer (256300 -> 256384); do the same
    write_text_encoder(root / "text_encoder", caption_channels, _round_up(vocab_size, 128), seed, dtype)
    write_vae(root / "vae", seed, dtype)
    write_scheduler(root / "scheduler")
