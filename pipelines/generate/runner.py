"""run(request) -> images: the denoising pipeline, in numbered steps.

One function per stage; `run` reads top to bottom. Seeds follow DESIGN.md: image i of
a batch uses seed + i, its initial noise is drawn from a CPU generator seeded with it in
float32, and that same generator then feeds the sampler's per-step noise, so a batch
image equals the single run with its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from pipelines.core.progress import JobControl, ProgressCallback, ProgressClock
from pipelines.core.regions import layout_of
from pipelines.core.request import GenerationRequest, img2img_steps
from pipelines.generate import deep_cache, regions, schedulers, token_merging
from pipelines.generate import guidance as guidance_rules
from pipelines.generate.control import ControlSteps, LoadedControl
from pipelines.generate.inpaint import (  # noqa: F401 - re-exported: hires and the flow runner take them here
    InpaintPlan,
    finish_image,
    free_pixels,
    inpaint_conditioning,
    latent_mask,
    plan_pixels,
)
from pipelines.generate.ip_adapter import ImagePromptSteps
from pipelines.generate.noise import noise_for_seed
from pipelines.generate.pixels import VAE_NAN_NOTE, decode_latents, encode_image  # noqa: F401 - re-exported
from pipelines.generate.previews import preview_of
from pipelines.generate.prompts import PromptConditioning, encode_prompts
from pipelines.models.families import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE


@dataclass
class BatchOutput:
    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    index: int = 0  # which batch of the request


@dataclass(frozen=True)
class SecondModel:
    """Another checkpoint a job runs on besides its own: the refiner (the steps after `switch_at`,
    a share of the sampling steps) or hires fix's second pass. `embeddings`: textual inversions
    bound to its own text encoders."""

    components: Any
    embeddings: Any = ()
    switch_at: float = 1.0


@dataclass(frozen=True)
class RefinerStage:
    """The refiner of one pass: its model, the prompts encoded with its own text encoders (SDXL
    refiner: bigG only, aesthetic-score ids), and the share of the steps after which it takes over."""

    components: Any
    conditioning: PromptConditioning
    switch_at: float

    def switch_step(self, steps: int) -> int:
        """The first of `steps` run on the refiner: A1111's switch by sampling steps, the first
        step i with i / steps >= switch_at (`steps` itself, i.e. none, for 1.0)."""
        return min(steps, math.ceil(round(self.switch_at * steps, 6)))


def refiner_stage(refiner: SecondModel | None, prompt: str, negative_prompt: str, clip_skip: int, device,
                  steps: int) -> RefinerStage | None:
    """`refiner` ready for a pass of `steps` steps with these prompts; None without a refiner."""
    if refiner is None:
        return None
    conditioning = encode_prompts(refiner.components, prompt, negative_prompt, clip_skip, device, steps=steps,
                                  embeddings=refiner.embeddings)
    return RefinerStage(refiner.components, conditioning, refiner.switch_at)


@dataclass(frozen=True)
class BatchInputs:
    """What `run_batch` samples one batch from, besides the model and the request.

    `conditioning` gives each step's text conditioning: prompt editing and alternation
    ([a:b:0.5], [a|b]) switch the text at the steps A1111 does, over `request.steps`.
    `start_latents` (one per seed) start an img2img pass from latents instead of from
    `plan.image` (hires fix's second pass); with `decode=False` the final latents are
    returned instead of images (hires fix's first pass). `refiner`: the steps after its switch run on
    its U-Net with its conditioning, from the same latents and scheduler state; it decodes.
    `controls`: ControlNet / T2I-Adapter units acting on the steps before any refiner switch."""

    conditioning: PromptConditioning
    seeds: Sequence[int]
    subseeds: Sequence[int]
    width: int
    height: int
    plan: InpaintPlan | None = None
    start_latents: torch.Tensor | None = None
    decode: bool = True
    refiner: RefinerStage | None = None
    controls: Sequence[LoadedControl] = ()
    image_prompts: ImagePromptSteps | None = None  # IP-Adapters inside the base U-Net (ip_adapter.applied)


# report_step(step, steps, latents=None): run_batch calls it after each step (1-based)
StepReporter = Callable[..., None]


def img2img_timesteps(scheduler, steps: int, strength: float):
    """The tail of the schedule that denoising strength selects (diffusers' convention)."""
    start = (steps - img2img_steps(steps, strength)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def added_conditioning(components, pooled_cond, pooled_uncond, width: int, height: int, use_cfg: bool,
                       batch: int, device) -> dict | None:
    """SDXL's extra U-Net inputs: the pooled bigG embedding and the micro-conditioning ids.

    Base: (original h, w, crop top, left, target h, w) = (h, w, 0, 0, h, w); refiner:
    (h, w, 0, 0, aesthetic score), 6.0 for the prompt and 2.5 for the negative prompt.
    Rows follow the U-Net batch: [uncond, cond] under CFG, each repeated per image.
    """
    kind = components.spec.family.time_ids
    if kind is None or getattr(components.unet.config, "addition_embed_type", None) != "text_time":
        return None
    if kind == "size_crop_target":
        ids_cond = ids_uncond = [height, width, 0, 0, height, width]
    else:
        ids_cond = [height, width, 0, 0, AESTHETIC_SCORE]
        ids_uncond = [height, width, 0, 0, NEGATIVE_AESTHETIC_SCORE]
    dtype = components.unet.dtype
    time_ids = torch.tensor([ids_cond], dtype=dtype, device=device)
    text_embeds = pooled_cond.to(device=device, dtype=dtype)
    if use_cfg:
        time_ids = torch.cat([torch.tensor([ids_uncond], dtype=dtype, device=device), time_ids])
        text_embeds = torch.cat([pooled_uncond.to(device=device, dtype=dtype), text_embeds])
    return {"text_embeds": text_embeds.repeat_interleave(batch, dim=0),
            "time_ids": time_ids.repeat_interleave(batch, dim=0)}


@torch.no_grad()
def run_batch(components, device, request: GenerationRequest, batch: BatchInputs, control: JobControl,
              report_step: StepReporter, *, on_step=None) -> list[Image.Image] | torch.Tensor | None:
    """Sample one batch; None when it was skipped or interrupted.

    Families whose U-Net takes pooled text embeddings (SDXL) get them from the conditioning.
    `on_step(step=, steps=, timestep=, sigma=, latents=, guidance_scale=) -> guidance scale`
    runs before each step (extensions)."""
    seeds, subseeds, width, height = batch.seeds, batch.subseeds, batch.width, batch.height
    plan, conditioning = batch.plan, batch.conditioning
    unet, vae = components.unet, components.vae
    latent_shape = (1, unet.config.out_channels, height // 8, width // 8)

    # 1. noise, one generator per image
    resize_from = (request.seed_resize_from_w, request.seed_resize_from_h)
    draws = [noise_for_seed(s, ss, request.subseed_strength, latent_shape, resize_from)
             for s, ss in zip(seeds, subseeds)]
    noise = torch.cat([n for n, _ in draws]).to(device)
    generators = [g for _, g in draws]

    # 2. schedule
    scheduler = schedulers.make_scheduler(request.sampler, request.schedule_type, components.scheduler_config)
    scheduler.set_timesteps(request.steps, device=device)
    timesteps = scheduler.timesteps

    # 3. starting latents
    init_latents = mask = None
    if batch.start_latents is not None:
        init_latents = batch.start_latents.to(device=device, dtype=torch.float32)
        timesteps = img2img_timesteps(scheduler, request.steps, request.denoising_strength)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1]) if len(timesteps) else init_latents
    elif plan is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        init_latents = encode_image(vae, plan.image, device).repeat(len(seeds), 1, 1, 1)
        if plan.mask is not None:
            mask = latent_mask(plan.mask, width // 8, height // 8, device, soft=request.soft_inpainting)
            if request.inpainting_fill == "latent noise":
                init_latents = init_latents * (1 - mask) + noise * mask
            elif request.inpainting_fill == "latent nothing":
                init_latents = init_latents * (1 - mask)
        timesteps = img2img_timesteps(scheduler, request.steps, request.denoising_strength)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1]) if len(timesteps) else init_latents

    def model_inputs(model):
        """What `model`'s U-Net sees besides the latents (9 channels: mask and masked image), and
        whether the mask is blended in after each step (a plain 4-channel U-Net, or soft inpainting)."""
        extra_latents = None
        if model.unet.config.in_channels == 9:
            extra_latents = inpaint_conditioning(model.vae, plan, width, height, device).repeat(len(seeds), 1, 1, 1)
        return extra_latents, mask is not None and (model.unet.config.in_channels == 4 or request.soft_inpainting)

    conditioning_latents, blend_each_step = model_inputs(components)
    refiner = batch.refiner
    switch = refiner.switch_step(len(timesteps)) if refiner is not None else None

    # 4. denoise
    use_cfg = request.cfg_scale != 1.0
    controls = ControlSteps(batch.controls, width, height, len(seeds), use_cfg, device)
    image_prompts = batch.image_prompts
    cutoff = guidance_rules.CfgCutoff.of(request)

    def unet_inputs(step_cond, model, cfg: bool):
        context = torch.cat([step_cond.uncond, step_cond.cond]) if cfg else step_cond.cond
        context = context.to(model.unet.dtype).repeat_interleave(len(seeds), dim=0)
        added = None
        if step_cond.pooled_cond is not None:
            added = added_conditioning(model, step_cond.pooled_cond, step_cond.pooled_uncond, width, height,
                                       cfg, len(seeds), device)
        return context, ({"added_cond_kwargs": added} if added is not None else {})

    model, current = components, None
    context = extra = None
    # DeepCache: the base U-Net's deep features reused between full steps (the refiner runs uncached);
    # token merging: its full-resolution self-attention on fewer tokens (the refiner's too)
    refiner_unet = refiner.components.unet if refiner is not None else None
    with deep_cache.applied(components.unet, deep_cache.DeepCacheSettings.of(request)) as feature_cache, \
            token_merging.applied(components.unet, request.token_merging_ratio, seeds[0]), \
            token_merging.applied(refiner_unet if refiner_unet is not components.unet else None,
                                  request.token_merging_ratio, seeds[0]):
        for i, t in enumerate(timesteps):
            if control.stop_current:
                return None
            if i == switch:  # the refiner takes over: same latents, same scheduler state, its own conditioning
                model, conditioning, current = refiner.components, refiner.conditioning, None
                controls = ()  # control models fit the base model's U-Net, not the refiner's
                image_prompts = None  # so do the IP-Adapters, which sit inside it
                unet = model.unet
                conditioning_latents, blend_each_step = model_inputs(model)
            step_cond = conditioning.at(i, request.steps)
            # CFG cutoff (NGMS, Skip Early CFG): some steps run on the prompt alone
            cfg = use_cfg and guidance_rules.use_uncond(i, len(timesteps), sigma_at(scheduler, t), cutoff)
            if current is None or current[0] is not step_cond or current[1] != cfg:  # text or CFG halves changed
                current = (step_cond, cfg)
                context, extra = unet_inputs(step_cond, model, cfg)
            guidance = request.cfg_scale
            if on_step is not None:  # extensions read the latents and may change this step's guidance
                guidance = on_step(step=i, steps=len(timesteps), timestep=t, sigma=sigma_at(scheduler, t),
                                   latents=latents, guidance_scale=guidance)
            model_in = scheduler.scale_model_input(latents, t)
            residuals = controls.residuals(i, len(timesteps), model_in, t, context, extra.get("added_cond_kwargs"),
                                           cfg) if controls else {}
            if conditioning_latents is not None:
                model_in = torch.cat([model_in, conditioning_latents], dim=1)
            if cfg:
                model_in = torch.cat([model_in, model_in])
            step_extra = extra if image_prompts is None else {  # the image embeddings join SDXL's added inputs
                **extra, **image_prompts.unet_kwargs(i, len(timesteps), len(seeds), cfg,
                                                     extra.get("added_cond_kwargs"))}
            if feature_cache is not None:
                feature_cache.step(i, len(timesteps))
            prediction = unet(model_in.to(unet.dtype), t, encoder_hidden_states=context, **step_extra, **residuals)
            prediction = prediction.sample.float()
            if cfg:
                pred_uncond, pred_cond = prediction.chunk(2)
                prediction = pred_uncond + guidance * (pred_cond - pred_uncond)
            latents = schedulers.step(scheduler, prediction, t, latents, generators)
            if blend_each_step:
                # keep the unmasked area on the original image's noisy trajectory
                if i + 1 < len(timesteps):
                    known = scheduler.add_noise(init_latents, noise, timesteps[i + 1 : i + 2])
                else:
                    known = init_latents
                free = free_pixels(mask, i, len(timesteps), request.soft_inpainting)  # took part in step i
                latents = known * (1 - free) + latents * free
            report_step(i + 1, len(timesteps), latents=latents)
    if control.stop_current:
        return None

    # 5. decode and put back what was not to be changed
    if not batch.decode:
        return latents
    decoded = decode_latents(model.vae, latents, control)  # the VAE of the model that finished
    return [finish_image(img, plan) for img in decoded]


def sigma_at(scheduler, t) -> float | None:
    """The noise level (k-diffusion sigma) of timestep t, from the schedule's alphas."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return None
    alpha = float(alphas[min(max(int(round(float(t))), 0), len(alphas) - 1)])
    return ((1 - alpha) / alpha) ** 0.5


def step_reporter(clock: ProgressClock, batch_index: int, offset: int | None = None) -> StepReporter:
    """`run_batch`'s report_step for batch `batch_index` of a job timed by `clock`.

    Without `offset` the sampled batch is the whole batch and its own step count is the
    batch's (plain generation). With one, it is a part that starts `offset` steps into a
    batch of the clock's fixed length (hires fix's two passes, SD upscale's tiles)."""
    def report(step: int, steps: int, latents=None) -> None:
        if offset is None:
            clock.step_done(batch_index, step, steps=steps, preview=preview_of(latents))
        else:
            clock.step_done(batch_index, offset + step, preview=preview_of(latents))

    return report


def image_seeds(request: GenerationRequest, index: int) -> tuple[int, int]:
    """Seed and variation seed of image `index` of the whole job: seed + index, subseed + index."""
    return request.seed + index, request.subseed + index


def batch_seeds(request: GenerationRequest, batch: int) -> tuple[list[int], list[int]]:
    """Seeds and variation seeds of one batch (`image_seeds` of each of its images)."""
    first = batch * request.batch_size
    pairs = [image_seeds(request, first + i) for i in range(request.batch_size)]
    return [seed for seed, _ in pairs], [subseed for _, subseed in pairs]


def run(components, device, request: GenerationRequest, on_progress: ProgressCallback | None = None,
        control: JobControl | None = None, embeddings=(), on_step=None, first_batch: int = 0, *,
        refiner: SecondModel | None = None, controls: Sequence[LoadedControl] = (),
        image_prompts: ImagePromptSteps | None = None):
    """Generate every batch of a request whose seeds are resolved; yields BatchOutput per batch.

    `embeddings`: textual inversions the prompts may name (`pipelines.generate.embeddings`).
    `first_batch`: start there (a retry after running out of memory); seeds stay those of the batch.
    `refiner`: the checkpoint the steps after its `switch_at` run on. `controls`: ControlNet / T2I-Adapter units."""
    control = control or JobControl()
    width, height = request.size_for(components.spec.native_resolution)

    # 1. conditioning, shared by every batch
    layout = layout_of(request)  # regional prompts: the base prompt conditions the batch, regions their parts
    conditioning = regions.encode_conditioning(components, layout, request.prompt, request.negative_prompt,
                                               request.clip_skip, device, steps=request.steps, embeddings=embeddings)
    prompt = layout.base_prompt if layout is not None else request.prompt
    stage = refiner_stage(refiner, prompt, request.negative_prompt, request.clip_skip, device, request.steps)
    # 2. pixel-side inputs
    plan = plan_pixels(request, width, height)

    clock = ProgressClock(request.steps, request.batch_count, on_progress, first_batch=first_batch)
    for batch in range(first_batch, request.batch_count):
        if control.interrupted:
            break
        seeds, subseeds = batch_seeds(request, batch)
        inputs = BatchInputs(conditioning, seeds, subseeds, width, height, plan=plan, refiner=stage,
                             controls=controls, image_prompts=image_prompts)
        with regions.applied(components.unet, conditioning, len(seeds)):  # the U-Net's own afterwards
            result = run_batch(components, device, request, inputs, control, step_reporter(clock, batch),
                               on_step=on_step)
        if result is None:
            control.take_skip()
            continue
        yield BatchOutput(images=result, seeds=seeds, subseeds=subseeds, index=batch)
