"""Saving a remote worker's images in the front end, as if the job had run here.

A Ray worker must not write outputs (its disk is not the user's, and file numbering belongs to
one place), so its generator holds each image's save instead: the image carries a `SaveOrder`
(folder, infotext, seed, file-name values) in `image.info`, exactly what `Generator.save` was
called with. The front end's own generator then saves it (`save_held`): the same decision
(save_images, grids, formats), the same file names, the same infotexts as a one-process run.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.request import GenerationResult
from pipelines.generate.generation import Generator

SAVE_KEY = "sdui.save_order"  # on image.info; taken off before the image is saved or sent


@dataclass(frozen=True)
class SaveOrder:
    """One held call of `Generator.save`, minus the image (which carries it) and the request."""

    folder: str
    text: str
    seed: int | None
    name_values: dict[str, str] | None


class HoldingGenerator(Generator):
    """A worker's generator: runs jobs as any other, but writes no file. Each image it would
    save carries its SaveOrder instead; the path it reports is "" until the front end saves it."""

    def save(self, image, folder: str, text: str, request, result: GenerationResult, *,
             seed: int | None = None, name_values: dict[str, str] | None = None) -> str:
        image.info[SAVE_KEY] = SaveOrder(folder, text, seed, name_values)
        return ""


def save_held(generator: Generator, request, result: GenerationResult) -> GenerationResult:
    """Save, with `generator` (the front end's), every image of `result` that carries a held
    save, in order (so file numbers run as in one process); its path goes into result.paths."""
    while len(result.paths) < len(result.images):
        result.paths.append("")
    for index, image in enumerate(result.images):
        order = image.info.pop(SAVE_KEY, None)
        if order is not None:
            result.paths[index] = generator.save(image, order.folder, order.text, request, result,
                                                 seed=order.seed, name_values=order.name_values)
    return result
