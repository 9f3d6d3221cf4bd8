"""The CLIP BPE tokenizer every family uses, from the files shipped in `pipelines/configs/`
(the Hub is never contacted), with the family's pad token."""

from __future__ import annotations

import functools
from pathlib import Path

from pipelines.models.families import TextEncoderSpec

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # pipelines/configs: data, not a package
TOKENIZER_DIR = CONFIG_DIR / "clip_tokenizer"


def load_tokenizer(spec: TextEncoderSpec):
    """The shipped CLIP BPE tokenizer with the encoder's pad token (shared: read-only in use)."""
    return _tokenizer(spec.pad_token)


@functools.lru_cache(maxsize=4)  # one per pad token: SD 1.x pads with <|endoftext|>, OpenCLIP with "!"
def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer  # heavy: transformers takes a second to import

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token, local_files_only=True)
