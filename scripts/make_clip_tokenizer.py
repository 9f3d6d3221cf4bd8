"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) shipped in pipelines/configs.

The CLIP vocabulary is fully determined by the merges list in open_clip's
`bpe_simple_vocab_16e6.txt.gz`: 256 byte tokens, the same with `</w>`, one token per
merge (48894), then `<|startoftext|>` and `<|endoftext|>` (49408 in all).
Run once: python scripts/make_clip_tokenizer.py
"""

import gzip
import json
from importlib.util import find_spec
from pathlib import Path

N_MERGES = 49408 - 2 * 256 - 2
OUT = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "clip_tokenizer"


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> unicode table, in CLIP's vocabulary order:
    the printable bytes first (as themselves), then the rest mapped to 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def main() -> None:
    bpe_gz = Path(find_spec("open_clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    tokens = byte_symbols()
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408 and len(set(tokens)) == 49408
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
