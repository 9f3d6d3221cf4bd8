"""Extra-network tags in a prompt: ``<lora:name:weight>`` and friends (A1111's syntax).

Text side only, no torch (the UI imports this): `extract_extra_networks` cuts the tags out of
a positive prompt and parses them; the engine applies the networks (`pipelines.generate.lora`).
Step 2 of the order `pipelines.core.prompt_parser` describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["LORA_KINDS", "ExtraNetwork", "extract_extra_networks"]

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")  # A1111 >= 1.5 reads <lyco:...> as an alias of <lora:...>


@dataclass
class ExtraNetwork:
    """One ``<kind:item:item:...>`` tag. ``name`` is the first positional item (one without
    ``=``), ``args`` the other items in prompt order (positional and ``key=value``)."""

    kind: str
    name: str
    args: list[str] = field(default_factory=list)
    text: str = ""  # the tag as written, for messages

    @property
    def positional(self) -> list[str]:
        return [a for a in self.args if len(a.split("=", 2)) != 2]

    @property
    def named(self) -> dict[str, str]:
        out = {}
        for a in self.args:
            parts = a.split("=", 2)
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    @property
    def is_lora(self) -> bool:
        return self.kind in LORA_KINDS

    def _float(self, value: str, what: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{self.text or self.name}: {what} {value!r} is not a number") from None

    def te_multiplier(self) -> float:
        """Text-encoder weight: ``<lora:n:te>``, ``te=``; default 1.0."""
        pos, named = self.positional, self.named
        te = self._float(pos[0], "weight") if pos else 1.0
        if "te" in named:
            te = self._float(named["te"], "te")
        return te

    def unet_multiplier(self) -> float:
        """U-Net weight: ``<lora:n:te:unet>``, ``unet=``; default: the text-encoder weight."""
        pos, named = self.positional, self.named
        unet = self._float(pos[1], "unet weight") if len(pos) > 1 else self.te_multiplier()
        if "unet" in named:
            unet = self._float(named["unet"], "unet")
        return unet

    def lora_weights(self) -> tuple[float, float]:
        """(text-encoder, U-Net) multipliers."""
        return self.te_multiplier(), self.unet_multiplier()

    def dyn_dim(self) -> int | None:
        """DyLoRA rank: ``<lora:n:te:unet:dyn>`` or ``dyn=``; None if not given."""
        pos, named = self.positional, self.named
        value = named.get("dyn", pos[2] if len(pos) > 2 else None)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{self.text or self.name}: dyn {value!r} is not an integer") from None

    def multiplier(self) -> float:
        """The single weight of non-LoRA kinds (``<hypernet:name:0.5>``); default 1.0."""
        if self.is_lora:
            return self.te_multiplier()
        return self._float(self.args[0], "weight") if self.args else 1.0


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Cut every ``<word:...>`` tag out of the prompt (nothing else is touched, so
    ``"a, <lora:x:1>, b"`` becomes ``"a, , b"``, as A1111) and return the tags in order.

    Tags of any kind are removed, known or not; the caller warns about kinds and names it
    cannot resolve. Weights are parsed lazily by the helper methods, which raise
    ``ValueError`` for non-numbers (A1111 then skips that network kind with an error).
    """
    found: list[ExtraNetwork] = []

    def cut(m: re.Match) -> str:
        items = m.group(2).split(":")
        name_index = next((k for k, it in enumerate(items) if len(it.split("=", 2)) != 2), None)
        name = items[name_index] if name_index is not None else ""
        args = [it for k, it in enumerate(items) if k != name_index]
        found.append(ExtraNetwork(m.group(1), name, args, m.group(0)))
        return ""

    return _EXTRA_NETWORK.sub(cut, prompt), found
