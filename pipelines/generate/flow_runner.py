"""run(request) -> images for a flow-matching transformer (SD 3 / 3.5), in numbered steps.

The same contract as `runner.run` (yields `runner.BatchOutput` per batch, progress through
a `ProgressClock`, interrupt and skip through `JobControl`, seeds and noise by
`noise.noise_for_seed`), with what differs for rectified flow:
- the sampler is flow-matching Euler (diffusers' FlowMatchEulerDiscreteScheduler) with the
  model's timestep shift (Forge's "Shift", 3.0 for SD 3.x); the noise is the starting latent;
- the transformer takes the pooled text embeddings and a timestep in [0, 1000) per image;
- CFG as SD3Pipeline: [negative, positive] in one batch, uncond + scale * (cond - uncond);
- latents are (z - shift_factor) * scaling_factor of the 16-channel VAE.
img2img starts from the encoded image noised to the first step of the schedule's tail that
denoising strength selects (`scheduler.scale_noise`), as diffusers' SD3 img2img does; inpainting
with a plain (non-inpainting) model also keeps the unmasked area on the image's noisy path
after each step, as diffusers' SD3 inpaint pipeline does, and pastes the result back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipelines.core.progress import JobControl, ProgressCallback, ProgressClock
from pipelines.core.request import GenerationRequest
from pipelines.generate import hires, tiling
from pipelines.generate.noise import noise_for_seed
from pipelines.generate.runner import (
    BatchOutput,
    InpaintPlan,
    StepReporter,
    batch_seeds,
    decode_latents,
    encode_image,
    finish_image,
    img2img_timesteps,
    latent_mask,
    plan_pixels,
    step_reporter,
)
from pipelines.generate.sd3_prompts import WEIGHTS_IGNORED_NOTE, SD3Conditioning, encode_sd3_prompts
from pipelines.models.t5_tokenizer import t5_missing_note

FLOW_SAMPLER = "Euler"  # what A1111/Forge users pick for SD 3 (Forge: Euler with the flow schedule)
SAMPLER_NOTE = "SD 3 samples with flow-matching Euler; the sampler '{name}' does not apply to it"


@dataclass(frozen=True)
class FlowBatch:
    """What `run_batch` samples one batch from, besides the model and the request."""

    conditioning: SD3Conditioning
    seeds: Sequence[int]
    subseeds: Sequence[int]
    width: int
    height: int
    shift: float
    plan: InpaintPlan | None = None
    start_latents: torch.Tensor | None = None  # start an img2img pass from these (hires fix's second pass)
    decode: bool = True  # False: return the final latents (hires fix's first pass)


def flow_scheduler(components, shift: float | None = None):
    """Flow-matching Euler with the model's schedule, `shift` overriding its timestep shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # heavy: diffusers, only when sampling

    config = dict(components.spec.family.scheduler)
    if shift is not None:
        config["shift"] = float(shift)
    return FlowMatchEulerDiscreteScheduler(**config)


def to_model_latents(vae, image_latents: torch.Tensor) -> torch.Tensor:
    """`encode_image`'s z * scale -> SD 3's (z - shift) * scale."""
    return image_latents - vae.config.shift_factor * vae.config.scaling_factor


def to_decoder_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD 3's latents -> what `decode_latents` divides by the scale: z = latents / scale + shift."""
    return latents + vae.config.shift_factor * vae.config.scaling_factor


def denoise(transformer, latents: torch.Tensor, t, conditioning: SD3Conditioning, cfg_scale: float,
            batch: int) -> torch.Tensor:
    """The velocity for one step, with SD 3's CFG when the scale is not 1."""
    use_cfg = cfg_scale != 1.0
    context, pooled = conditioning.cond, conditioning.pooled_cond
    model_in = latents
    if use_cfg:
        context = torch.cat([conditioning.uncond, context])
        pooled = torch.cat([conditioning.pooled_uncond, pooled])
        model_in = torch.cat([latents, latents])
    dtype = transformer.dtype
    prediction = transformer(hidden_states=model_in.to(dtype), timestep=t.expand(model_in.shape[0]),
                             encoder_hidden_states=context.to(dtype).repeat_interleave(batch, dim=0),
                             pooled_projections=pooled.to(dtype).repeat_interleave(batch, dim=0),
                             return_dict=False)[0].float()
    if use_cfg:
        uncond, cond = prediction.chunk(2)
        prediction = uncond + cfg_scale * (cond - uncond)
    return prediction


@torch.no_grad()
def run_batch(components, device, request: GenerationRequest, batch: FlowBatch, control: JobControl,
              report_step: StepReporter) -> list | None:
    """Sample one batch; None when it was skipped or interrupted."""
    transformer, vae = components.unet, components.vae
    latent_shape = (1, transformer.config.in_channels, batch.height // 8, batch.width // 8)

    # 1. noise, one CPU generator per image (DESIGN.md's seeds)
    resize_from = (request.seed_resize_from_w, request.seed_resize_from_h)
    noise = torch.cat([noise_for_seed(s, ss, request.subseed_strength, latent_shape, resize_from)[0]
                       for s, ss in zip(batch.seeds, batch.subseeds)]).to(device)

    # 2. schedule
    scheduler = flow_scheduler(components, batch.shift)
    scheduler.set_timesteps(request.steps, device=device)
    timesteps = scheduler.timesteps

    # 3. starting latents: the noise, or the image noised to where the schedule's tail begins
    latents, image, mask = noise, batch.start_latents, None
    if batch.plan is not None:
        image = to_model_latents(vae, encode_image(vae, batch.plan.image, device)).repeat(len(batch.seeds), 1, 1, 1)
    if image is not None:
        timesteps = img2img_timesteps(scheduler, request.steps, request.denoising_strength)
        latents = scheduler.scale_noise(image, timesteps[:1], noise) if len(timesteps) else image
        if batch.plan is not None and batch.plan.mask is not None:
            mask = latent_mask(batch.plan.mask, batch.width // 8, batch.height // 8, device)

    # 4. denoise
    for i, t in enumerate(timesteps):
        if control.stop_current:
            return None
        velocity = denoise(transformer, latents, t, batch.conditioning, request.cfg_scale, len(batch.seeds))
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if mask is not None:  # inpainting: the unmasked area follows the image's own noisy path
            known = scheduler.scale_noise(image, timesteps[i + 1:i + 2], noise) if i + 1 < len(timesteps) else image
            latents = known * (1 - mask) + latents * mask
        report_step(i + 1, len(timesteps), latents=latents)
    if control.stop_current:
        return None

    # 5. decode
    if not batch.decode:
        return latents
    images = decode_latents(vae, to_decoder_latents(vae, latents), control)
    return [finish_image(image, batch.plan) for image in images]


def infotext_params(components, shift: float | None = None) -> dict[str, float | str]:
    """The SD 3 fields of a job's infotext, as Forge writes them: "Shift" (the flow schedule's
    timestep shift, which Forge's API takes as `distilled_cfg_scale`) and, when it ran without
    T5, "T5: none" (ours: Forge lists the encoder files it used as "Module N" instead)."""
    params: dict[str, float | str] = {"Shift": float(components.spec.family.flow_shift if shift is None else shift)}
    if len(components.text_encoders) < 3:
        params["T5"] = "none"
    return params


def job_notes(components, request: GenerationRequest, conditioning: SD3Conditioning) -> list[str]:
    """What the user should know about how an SD 3 job ran (T5 absent, syntax or options not applied)."""
    notes = []
    if not conditioning.t5:
        notes.append(t5_missing_note())
    if conditioning.weights_ignored:
        notes.append(WEIGHTS_IGNORED_NOTE)
    if request.sampler and request.sampler.split(" ")[0] != FLOW_SAMPLER:
        notes.append(SAMPLER_NOTE.format(name=request.sampler))
    return notes


def run(components, device, request: GenerationRequest, on_progress: ProgressCallback | None = None,
        control: JobControl | None = None, first_batch: int = 0, *, shift: float | None = None):
    """Generate every batch of a request on an SD 3.x model; yields `runner.BatchOutput` per batch.

    `shift`: the flow schedule's timestep shift (Forge's "Shift"); the model's (3.0) when None."""
    control = control or JobControl()
    width, height = request.size_for(components.spec.native_resolution)
    # 1. conditioning, shared by every batch
    conditioning = encode_sd3_prompts(components, request.prompt, request.negative_prompt, device,
                                      request.clip_skip)
    for note in job_notes(components, request, conditioning):
        control.note(note)
    # 2. pixel-side inputs
    plan = plan_pixels(request, width, height)
    shift = components.spec.family.flow_shift if shift is None else shift

    clock = ProgressClock(request.steps, request.batch_count, on_progress, first_batch=first_batch)
    for index in range(first_batch, request.batch_count):
        if control.interrupted:
            break
        seeds, subseeds = batch_seeds(request, index)
        inputs = FlowBatch(conditioning, seeds, subseeds, width, height, shift, plan)
        result = run_batch(components, device, request, inputs, control, step_reporter(clock, index))
        if result is None:
            control.take_skip()
            continue
        yield BatchOutput(images=result, seeds=seeds, subseeds=subseeds, index=index)


def run_hires(components, device, request: GenerationRequest, upscale_pixels: hires.PixelUpscale,
              on_progress: ProgressCallback | None = None, control: JobControl | None = None, first_batch: int = 0,
              *, shift: float | None = None):
    """`run` for a txt2img request with `enable_hr` (hires.run's passes and options on a flow
    model): the first pass's latents are upscaled (a latent mode) or decoded, upscaled and
    encoded again, then a second img2img pass runs at the hires size with the same seeds."""
    control = control or JobControl()
    width, height = request.size_for(components.spec.native_resolution)
    hr_width, hr_height = request.hires_size(width, height)
    second = hires.second_pass_request(request)
    conditioning = encode_sd3_prompts(components, request.prompt, request.negative_prompt, device,
                                      request.clip_skip)
    hr_prompts = (request.hr_prompt or request.prompt, request.hr_negative_prompt or request.negative_prompt)
    hr_conditioning = conditioning if hr_prompts == (request.prompt, request.negative_prompt) else \
        encode_sd3_prompts(components, *hr_prompts, device, request.clip_skip)
    for note in job_notes(components, request, conditioning):
        control.note(note)
    shift = components.spec.family.flow_shift if shift is None else shift
    vae = components.vae

    clock = ProgressClock(request.steps + hires.second_pass_steps(request), request.batch_count, on_progress,
                          first_batch=first_batch)
    for index in range(first_batch, request.batch_count):
        if control.interrupted:
            break
        seeds, subseeds = batch_seeds(request, index)
        first_pass = FlowBatch(conditioning, seeds, subseeds, width, height, shift, decode=False)
        latents = run_batch(components, device, request, first_pass, control, step_reporter(clock, index, offset=0))
        start = None if latents is None else _upscaled(vae, latents, request, (hr_width, hr_height),
                                                        upscale_pixels, control, device)
        if start is None:
            control.take_skip()
            continue
        second_pass = FlowBatch(hr_conditioning, seeds, subseeds, hr_width, hr_height, shift, start_latents=start)
        result = run_batch(components, device, second, second_pass, control,
                           step_reporter(clock, index, offset=request.steps))
        if result is None:
            control.take_skip()
            continue
        yield BatchOutput(images=result, seeds=seeds, subseeds=subseeds, index=index)


def _upscaled(vae, latents, request: GenerationRequest, size: tuple[int, int], upscale_pixels, control, device):
    """The second pass's starting latents at `size`; None when interrupted between upscaler tiles."""
    if hires.is_latent(request.hr_upscaler):
        return hires.upscale_latents(latents, request.hr_upscaler, *size)
    try:
        upscaled = [upscale_pixels(image, size)
                    for image in decode_latents(vae, to_decoder_latents(vae, latents), control)]
    except tiling.Cancelled:
        return None
    return torch.cat([to_model_latents(vae, encode_image(vae, image, device)) for image in upscaled])
