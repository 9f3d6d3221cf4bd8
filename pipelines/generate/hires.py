"""Hires fix (txt2img at base size, upscale, second img2img pass) and SD upscale (upscale,
then img2img tile by tile with overlap).

Both drive `runner.run_batch`, so the second pass shares the sampler loop, CFG, SDXL
conditioning and seeds with plain generation: image i of the second pass draws its noise
from seed + i again, at the hires latent size.

Upscaling is either a latent mode (A1111's names, `upscalers.LATENT_MODES`: the first
pass's latents are interpolated) or a pixel upscaler the engine hands in as
`upscale_pixels(image, (width, height)) -> image` (PIL or a neural model, tiled).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.core.hires_info import fields_from_infotext, infotext_params  # noqa: F401 (re-exported)
from pipelines.core.progress import JobControl, Progress, ProgressCallback
from pipelines.core.request import GenerationRequest
from pipelines.generate import runner, tiling
from pipelines.generate.prompts import encode_prompts
from pipelines.generate.upscalers import LATENT_MODES

PixelUpscale = Callable[[Image.Image, tuple[int, int]], Image.Image]


def is_latent(upscaler: str) -> bool:
    return upscaler in LATENT_MODES


def second_pass_request(request: GenerationRequest) -> GenerationRequest:
    """The request the second pass samples with (its steps, strength, sampler, schedule)."""
    sampler = request.hr_sampler or request.sampler
    schedule = request.hr_schedule_type or (request.schedule_type if sampler == request.sampler else "Automatic")
    return request.replace(enable_hr=False, steps=request.hr_second_pass_steps or request.steps,
                           denoising_strength=request.hr_denoising_strength, sampler=sampler,
                           schedule_type=schedule)


def second_pass_steps(request: GenerationRequest) -> int:
    """Sampler steps the second pass actually runs (img2img runs the tail of the schedule)."""
    steps = request.hr_second_pass_steps or request.steps
    return min(int(steps * request.hr_denoising_strength), steps)


def upscale_latents(latents: torch.Tensor, mode: str, width: int, height: int) -> torch.Tensor:
    interpolation, antialias = LATENT_MODES[mode]
    size = (height // 8, width // 8)
    if interpolation in ("bilinear", "bicubic"):
        return F.interpolate(latents, size=size, mode=interpolation, antialias=antialias, align_corners=False)
    return F.interpolate(latents, size=size, mode=interpolation)


class _Steps:
    """Progress over the whole job: every denoising step of both passes counts."""

    def __init__(self, per_batch: int, batches: int, on_progress: ProgressCallback | None):
        self.per_batch, self.batches, self.on_progress = max(per_batch, 1), batches, on_progress
        self.done = 0
        self.started = time.monotonic()

    def reporter(self, batch: int, offset: int):
        def report(step: int, steps: int, latents=None) -> None:
            self.done += 1
            if not self.on_progress:
                return
            elapsed = time.monotonic() - self.started
            remaining = max(self.per_batch * self.batches - self.done, 0)
            self.on_progress(Progress(step=min(offset + step, self.per_batch), steps=self.per_batch,
                                      batch_index=batch, batch_count=self.batches, elapsed=elapsed,
                                      eta=elapsed / self.done * remaining, preview=runner.preview_of(latents)))

        return report


def run(components, device, request: GenerationRequest, upscale_pixels: PixelUpscale,
        on_progress: ProgressCallback | None = None, control: JobControl | None = None, embeddings=(),
        first_batch: int = 0) -> Iterator[runner.BatchOutput]:
    """`runner.run` for a txt2img request with `enable_hr`: yields one BatchOutput per batch
    with the second pass's images. `embeddings`: textual inversions the prompts may name."""
    control = control or JobControl()
    width = request.width or components.spec.native_resolution
    height = request.height or components.spec.native_resolution
    hr_width, hr_height = request.hires_size(width, height)
    second = second_pass_request(request)

    conditioning = encode_prompts(components, request.prompt, request.negative_prompt, request.clip_skip, device,
                                  steps=request.steps, embeddings=embeddings)
    hr_prompt = request.hr_prompt or request.prompt
    hr_negative = request.hr_negative_prompt or request.negative_prompt
    if (hr_prompt, hr_negative) == (request.prompt, request.negative_prompt):
        hr_conditioning = conditioning
    else:
        hr_conditioning = encode_prompts(components, hr_prompt, hr_negative, request.clip_skip, device,
                                         steps=second.steps, embeddings=embeddings)

    first_steps = len(_timesteps(components, request, device))
    steps = _Steps(first_steps + second_pass_steps(request), request.batch_count, on_progress)
    vae = components.vae
    for batch in range(first_batch, request.batch_count):
        if control.interrupted:
            break
        seeds, subseeds = runner.batch_seeds(request, batch)

        latents = runner.run_batch(components, device, request, conditioning.cond, conditioning.uncond, None,
                                   seeds, subseeds, width, height, steps.reporter(batch, 0), control,
                                   pooled=(conditioning.pooled_cond, conditioning.pooled_uncond), decode=False,
                                   conditioning=conditioning)
        if latents is None:
            control.take_skip()
            continue
        if is_latent(request.hr_upscaler):
            start = upscale_latents(latents, request.hr_upscaler, hr_width, hr_height)
        else:
            base = runner.decode_latents(vae, latents, control)
            try:
                upscaled = [upscale_pixels(image, (hr_width, hr_height)) for image in base]
            except tiling.Cancelled:  # interrupted or skipped between two tiles
                control.take_skip()
                continue
            start = torch.cat([runner.encode_image(vae, image, device) for image in upscaled])
        images = runner.run_batch(components, device, second, hr_conditioning.cond, hr_conditioning.uncond, None,
                                  seeds, subseeds, hr_width, hr_height, steps.reporter(batch, first_steps),
                                  control, pooled=(hr_conditioning.pooled_cond, hr_conditioning.pooled_uncond),
                                  start_latents=start, conditioning=hr_conditioning)
        if images is None:
            control.take_skip()
            continue
        yield runner.BatchOutput(images=images, seeds=seeds, subseeds=subseeds, index=batch)


def _timesteps(components, request: GenerationRequest, device):
    from pipelines.core import samplers

    scheduler = samplers.make_scheduler(request.sampler, request.schedule_type, components.scheduler_config)
    scheduler.set_timesteps(request.steps, device=device)
    return scheduler.timesteps


# --- SD upscale --------------------------------------------------------------------------

def sd_upscale(components, device, request: GenerationRequest, upscaled: Image.Image, overlap: int,
               on_progress: ProgressCallback | None = None, control: JobControl | None = None, embeddings=()
               ) -> Iterator[tuple[Image.Image, int, int]]:
    """img2img over `upscaled` (already upscaled by the engine) tile by tile: tiles of
    request.width x request.height with at least `overlap` pixels shared, blended with
    feathered seams. Yields (image, seed, subseed) for each of the request's images."""
    control = control or JobControl()
    tile_w = request.width or components.spec.native_resolution
    tile_h = request.height or components.spec.native_resolution
    width, height = upscaled.size
    # a canvas at least one tile big, edge-extended, cropped back at the end
    canvas_w, canvas_h = max(width, tile_w), max(height, tile_h)
    source = np.asarray(upscaled.convert("RGB"))
    source = np.pad(source, ((0, canvas_h - height), (0, canvas_w - width), (0, 0)), mode="edge")
    ys = tiling.positions(canvas_h, tile_h, overlap)
    xs = tiling.positions(canvas_w, tile_w, overlap)
    tiles = [(y, x) for y in ys for x in xs]
    conditioning = encode_prompts(components, request.prompt, request.negative_prompt, request.clip_skip, device,
                                  steps=request.steps, embeddings=embeddings)
    total = request.images_total
    steps = _Steps(len(tiles) * max(min(int(request.steps * request.denoising_strength), request.steps), 1),
                   total, on_progress)
    for n in range(total):
        if control.interrupted:
            break
        seed, subseed = request.seed + n, request.subseed + n
        acc = np.zeros((canvas_h, canvas_w, 3), dtype=np.float32)
        weights = np.zeros((canvas_h, canvas_w, 1), dtype=np.float32)
        skipped = False
        for index, (y, x) in enumerate(tiles):
            crop = Image.fromarray(source[y:y + tile_h, x:x + tile_w])
            plan = runner.InpaintPlan(image=crop)
            offset = index * (steps.per_batch // max(len(tiles), 1))
            out = runner.run_batch(components, device, request, conditioning.cond, conditioning.uncond, plan,
                                   [seed], [subseed], tile_w, tile_h, steps.reporter(n, offset), control,
                                   pooled=(conditioning.pooled_cond, conditioning.pooled_uncond),
                                   conditioning=conditioning)
            if out is None:
                skipped = True
                break
            row, col = ys.index(y), xs.index(x)
            wy = tiling.feather(tile_h, ys[row - 1] + tile_h - y if row > 0 else 0,
                                y + tile_h - ys[row + 1] if row + 1 < len(ys) else 0)
            wx = tiling.feather(tile_w, xs[col - 1] + tile_w - x if col > 0 else 0,
                                x + tile_w - xs[col + 1] if col + 1 < len(xs) else 0)
            weight = np.outer(wy, wx)[..., None]
            acc[y:y + tile_h, x:x + tile_w] += np.asarray(out[0], dtype=np.float32) * weight
            weights[y:y + tile_h, x:x + tile_w] += weight
        if skipped:
            control.take_skip()
            continue
        result = np.clip(np.round(acc / weights), 0, 255).astype(np.uint8)[:height, :width]
        yield Image.fromarray(result), seed, subseed
