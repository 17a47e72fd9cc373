"""Prompt cleaning and umT5 text encoding
(reference/pipeline/README.md, "Prompt cleaning and text encoding").

Upstream cleans with ftfy (a dependency here too), HTML-unescapes twice, and collapses whitespace;
tokenizes to exactly `max_sequence_length` tokens (pad, truncate, `</s>` appended) and encodes with the
attention mask. The embeddings go to the DiT as [B, 1, L, C] in the DiT's dtype; the mask stays [B, L]. With CFG the
batch is [negative, positive]; a missing negative prompt is "".
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import ftfy
import torch

from longcat_convert.core import progress
from longcat_convert.core.errors import LongcatError

from .components import Pipeline
from .guidance import uses_cfg

DEFAULT_MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class TextBatch:
    embeds: torch.Tensor  # [B_m, 1, L, C] in the DiT dtype
    mask: torch.Tensor  # [B_m, L] int64

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]


def clean_prompt(text: str) -> str:
    """Upstream's prompt_clean: ftfy.fix_text, HTML-unescape twice, strip, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def single_prompt(prompt: str | list[str], what: str = "prompt") -> str:
    """Upstream's guidance and mask handling only work for one sample; accept a str or a 1-element list."""
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise LongcatError(f"batch size {len(prompt)} is not supported: upstream's CFG scale and text mask "
                               f"only work for one {what} per call")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise LongcatError(f"{what} must be a string, got {type(prompt).__name__}")
    return prompt


def encode_prompt(pipe: Pipeline, prompt: str, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> TextBatch:
    if max_sequence_length <= 0:
        raise LongcatError(f"max_sequence_length must be positive, got {max_sequence_length}")
    tokens = pipe.tokenizer([clean_prompt(prompt)], padding="max_length", max_length=max_sequence_length,
                            truncation=True, add_special_tokens=True, return_attention_mask=True,
                            return_tensors="pt")
    ids, mask = tokens.input_ids.to(pipe.device), tokens.attention_mask.to(pipe.device)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, mask).last_hidden_state
    hidden = hidden.to(device=pipe.device, dtype=pipe.dit_dtype)
    return TextBatch(hidden.view(1, 1, max_sequence_length, -1), mask)


def text_batch(pipe: Pipeline, prompt: str | list[str], negative_prompt: str | list[str] | None, guidance: float,
               max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> TextBatch:
    """The DiT's text input: the prompt alone, or [negative, positive] when guidance > 1."""
    with progress.stage("text encoding"):
        positive = encode_prompt(pipe, single_prompt(prompt), max_sequence_length)
        if not uses_cfg(guidance):
            return positive
        negative = encode_prompt(pipe, single_prompt(negative_prompt or "", "negative prompt"), max_sequence_length)
    return TextBatch(torch.cat([negative.embeds, positive.embeds]), torch.cat([negative.mask, positive.mask]))
