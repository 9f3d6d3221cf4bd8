"""Which upscalers exist: Lanczos & co., then the models of the upscaler folder, and what hires fix
offers. Apart from `upscaling` (whose jobs import diffusers through the generator) so that the page's
lists are made without importing it."""

from __future__ import annotations

from pipelines.core.request import LATENT_UPSCALE_MODES
from pipelines.generate import upscalers
from pipelines.models.registry import ModelRegistry


class UpscalerChoices:
    """The upscaler folder's models beside the built-in ones."""

    def __init__(self, registry: ModelRegistry, models: upscalers.UpscalerModels):
        self.registry = registry
        self.models = models  # loaded ESRGAN & co., kept between jobs

    def available(self, refresh: bool = False) -> list:
        """Every upscaler: Lanczos/Nearest/Bicubic, then the models of the upscaler folder
        (`--esrgan-models-path`, default models/ESRGAN) with their native scale."""
        files = self.registry.list("esrgan", refresh)
        return [*upscalers.BUILTIN, *upscalers.model_upscalers(files, self.models)]

    def names(self) -> list[str]:
        return upscalers.upscaler_names(self.available())

    def hires_names(self) -> list[str]:
        """What hires fix offers: A1111's latent modes, then every upscaler."""
        return [*LATENT_UPSCALE_MODES, *self.names()]
