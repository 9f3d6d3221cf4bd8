"""T5's SentencePiece tokenizer (SD 3.x's third text encoder), offline.

No weights file carries it and no registry package we could depend on ships it (as of this
writing: `sentencepiece` and `tokenizers` ship the machinery, not T5's vocabulary), so it is
read from where users have it: a diffusers folder's `tokenizer_3/`, or a `t5_tokenizer/` or
`tokenizer/` folder beside the T5 weights (`models/text_encoder/` for split files, beside
the checkpoint for all-in-one files). Without it SD 3.x runs without T5, as diffusers does
when `text_encoder_3` is None, and the job says so.
"""

from __future__ import annotations

import functools
from pathlib import Path

TOKENIZER_FOLDERS = ("t5_tokenizer", "tokenizer", "tokenizer_3")
# tokenizer.json needs only `tokenizers`; spiece.model also needs the `sentencepiece` package
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
T5_MAX_LENGTH = 256  # SD 3's T5 sequence length (diffusers' max_sequence_length default)


def has_tokenizer_files(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def find_t5_tokenizer(*places: Path | None) -> Path | None:
    """The first tokenizer folder found in or beside `places` (folders or weights files)."""
    for place in places:
        if place is None:
            continue
        place = Path(place)
        folder = place if place.is_dir() else place.parent
        for candidate in [folder, *(folder / name for name in TOKENIZER_FOLDERS)]:
            if has_tokenizer_files(candidate):
                return candidate
    return None


def t5_missing_note() -> str:
    """What a job says when SD 3 ran without T5 (its weights or its tokenizer were not found)."""
    return ("T5-XXL not used (SD 3.x runs without it; prompts are followed less closely): it needs "
            "t5xxl weights (in the checkpoint or models/text_encoder/t5xxl_fp16.safetensors) and T5's "
            "tokenizer.json (from an SD 3 or Flux diffusers folder's tokenizer_3/ or tokenizer_2/) in "
            "models/text_encoder/t5_tokenizer/")


@functools.lru_cache(maxsize=2)  # shared and read-only in use; one or two folders in practice
def load_t5_tokenizer(folder: Path):
    from transformers import T5TokenizerFast  # heavy: transformers takes a second to import

    folder = Path(folder)
    try:
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ValueError(f"{folder}: not a T5 tokenizer ({exc}); tokenizer.json is needed "
                         "(spiece.model alone also needs the sentencepiece package)") from exc
