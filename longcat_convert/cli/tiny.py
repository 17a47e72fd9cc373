"""`longcat-convert tiny`: write a small raw LongCat-Video tree to experiment and test with."""

from __future__ import annotations

from pathlib import Path

import click

from ..core import progress
from ..core.errors import LongcatError
from ..tiny_avatar import AVATAR_VARIANTS, build_tiny_avatar
from ..tiny_tree import LORA_TARGET_SETS, build_tiny_tree
from .common import dtype_option, quiet_option


@click.command("tiny")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for every random value (same seed, same bytes).")
@dtype_option(("float32", "bfloat16"), "dtype of the DiT, LoRAs, text encoder and VAE weights.", "float32")
@click.option("--depth", default=2, show_default=True, help="Number of DiT blocks (the published model has 48).")
@click.option("--hidden", type=int, help="DiT hidden size, a multiple of 64 (default 128; published: 4096).")
@click.option("--full-size", is_flag=True,
              help="The DiT at the published shapes (hidden 4096, 32 heads, caption 4096, adaLN 512; --depth blocks) "
                   "in 10 GB shards with an index, and both LoRAs at rank 128, random values written one tensor at a "
                   "time; text encoder, tokenizer, VAE, scheduler stay tiny. Depth 48 is the real model: ~27 GB "
                   "bfloat16 + 2.9 GB LoRAs (float32: twice that). Free space is checked first.")
@click.option("--lora-targets", type=click.Choice(LORA_TARGET_SETS), default="published", show_default=True,
              help="published: the modules the released adapters target; extended: also cross_attn.proj in "
                   "the refinement adapter; all: every Linear, embedders included.")
@click.option("--variant", type=click.Choice(("base", *AVATAR_VARIANTS)), default="base", show_default=True,
              help="base: LongCat-Video; avatar-v1.0 / avatar-v1.5: a LongCat-Video-Avatar tree with the base tree "
                   "beside it (DST/LongCat-Video-Avatar[-1.5] and DST/LongCat-Video).")
@click.option("--audio-prenorm", is_flag=True,
              help="Avatar variants: set audio_prenorm (adds pre_audio_crs_attn_norm to every block).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@quiet_option()
def tiny_command(dst: Path, seed: int, dtype: str, depth: int, hidden: int | None, full_size: bool, lora_targets: str,
                 variant: str, audio_prenorm: bool, overwrite: bool, quiet: bool) -> None:
    """Write a complete raw LongCat-Video tree at DST, tiny but shaped exactly like the published one.

    \b
    DST/dit/           config.json with every published field, shards + index
    DST/lora/          cfg_step_lora and refinement_lora, upstream format
    DST/text_encoder/  a small transformers UMT5EncoderModel
    DST/tokenizer/     a real umT5-style fast tokenizer (pad 0, </s> appended)
    DST/vae/           a small diffusers AutoencoderKLWan, Wan 2.1 statistics
    DST/scheduler/     FlowMatchEulerDiscreteScheduler with shift 12

    \b
    With --variant avatar-v1.0 or avatar-v1.5, DST holds two trees side by
    side, as upstream's avatar demos expect them:
    DST/LongCat-Video/             the base tree above
    DST/LongCat-Video-Avatar/      avatar_single/, avatar_multi/,
                                   chinese-wav2vec2-base/
    DST/LongCat-Video-Avatar-1.5/  base_model/, base_model_int8/,
                                   lora/dmd_lora.safetensors,
                                   scheduler/ (shift 7), whisper-large-v3/
    (no vocal_separator/: there is no tiny ONNX separator)

    \b
    Examples:
      longcat-convert tiny /tmp/raw            # fp32, the published LoRA targets
      longcat-convert tiny /tmp/raw16 --dtype bfloat16 --seed 3
      longcat-convert tiny /tmp/deep --depth 4 --hidden 256 --lora-targets all
      longcat-convert tiny /big/full --full-size --depth 48 --dtype bfloat16
      longcat-convert tiny /tmp/av15 --variant avatar-v1.5
    """
    if full_size and hidden is not None:
        raise LongcatError("--hidden and --full-size do not go together: full size means hidden 4096")
    if variant != "base":
        if full_size:
            raise LongcatError("--full-size writes the base LongCat-Video tree only, not --variant " + variant)
        path = build_tiny_avatar(dst, variant, seed=seed, dtype=dtype, depth=depth, hidden=hidden or 128,
                                 lora_targets=lora_targets, audio_prenorm=audio_prenorm, overwrite=overwrite)
        click.echo(f"wrote a tiny {variant} tree to {path} and its base tree to {path.parent / 'LongCat-Video'} "
                   f"(depth {depth}, hidden {hidden or 128}, {dtype}, seed {seed})")
        return
    if audio_prenorm:
        raise click.UsageError("--audio-prenorm applies to the avatar variants only")
    with progress.reporting(progress.wanted(quiet)):
        path = build_tiny_tree(dst, seed=seed, dtype=dtype, depth=depth, hidden=hidden or 128,
                               lora_targets=lora_targets, overwrite=overwrite, full_size=full_size)
    what = "full-size (synthetic)" if full_size else "tiny"
    click.echo(f"wrote a {what} raw LongCat-Video tree to {path} (depth {depth}, "
               f"hidden {4096 if full_size else hidden or 128}, {dtype}, seed {seed})")
