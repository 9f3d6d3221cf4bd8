"""Hires fix (txt2img at base size, upscale, second img2img pass) and SD upscale (upscale,
then img2img tile by tile with overlap).

Both drive `runner.run_batch`, so the second pass shares the sampler loop, CFG, SDXL
conditioning and seeds with plain generation: image i of the second pass draws its noise
from seed + i again, at the hires latent size.

Upscaling is either a latent mode (A1111's names, `core.request.LATENT_UPSCALE_MODES`: the
first pass's latents are interpolated) or a pixel upscaler the engine hands in as
`upscale_pixels(image, (width, height)) -> image` (PIL or a neural model, tiled).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.core.progress import JobControl, ProgressCallback, ProgressClock
from pipelines.core.regions import layout_of
from pipelines.core.request import LATENT_UPSCALE_MODES, GenerationRequest, img2img_steps
from pipelines.generate import regions, runner, schedulers, seamless, tiling
from pipelines.generate.ip_adapter import ImagePromptSteps
from pipelines.generate.prompts import encode_prompts

PixelUpscale = Callable[[Image.Image, tuple[int, int]], Image.Image]


def is_latent(upscaler: str) -> bool:
    return upscaler in LATENT_UPSCALE_MODES


def second_pass_request(request: GenerationRequest) -> GenerationRequest:
    """The request the second pass samples with (its steps, strength, sampler, schedule)."""
    sampler = request.hr_sampler or request.sampler
    schedule = request.hr_schedule_type or (request.schedule_type if sampler == request.sampler else "Automatic")
    return request.replace(enable_hr=False, steps=request.hr_second_pass_steps or request.steps,
                           denoising_strength=request.hr_denoising_strength, sampler=sampler,
                           schedule_type=schedule)


def second_pass_steps(request: GenerationRequest) -> int:
    """Sampler steps the second pass actually runs (img2img runs the tail of the schedule)."""
    return img2img_steps(request.hr_second_pass_steps or request.steps, request.hr_denoising_strength)


def upscale_latents(latents: torch.Tensor, mode: str, width: int, height: int) -> torch.Tensor:
    interpolation, antialias = LATENT_UPSCALE_MODES[mode]
    size = (height // 8, width // 8)
    if interpolation in ("bilinear", "bicubic"):
        return F.interpolate(latents, size=size, mode=interpolation, antialias=antialias, align_corners=False)
    return F.interpolate(latents, size=size, mode=interpolation)


def run(components, device, request: GenerationRequest, upscale_pixels: PixelUpscale,
        on_progress: ProgressCallback | None = None, control: JobControl | None = None, embeddings=(),
        first_batch: int = 0, *, hr_model: runner.SecondModel | None = None,
        refiner: runner.SecondModel | None = None, controls=(),
        image_prompts: ImagePromptSteps | None = None) -> Iterator[runner.BatchOutput]:
    """`runner.run` for a txt2img request with `enable_hr`: yields one BatchOutput per batch
    with the second pass's images. `embeddings`: textual inversions the prompts may name.
    `hr_model`: the checkpoint of the second pass (hr_checkpoint_name; None: the first pass's).
    `refiner`: switched to within the second pass (A1111's default "Hires fix: refiner for the
    second pass"), after its share of that pass's steps. `controls` (runner.run's) act on both passes,
    on the second one at its size, unless `hr_model` is of another family (their layers would not fit)."""
    control = control or JobControl()
    width, height = request.size_for(components.spec.native_resolution)
    hr_width, hr_height = request.hires_size(width, height)
    second = second_pass_request(request)

    conditioning = regions.encode_conditioning(components, layout_of(request), request.prompt,
                                               request.negative_prompt, request.clip_skip, device,
                                               steps=request.steps, embeddings=embeddings)
    hr_prompt = request.hr_prompt or request.prompt
    hr_negative = request.hr_negative_prompt or request.negative_prompt
    hr_layout = layout_of(request, hr_prompt)  # regional prompts: the second pass keeps the layout
    hr = hr_model or runner.SecondModel(components, embeddings)
    if hr_model is None and (hr_prompt, hr_negative) == (request.prompt, request.negative_prompt):
        hr_conditioning = conditioning
    else:  # its own prompts, or the same ones through the second checkpoint's text encoders
        hr_conditioning = regions.encode_conditioning(hr.components, hr_layout, hr_prompt, hr_negative,
                                                      request.clip_skip, device, steps=second.steps,
                                                      embeddings=hr.embeddings)
    refiner_prompt = hr_layout.base_prompt if hr_layout is not None else hr_prompt
    stage = runner.refiner_stage(refiner, refiner_prompt, hr_negative, request.clip_skip, device, second.steps)
    same_family = hr.components.spec.family.name == components.spec.family.name
    hr_controls = controls if same_family else ()
    hr_image_prompts = image_prompts if hr_model is None else None  # the adapters sit in the first pass's U-Net

    first_steps = len(_timesteps(components, request, device))
    # progress over the whole job: every denoising step of both passes counts
    clock = ProgressClock(first_steps + second_pass_steps(request), request.batch_count, on_progress,
                          first_batch=first_batch)
    vae = components.vae
    for batch in range(first_batch, request.batch_count):
        if control.interrupted:
            break
        seeds, subseeds = runner.batch_seeds(request, batch)

        first_pass = runner.BatchInputs(conditioning, seeds, subseeds, width, height, decode=False, controls=controls,
                                       image_prompts=image_prompts)
        with regions.applied(components.unet, conditioning, len(seeds)):
            latents = runner.run_batch(components, device, request, first_pass, control,
                                       runner.step_reporter(clock, batch, offset=0))
        if latents is None:
            control.take_skip()
            continue
        if is_latent(request.hr_upscaler):
            upscale = seamless.upscale_latents if request.tiling else upscale_latents  # tiling: wrap the edges
            start = upscale(latents, request.hr_upscaler, hr_width, hr_height)
        else:
            base = runner.decode_latents(vae, latents, control)
            try:
                upscaled = [upscale_pixels(image, (hr_width, hr_height)) for image in base]
            except tiling.Cancelled:  # interrupted or skipped between two tiles
                control.take_skip()
                continue
            start = torch.cat([runner.encode_image(hr.components.vae, image, device) for image in upscaled])
        second_pass = runner.BatchInputs(hr_conditioning, seeds, subseeds, hr_width, hr_height, start_latents=start,
                                         refiner=stage, controls=hr_controls, image_prompts=hr_image_prompts)
        with regions.applied(hr.components.unet, hr_conditioning, len(seeds)):
            images = runner.run_batch(hr.components, device, second, second_pass, control,
                                      runner.step_reporter(clock, batch, offset=first_steps))
        if images is None:
            control.take_skip()
            continue
        yield runner.BatchOutput(images=images, seeds=seeds, subseeds=subseeds, index=batch)


def _timesteps(components, request: GenerationRequest, device):
    scheduler = schedulers.make_scheduler(request.sampler, request.schedule_type, components.scheduler_config)
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
    tile_w, tile_h = request.size_for(components.spec.native_resolution)
    width, height = upscaled.size
    # a canvas at least one tile big, edge-extended, cropped back at the end
    canvas_w, canvas_h = max(width, tile_w), max(height, tile_h)
    source = np.asarray(upscaled.convert("RGB"))
    if request.tiling:  # seamless: tiles wrap around the edges, and the seam across them is blended too
        margin = max(overlap, 8)
        canvas_w, canvas_h = max(width + margin, tile_w), max(height + margin, tile_h)
        source = seamless.wrapped_canvas(source, canvas_w, canvas_h)
    else:
        source = np.pad(source, ((0, canvas_h - height), (0, canvas_w - width), (0, 0)), mode="edge")
    wrap_x, wrap_y = (canvas_w - width, canvas_h - height) if request.tiling else (0, 0)
    ys = tiling.positions(canvas_h, tile_h, overlap)
    xs = tiling.positions(canvas_w, tile_w, overlap)
    tiles = [(y, x) for y in ys for x in xs]
    layout = layout_of(request)  # tiles are crops: a layout's regions do not fit them, its base prompt does
    prompt = layout.base_prompt if layout is not None else request.prompt
    conditioning = encode_prompts(components, prompt, request.negative_prompt, request.clip_skip, device,
                                  steps=request.steps, embeddings=embeddings)
    total = request.images_total
    tile_steps = max(img2img_steps(request.steps, request.denoising_strength), 1)
    clock = ProgressClock(len(tiles) * tile_steps, total, on_progress)
    for n in range(total):
        if control.interrupted:
            break
        seed, subseed = runner.image_seeds(request, n)
        acc = np.zeros((canvas_h, canvas_w, 3), dtype=np.float32)
        weights = np.zeros((canvas_h, canvas_w, 1), dtype=np.float32)
        skipped = False
        for index, (y, x) in enumerate(tiles):
            crop = Image.fromarray(source[y:y + tile_h, x:x + tile_w])
            inputs = runner.BatchInputs(conditioning, [seed], [subseed], tile_w, tile_h,
                                        plan=runner.InpaintPlan(image=crop))
            out = runner.run_batch(components, device, request, inputs, control,
                                   runner.step_reporter(clock, n, offset=index * tile_steps))
            if out is None:
                skipped = True
                break
            row, col = ys.index(y), xs.index(x)
            wy = tiling.feather(tile_h, ys[row - 1] + tile_h - y if row > 0 else wrap_y,
                                y + tile_h - ys[row + 1] if row + 1 < len(ys) else wrap_y)
            wx = tiling.feather(tile_w, xs[col - 1] + tile_w - x if col > 0 else wrap_x,
                                x + tile_w - xs[col + 1] if col + 1 < len(xs) else wrap_x)
            weight = np.outer(wy, wx)[..., None]
            acc[y:y + tile_h, x:x + tile_w] += np.asarray(out[0], dtype=np.float32) * weight
            weights[y:y + tile_h, x:x + tile_w] += weight
        if skipped:
            control.take_skip()
            continue
        if request.tiling:  # what lies past the right and bottom edges belongs at the left and top
            acc, weights = seamless.fold(acc, width, height), seamless.fold(weights, width, height)
        result = np.clip(np.round(acc / weights), 0, 255).astype(np.uint8)[:height, :width]
        yield Image.fromarray(result), seed, subseed
