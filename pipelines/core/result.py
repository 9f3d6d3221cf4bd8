"""What a job gives back: its images with their seeds, infotexts and paths, and what it said."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:  # annotations only: request.py imports this module
    from pipelines.core.request import GenerationRequest


@dataclass
class GenerationResult:
    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # where each image was saved ("" when not)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    request: GenerationRequest | None = None
    # the job's memory plan: estimated peak, free memory, mode, whether it was retried
    memory: dict | None = None

    def take_in(self, other: "GenerationResult", *, images: bool = True) -> None:
        """Fold in one generation of a script's job: its new warnings and, unless `images` is
        False, its images with their seeds, subseeds, infotexts and paths (in step)."""
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)
        if images:
            self.images += other.images
            self.seeds += other.seeds
            self.subseeds += other.subseeds
            self.infotexts += other.infotexts
            self.paths += other.paths
