"""How a saved image is written, as the Settings tab chose (`SaveOptions`): A1111's file formats
(PNG with a `parameters` chunk; JPEG and WebP with the parameters in the EXIF UserComment, as
A1111 writes them, so `outputs.read_infotext` and PNG Info read them back) and A1111's file-name
patterns ("[seed]-[prompt_words]").

`core.outputs` keeps the folder layout, the numbering and the PNG writer (`write_png`); this
module says what a JPEG or WebP file holds and what follows a file's number in its name. It
imports nothing of `outputs`, so `outputs` can use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from PIL import Image

SUFFIXES = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
# A1111's file-name pattern words this server fills in (its images.FilenameGenerator's names)
PATTERN_WORDS = ("seed", "prompt", "prompt_words", "negative_prompt", "model_name", "model_hash",
                 "sampler", "steps", "cfg", "width", "height", "date", "datetime", "batch_number")
PROMPT_WORDS = 8  # A1111's default filename_words_limit
MAX_NAME_PART = 128  # A1111's max_filename_part_length
_WORD_RE = re.compile(r"\[(\w+)\]")
_UNSAFE_RE = re.compile(r'[\x00-\x1f<>:"/\\|?*]+')  # not in a file name on any common OS
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


@dataclass(frozen=True)
class SaveOptions:
    """How a job saves its images, fixed when its request is built (see core.user_settings)."""

    format: str = "png"  # a key of SUFFIXES
    quality: int = 80  # JPEG and WebP
    filename_pattern: str = ""  # "": <number>-<seed>, as A1111's default
    save_grids: bool = True

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.format]


def write_exif_image(image: Image.Image, handle: IO[bytes], infotext: str | None, options: SaveOptions) -> None:
    """`image` into `handle` as JPEG or WebP (`options.format`), `infotext` in the EXIF
    UserComment as A1111 writes it ("UNICODE" and UTF-16 big-endian). PNG is `outputs.write_png`."""
    if options.format not in ("jpg", "webp"):
        raise ValueError(f"not an EXIF format: {options.format!r}")
    exif = Image.Exif()
    if infotext:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\x00" + infotext.encode("utf-16-be")
    keeps_alpha = options.format == "webp" and "A" in image.getbands()
    image = image.convert("RGBA" if keeps_alpha else "RGB")
    image.save(handle, format="JPEG" if options.format == "jpg" else "WEBP", quality=options.quality,
               exif=exif.tobytes())


def pattern_values(prompt: str, negative_prompt: str, params: Mapping[str, Any], *,
                   now: datetime | None = None, batch_number: int = 0) -> dict[str, str]:
    """The pattern words' values for one image, from its infotext params (A1111's keys)."""
    now = now or datetime.now()
    width, _, height = str(params.get("Size", "")).partition("x")
    words = re.sub(r"[^\w\s]", " ", prompt or "").split()
    return {
        "seed": str(params.get("Seed", "")), "prompt": prompt or "", "negative_prompt": negative_prompt or "",
        "prompt_words": " ".join(words[:PROMPT_WORDS]), "model_name": str(params.get("Model", "")),
        "model_hash": str(params.get("Model hash", "")), "sampler": str(params.get("Sampler", "")),
        "steps": str(params.get("Steps", "")), "cfg": str(params.get("CFG scale", "")),
        "width": width, "height": height, "date": now.strftime("%Y-%m-%d"),
        "datetime": now.strftime("%Y%m%d%H%M%S"), "batch_number": str(batch_number),
    }


def name_part(pattern: str, values: Mapping[str, str]) -> str:
    """What follows the number in a file's name: `pattern` with its [words] filled in (an empty
    pattern: the seed, A1111's default), made safe for a file name; "" when nothing is left."""
    text = _WORD_RE.sub(lambda m: values.get(m.group(1), ""), pattern or "[seed]")
    text = _UNSAFE_RE.sub("_", text).strip(" .")
    return text[:MAX_NAME_PART].rstrip(" .")
