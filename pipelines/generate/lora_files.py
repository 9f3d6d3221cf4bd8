"""The Lora folder as browsers and /sdapi/v1/loras list it: each file's safetensors metadata
(kohya's ss_* training facts) and its trigger words. Apart from `lora` (which imports diffusers,
peft and safetensors.torch to apply LoRAs) so that listing the folder while the page is built
imports none of them."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (kohya writes ss_* training facts there)."""
    if not str(path).endswith(".safetensors"):
        return {}
    try:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > 100 << 20:
                return {}
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def listing(files) -> list[dict]:
    """The Lora folder's files for browsers and /sdapi/v1/loras: name, alias, path, metadata and
    trigger words (kohya's ss_tag_frequency), what to write in a prompt."""
    out = []
    for f in files:
        meta = read_metadata(Path(f.path))
        name = Path(f.name).stem
        out.append({"name": name, "alias": meta.get("ss_output_name", name), "path": str(f.path),
                    "metadata": {k: v for k, v in meta.items() if len(v) < 20000},
                    "trigger_words": trigger_words(meta), "prompt": f"<lora:{name}:1>"})
    return out


def trigger_words(metadata: dict[str, str], limit: int = 20) -> list[str]:
    """Most frequent training tags from kohya's ``ss_tag_frequency`` (the LoRA's trigger words)."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except ValueError:
        return []
    counts: dict[str, int] = {}
    for tags in data.values() if isinstance(data, dict) else ():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                tag = str(tag).strip()
                if tag:
                    counts[tag] = counts.get(tag, 0) + (n if isinstance(n, int) else 1)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]
