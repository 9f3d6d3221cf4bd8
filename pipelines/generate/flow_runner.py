"""run(request) -> images for a flow-matching transformer (SD 3 / 3.5, Flux.1), in numbered steps.

The same contract as `runner.run` (yields `runner.BatchOutput` per batch, progress through
a `ProgressClock`, interrupt and skip through `JobControl`, seeds and noise by
`noise.noise_for_seed`), with what differs for rectified flow:
- the sampler is flow-matching Euler (diffusers' FlowMatchEulerDiscreteScheduler) with the
  model's timestep shift (Forge's "Shift", 3.0 for SD 3.x); the noise is the starting latent;
- the transformer takes the pooled text embeddings and a timestep in [0, 1000) per image;
- CFG as SD3Pipeline: [negative, positive] in one batch, uncond + scale * (cond - uncond);
- latents are (z - shift_factor) * scaling_factor of the 16-channel VAE.
Flux differs in the model call and the schedule (as FluxPipeline): the latents go in as 2x2
patches packed into tokens with their (0, row, column) position ids; dev takes the distilled
guidance (Forge's "Distilled CFG Scale") as an input; real CFG runs only at a CFG scale above 1;
the schedule is sigmas linspace(1, 1/steps) shifted by the image's token count (dev) or not
(schnell), or by a fixed `shift` when one is asked for. The loop keeps the latents unpacked,
so img2img, inpainting and hires fix are the same code for both.
img2img starts from the encoded image noised to the first step of the schedule's tail that
denoising strength selects (`scheduler.scale_noise`), as diffusers' SD3 img2img does; inpainting
with a plain (non-inpainting) model also keeps the unmasked area on the image's noisy path
after each step, as diffusers' SD3 inpaint pipeline does, and pastes the result back. Flux.1
Fill sees the masked image and the mask beside the latents instead (`flux_fill`); Flux.1 Kontext
sees the input image's tokens after the latents' (`flux_kontext`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.core.progress import JobControl, ProgressCallback, ProgressClock
from pipelines.core.request import GenerationRequest, RequestError
from pipelines.generate import flux_fill, flux_kontext, flux_prompts, hires, tiling
from pipelines.generate.noise import noise_for_seed
from pipelines.generate.prompts import positive_text
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
from pipelines.generate.sd3_prompts import WEIGHTS_IGNORED_NOTE, FlowConditioning, encode_sd3_prompts
from pipelines.models.families import FLUX, SD3
from pipelines.models.flux_files import default_guidance, flux_schedule, flux_variant
from pipelines.models.t5_tokenizer import t5_missing_note

FLOW_FAMILIES = (SD3.name, FLUX.name)
FLOW_SAMPLER = "Euler"  # what A1111/Forge users pick for SD 3 and Flux (Forge: Euler with the flow schedule)
SAMPLER_NOTE = "{family} samples with flow-matching Euler; the sampler '{name}' does not apply to it"
REAL_CFG_NOTE = ("Flux.1 is guidance-distilled: CFG scale {scale} ran real CFG (a second, negative-prompt pass "
                 "each step, twice the time); CFG scale 1 with Distilled CFG Scale is how Flux is meant to run")
GUIDANCE_NOTE = "Distilled CFG Scale does not apply to {model} (it has no guidance input)"


@dataclass(frozen=True)
class FlowBatch:
    """What `run_batch` samples one batch from, besides the model and the request."""

    conditioning: FlowConditioning
    seeds: Sequence[int]
    subseeds: Sequence[int]
    width: int
    height: int
    shift: float | None  # None: the model's schedule (Flux dev: shifted by the image's size)
    plan: InpaintPlan | None = None
    start_latents: torch.Tensor | None = None  # start an img2img pass from these (hires fix's second pass)
    decode: bool = True  # False: return the final latents (hires fix's first pass)
    guidance: float | None = None  # Flux dev's distilled guidance
    reference: Image.Image | None = None  # Flux Kontext's reference picture (`flux_kontext`)


def is_flow(components) -> bool:
    """A flow-matching transformer (SD 3.x, Flux): this module's loop, not `runner`'s."""
    return components.spec.family.name in FLOW_FAMILIES


def is_flux(components) -> bool:
    return components.spec.family.name == FLUX.name


def flow_scheduler(components, shift: float | None = None):
    """Flow-matching Euler with the model's schedule, `shift` overriding its timestep shift (a
    fixed one: it replaces Flux dev's resolution-dependent shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # heavy: diffusers, only when sampling

    config = flux_schedule(components.unet.config) if is_flux(components) else dict(components.spec.family.scheduler)
    if shift is not None:
        config.update(shift=float(shift), use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(**config)


def image_tokens(width: int, height: int) -> int:
    """Flux's image sequence length: one token per 2x2 latent patch (odd sides padded)."""
    return -(-height // 16) * -(-width // 16)


def dynamic_shift(config, tokens: int) -> float:
    """Flux dev's mu: linear in the token count, base_shift at base_image_seq_len, max_shift at max."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return config.base_shift + slope * (tokens - config.base_image_seq_len)


def set_schedule(scheduler, components, steps: int, width: int, height: int, device) -> None:
    """SD 3: the scheduler's own spacing; Flux: sigmas linspace(1, 1/steps) and its shift."""
    if not is_flux(components):
        scheduler.set_timesteps(steps, device=device)
        return
    config = scheduler.config
    mu = dynamic_shift(config, image_tokens(width, height)) if config.use_dynamic_shifting else None
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)


def to_model_latents(vae, image_latents: torch.Tensor) -> torch.Tensor:
    """`encode_image`'s z * scale -> SD 3's (z - shift) * scale."""
    return image_latents - vae.config.shift_factor * vae.config.scaling_factor


def to_decoder_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD 3's latents -> what `decode_latents` divides by the scale: z = latents / scale + shift."""
    return latents + vae.config.shift_factor * vae.config.scaling_factor


def denoise(transformer, latents: torch.Tensor, t, conditioning: FlowConditioning, cfg_scale: float,
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


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): FluxPipeline's 2x2 patches as tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`pack`'s inverse, for latents of `height` x `width` (even)."""
    b, _, channels = tokens.shape
    latents = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def image_ids(rows: int, columns: int, device, image: int = 0) -> torch.Tensor:
    """Each token's rotary position (image, row, column), as FluxPipeline gives them: image 0 is
    the latents, 1 Kontext's reference."""
    ids = torch.full((rows, columns, 3), float(image))
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device)


def denoise_flux(transformer, latents: torch.Tensor, t, conditioning: FlowConditioning, cfg_scale: float,
                 batch: int, guidance: float, extra: torch.Tensor | None = None, *,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
    """The velocity for one step of a Flux transformer: one pass, or [negative, positive] under
    real CFG. Odd latent sides are padded (circular, as ComfyUI and Forge pad) and cropped back.
    `extra`: unpacked inputs beside the latents (Fill's masked image and mask); `reference`:
    Kontext's reference latents (1, C, h, w), their tokens after the latents' as image 1."""
    height, width = latents.shape[-2:]
    model_in = latents if extra is None else torch.cat([latents, extra], dim=1)
    padded = F.pad(model_in, (0, width % 2, 0, height % 2), mode="circular") if (height | width) % 2 else model_in
    use_cfg = cfg_scale > 1.0 and conditioning.uncond is not None
    context, pooled = conditioning.cond, conditioning.pooled_cond
    if use_cfg:
        context = torch.cat([conditioning.uncond, context])
        pooled = torch.cat([conditioning.pooled_uncond, pooled])
        padded = torch.cat([padded, padded])
    rows = padded.shape[0]
    dtype, device = transformer.dtype, latents.device
    distilled = None
    if transformer.config.guidance_embeds:
        distilled = torch.full((rows,), float(guidance), device=device, dtype=torch.float32)
    hidden, ids = pack(padded), image_ids(padded.shape[-2] // 2, padded.shape[-1] // 2, device)
    latent_tokens = hidden.shape[1]
    if reference is not None:
        hidden = torch.cat([hidden, pack(reference).expand(rows, -1, -1)], dim=1)
        ids = torch.cat([ids, image_ids(reference.shape[-2] // 2, reference.shape[-1] // 2, device, image=1)])
    tokens = transformer(hidden_states=hidden.to(dtype), timestep=(t.expand(rows) / 1000).to(dtype),
                         guidance=distilled, pooled_projections=pooled.to(dtype).repeat_interleave(batch, dim=0),
                         encoder_hidden_states=context.to(dtype).repeat_interleave(batch, dim=0),
                         txt_ids=torch.zeros(context.shape[1], 3, device=device), img_ids=ids,
                         return_dict=False)[0].float()
    # the velocity of the latents only (not of Kontext's reference, nor of the padding)
    prediction = unpack(tokens[:, :latent_tokens], *padded.shape[-2:])[..., :height, :width]
    if use_cfg:
        uncond, cond = prediction.chunk(2)
        prediction = uncond + cfg_scale * (cond - uncond)
    return prediction


def distilled_guidance(components, asked: float | None) -> float:
    """The distilled guidance a Flux job runs at: the one asked for, else the model's own (read
    from the spec: a diffusers folder's module config does not carry Kontext's mark)."""
    return float(default_guidance(components.spec.unet_config) if asked is None else asked)


def velocity(components, latents: torch.Tensor, t, request: GenerationRequest, batch: FlowBatch,
             extra: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> torch.Tensor:
    """The family's model call for one step (`extra`: Flux Fill's inputs; `reference`: Kontext's)."""
    if is_flux(components):
        return denoise_flux(components.unet, latents, t, batch.conditioning, request.cfg_scale, len(batch.seeds),
                            distilled_guidance(components, batch.guidance), extra, reference=reference)
    return denoise(components.unet, latents, t, batch.conditioning, request.cfg_scale, len(batch.seeds))


@torch.no_grad()
def run_batch(components, device, request: GenerationRequest, batch: FlowBatch, control: JobControl,
              report_step: StepReporter) -> list | None:
    """Sample one batch; None when it was skipped or interrupted."""
    vae = components.vae
    latent_shape = (1, vae.config.latent_channels, batch.height // 8, batch.width // 8)

    # 1. noise, one CPU generator per image (DESIGN.md's seeds)
    resize_from = (request.seed_resize_from_w, request.seed_resize_from_h)
    noise = torch.cat([noise_for_seed(s, ss, request.subseed_strength, latent_shape, resize_from)[0]
                       for s, ss in zip(batch.seeds, batch.subseeds)]).to(device)

    # 2. schedule
    scheduler = flow_scheduler(components, batch.shift)
    set_schedule(scheduler, components, request.steps, batch.width, batch.height, device)
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
    # Fill repaints the masked area from its own inputs: nothing is blended in after each step
    fill = flux_fill.batch_fill_inputs(components, batch.plan, batch.width, batch.height, len(batch.seeds), device)
    if fill is not None:
        mask = None
    reference = None if batch.reference is None else to_model_latents(vae, encode_image(vae, batch.reference, device))

    # 4. denoise
    for i, t in enumerate(timesteps):
        if control.stop_current:
            return None
        prediction = velocity(components, latents, t, request, batch, fill, reference)
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
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


def infotext_params(components, shift: float | None = None, guidance: float | None = None) -> dict[str, float | str]:
    """The flow fields of a job's infotext, as Forge writes them: SD 3's "Shift" (the flow
    schedule's timestep shift) and, when it ran without T5, "T5: none" (ours: Forge lists the
    encoder files it used as "Module N" instead); Flux dev's "Distilled CFG Scale", and its
    "Shift" only when one replaced the resolution-dependent shift."""
    family = components.spec.family
    params: dict[str, float | str] = {}
    if is_flux(components):
        if components.unet.config.guidance_embeds:
            params["Distilled CFG Scale"] = distilled_guidance(components, guidance)
        if shift is not None:
            params["Shift"] = float(shift)
        return params
    params["Shift"] = float(family.flow_shift if shift is None else shift)
    if len(components.text_encoders) < 3:
        params["T5"] = "none"
    return params


def job_notes(components, request: GenerationRequest, conditioning: FlowConditioning,
              guidance: float | None = None) -> list[str]:
    """What the user should know about how a flow job ran (T5 absent, syntax or options not applied)."""
    notes = []
    flux = is_flux(components)
    if not conditioning.t5:
        notes.append(t5_missing_note())
    if conditioning.weights_ignored:
        notes.append(flux_prompts.WEIGHTS_IGNORED_NOTE if flux else WEIGHTS_IGNORED_NOTE)
    if request.sampler and request.sampler.split(" ")[0] != FLOW_SAMPLER:
        notes.append(SAMPLER_NOTE.format(family=components.spec.family.label, name=request.sampler))
    if flux and request.cfg_scale > 1.0:
        notes.append(REAL_CFG_NOTE.format(scale=request.cfg_scale))
    if guidance is not None and not (flux and components.unet.config.guidance_embeds):
        model = flux_variant(components.unet.config) if flux else components.spec.family.label
        notes.append(GUIDANCE_NOTE.format(model=model))
    return notes + ([*flux_fill.fill_notes(components, request), *flux_kontext.kontext_notes(components, request)]
                    if flux else [])


def encode_prompts(components, prompt: str, negative_prompt: str, device, request: GenerationRequest):
    """The family's text conditioning of one prompt pair (the prompt without its <lora:...> tags:
    they act on the model, they are not words)."""
    prompt = positive_text(prompt)
    if is_flux(components):
        return flux_prompts.encode_flux_prompts(components, prompt, negative_prompt, device, request.cfg_scale > 1.0)
    return encode_sd3_prompts(components, prompt, negative_prompt, device, request.clip_skip)


def run(components, device, request: GenerationRequest, on_progress: ProgressCallback | None = None,
        control: JobControl | None = None, first_batch: int = 0, *, shift: float | None = None,
        guidance: float | None = None):
    """Generate every batch of a request on a flow model; yields `runner.BatchOutput` per batch.

    `shift`: the flow schedule's timestep shift (Forge's "Shift"); the model's when None.
    `guidance`: Flux dev's distilled guidance (Forge's "Distilled CFG Scale"); 3.5 when None."""
    control = control or JobControl()
    width, height = request.size_for(components.spec.native_resolution)
    # 1. conditioning, shared by every batch
    conditioning = encode_prompts(components, request.prompt, request.negative_prompt, device, request)
    for note in job_notes(components, request, conditioning, guidance):
        control.note(note)
    # 2. pixel-side inputs
    plan = plan_pixels(request, width, height)
    reference = flux_kontext.reference_picture(components, request, plan)

    clock = ProgressClock(request.steps, request.batch_count, on_progress, first_batch=first_batch)
    for index in range(first_batch, request.batch_count):
        if control.interrupted:
            break
        seeds, subseeds = batch_seeds(request, index)
        inputs = FlowBatch(conditioning, seeds, subseeds, width, height, shift, plan, guidance=guidance,
                           reference=reference)
        result = run_batch(components, device, request, inputs, control, step_reporter(clock, index))
        if result is None:
            control.take_skip()
            continue
        yield BatchOutput(images=result, seeds=seeds, subseeds=subseeds, index=index)


def run_hires(components, device, request: GenerationRequest, upscale_pixels: hires.PixelUpscale,
              on_progress: ProgressCallback | None = None, control: JobControl | None = None, first_batch: int = 0,
              *, shift: float | None = None, guidance: float | None = None):
    """`run` for a txt2img request with `enable_hr` (hires.run's passes and options on a flow
    model): the first pass's latents are upscaled (a latent mode) or decoded, upscaled and
    encoded again, then a second img2img pass runs at the hires size with the same seeds."""
    control = control or JobControl()
    width, height = request.size_for(components.spec.native_resolution)
    hr_width, hr_height = request.hires_size(width, height)
    second = hires.second_pass_request(request)
    conditioning = encode_prompts(components, request.prompt, request.negative_prompt, device, request)
    hr_prompts = (request.hr_prompt or request.prompt, request.hr_negative_prompt or request.negative_prompt)
    hr_conditioning = conditioning if hr_prompts == (request.prompt, request.negative_prompt) else \
        encode_prompts(components, *hr_prompts, device, second)
    for note in job_notes(components, request, conditioning, guidance):
        control.note(note)
    vae = components.vae

    clock = ProgressClock(request.steps + hires.second_pass_steps(request), request.batch_count, on_progress,
                          first_batch=first_batch)
    for index in range(first_batch, request.batch_count):
        if control.interrupted:
            break
        seeds, subseeds = batch_seeds(request, index)
        first_pass = FlowBatch(conditioning, seeds, subseeds, width, height, shift, decode=False, guidance=guidance)
        latents = run_batch(components, device, request, first_pass, control, step_reporter(clock, index, offset=0))
        start = None if latents is None else _upscaled(vae, latents, request, (hr_width, hr_height),
                                                        upscale_pixels, control, device)
        if start is None:
            control.take_skip()
            continue
        second_pass = FlowBatch(hr_conditioning, seeds, subseeds, hr_width, hr_height, shift, start_latents=start,
                                guidance=guidance)
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


def check_request(request: GenerationRequest, others: dict) -> None:
    """What the flow loop does not do yet is refused by name, never dropped without a word.
    `others`: the job's other checkpoints by request field (refiner, hires checkpoint)."""
    if others:
        raise RequestError(next(iter(others)), "SD 3 and Flux checkpoints run without a refiner or a second "
                                               "hires checkpoint on this server yet")
    if any(unit.active for unit in request.control_units):
        raise RequestError("control_units", "ControlNet and IP-Adapter units are not available for SD 3 and Flux yet")
