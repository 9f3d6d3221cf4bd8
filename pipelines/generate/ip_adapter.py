"""Image prompts (IP-Adapter) for one job, through the ControlNet units (sd-webui-controlnet's contract):
a unit whose module is an `ip-adapter_*` preprocessor, or whose model is an IP-Adapter file, is an
image prompt, and its image (the job's input image when it has none) is the prompt image.

`prepare_image_prompts` checks every such unit (its adapter found in models/ipadapter or
models/ControlNet and fitting the U-Net, a CLIP vision encoder from models/clip_vision fitting the
adapter) before anything loads, then loads the adapters and encodes the images as diffusers'
pipelines do: the encoder's image embedding (base adapters) with zeros as the negative, or its
penultimate hidden states (plus, full face) with those of an all-zero image as the negative. The
embeddings of an image are kept across jobs (`embedding_slot`, keyed by the encoder file's version
and the image's pixels), so the same image prompt is encoded once. The listing (`control_model_list`)
says which encoder each adapter reads or which one is missing; `unused_notes` says where a job's
image prompts do not act (the refiner's steps, hires fix on another checkpoint).
`applied(unet, prompts)` puts the adapters into the cached U-Net for the job (diffusers' own
IP-Adapter attention processors and image projection) and restores the very same processors and
projection afterwards; its `ImagePromptSteps.unet_kwargs` gives each U-Net call the embeddings and
sets each adapter's scale for the step: its weight while it acts (the control units' start/end rule,
`control.acts_at`), 0 otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from pipelines.core.checks import RequestError
from pipelines.core.control import ControlUnit
from pipelines.core.control_infotext import control_model_title
from pipelines.core.control_modules import IMAGE_PROMPT_MODULES
from pipelines.generate.control import acts_at
from pipelines.generate.control_units import CONTROL_KIND, unit_field
from pipelines.models.checkpoint_file import CheckpointError
from pipelines.models.ip_adapter_files import (
    EncoderSpec,
    IPAdapterSpec,
    check_fits_unet,
    describe_ip_adapter_file,
    image_processor,
    inspect_encoder_file,
    inspect_ip_adapter_file,
    is_ip_adapter_file,
    load_image_encoder,
    load_ip_adapter,
)
from pipelines.models.registry import ModelFile, ModelRegistry

ADAPTER_KIND, ENCODER_KIND = "ipadapter", "clip_vision"  # core.settings.MODEL_KINDS
Indexed = list[tuple[int, ControlUnit]]  # (index in the request's control_units, unit)


@dataclass(frozen=True)
class ImagePrompt:
    """One unit ready to run: its adapter's weights and its image's embeddings (diffusers' shapes:
    (1, 1, width) for base adapters, (1, 1, tokens, width) for the hidden-state ones)."""

    unit: ControlUnit
    state: dict  # {"image_proj": {...}, "ip_adapter": {...}}
    embeds: torch.Tensor
    negative: torch.Tensor


@dataclass
class JobImagePrompts:
    prompts: list[ImagePrompt] = field(default_factory=list)
    titles: dict[int, str] = field(default_factory=dict)  # unit index -> "name [hash]" for the infotext


# --- which units are image prompts ------------------------------------------------------------------

def find_adapter_file(registry: ModelRegistry, name: str) -> ModelFile | None:
    """The IP-Adapter file `name` means: in models/ipadapter, else an IP-Adapter in models/ControlNet."""
    found = registry.find(ADAPTER_KIND, name)
    if found is not None:
        return found
    found = registry.find(CONTROL_KIND, name)
    return found if found is not None and in_control_folder_as_adapter(found) else None


def in_control_folder_as_adapter(file: ModelFile) -> bool:
    """A file of models/ControlNet that is an IP-Adapter: the ControlNet listing refused it (so a real
    ControlNet, maybe a large .pth, is never read again here) and its keys say so."""
    return bool((file.details or {}).get("error")) and is_ip_adapter_file(file.path)


def control_model_list(registry: ModelRegistry, refresh: bool = False) -> list[ModelFile]:
    """The control models a unit may name (the engine's `control_models`): models/ControlNet's files,
    its IP-Adapters described as such instead of refused, then models/ipadapter's. An adapter's
    details also say which encoder of models/clip_vision it reads (`image_encoder`), or, when none
    there fits, which one is `missing` and where it goes (the UI says so before a job fails)."""
    listed = []
    for file in registry.list(CONTROL_KIND, refresh):
        listed.append(dataclasses.replace(file, details=adapter_details(registry, file, refresh))
                      if in_control_folder_as_adapter(file) else file)
    for file in registry.list(ADAPTER_KIND, refresh):
        listed.append(dataclasses.replace(file, details=adapter_details(registry, file, refresh)))
    return listed


def adapter_details(registry: ModelRegistry, file: ModelFile, refresh: bool = False) -> dict:
    """`describe_ip_adapter_file` plus the encoder it reads: {"image_encoder": name} or {"missing": why}."""
    details = describe_ip_adapter_file(file.path)
    if details.get("error"):
        return details
    spec = inspect_ip_adapter_file(file.path)  # cached by the file's version: the describe above read it
    found = fitting_encoder(registry, spec, refresh)
    if found is not None:
        return {**details, "image_encoder": found[0].name}
    return {**details, "missing": f"{file.name} needs {spec.encoder_needed()}: put that file into models/clip_vision"}


def is_image_prompt(unit: ControlUnit, registry: ModelRegistry) -> bool:
    """Whether an active unit is an image prompt: an ip-adapter_* module, or an IP-Adapter model."""
    return unit.active and (unit.module in IMAGE_PROMPT_MODULES or find_adapter_file(registry, unit.model) is not None)


def split_units(units: Sequence[ControlUnit], registry: ModelRegistry) -> tuple[Indexed, Indexed]:
    """The active units, as (index, unit): (ControlNet / T2I-Adapter units, image prompt units)."""
    control, prompts = [], []
    for index, unit in enumerate(units):
        if unit.active:
            (prompts if is_image_prompt(unit, registry) else control).append((index, unit))
    return control, prompts


# --- checks, before anything loads -----------------------------------------------------------------

def cross_attention_layers(unet) -> int:
    """The attention processors an IP-Adapter has weights for (diffusers: every one but self-attention)."""
    return sum(1 for name in unet.attn_processors if not name.endswith("attn1.processor"))


def adapter_spec(registry: ModelRegistry, index: int, unit: ControlUnit, unet) -> tuple[ModelFile, IPAdapterSpec]:
    """The unit's IP-Adapter file and what it is, checked against the U-Net."""
    field_name = unit_field(index, "model")
    file = find_adapter_file(registry, unit.model)
    if file is None:
        names = [f.name for f in registry.list(ADAPTER_KIND)]
        names += [f.name for f in registry.list(CONTROL_KIND) if in_control_folder_as_adapter(f)]
        raise RequestError(field_name, f"{unit.module} needs an IP-Adapter model; {unit.model!r} is none. Available: "
                                       f"{', '.join(names) or 'none (put ip-adapter files into models/ipadapter)'}")
    try:
        spec = inspect_ip_adapter_file(file.path)
    except CheckpointError as exc:
        raise RequestError(field_name, f"{file.name} cannot be used: {exc}") from None
    unet_width = unet.config.cross_attention_dim
    why = check_fits_unet(spec, unet_width[0] if isinstance(unet_width, (list, tuple)) else unet_width,
                          cross_attention_layers(unet))
    if why:
        raise RequestError(field_name, f"{file.name} does not fit the checkpoint: {why}")
    return file, spec


def fitting_encoder(registry: ModelRegistry, spec: IPAdapterSpec, refresh: bool = False
                    ) -> tuple[ModelFile, EncoderSpec] | None:
    """The first CLIP vision encoder in models/clip_vision whose widths fit the adapter; None when none does."""
    for candidate in registry.list(ENCODER_KIND, refresh):
        try:
            encoder = inspect_encoder_file(candidate.path)
        except (CheckpointError, OSError):
            continue
        if encoder.fits(spec):
            return candidate, encoder
    return None


def find_encoder_file(registry: ModelRegistry, index: int, unit: ControlUnit, adapter: tuple[ModelFile, IPAdapterSpec]
                      ) -> tuple[ModelFile, EncoderSpec]:
    """`fitting_encoder`, or a RequestError naming the unit's model and where the encoder goes."""
    file, spec = adapter
    found = fitting_encoder(registry, spec)
    if found is not None:
        return found
    seen = [candidate.name for candidate in registry.list(ENCODER_KIND)]
    there = f" (models/clip_vision has {', '.join(seen)}, which do not fit)" if seen else ""
    raise RequestError(unit_field(index, "model"),
                       f"{unit.module} with {file.name} needs {spec.encoder_needed()}: put that file into "
                       f"models/clip_vision{there}")


def prompt_image(index: int, unit: ControlUnit, init_image: Image.Image | None) -> Image.Image:
    image = unit.image if unit.image is not None else init_image
    if image is None:
        raise RequestError(unit_field(index, "image"), f"{unit.module}: an image prompt needs an image")
    return image.convert("RGB")


# --- loading and encoding ------------------------------------------------------------------------------

@torch.no_grad()
def encode_image_prompt(encoder, processor, image: Image.Image, hidden_states: bool,
                        device) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, negative embeddings) of one image, as diffusers' `encode_image` makes them, with
    the adapter axis in front (`[None]`)."""
    dtype = next(encoder.parameters()).dtype
    pixels = processor(image, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    if hidden_states:
        embeds = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    else:
        embeds = encoder(pixels).image_embeds
        negative = torch.zeros_like(embeds)
    return embeds[None], negative[None]


EMBEDDING_CACHE_SIZE = 32  # image prompt embeddings kept across jobs (a few KB to a few MB each)


@lru_cache(maxsize=EMBEDDING_CACHE_SIZE)
def embedding_slot(key: tuple) -> dict:
    """An empty holder per (encoder file version, image, kind, dtype, device), filled on first use: the
    same image with the same encoder is encoded once across jobs, and its encoder need not even load."""
    return {}


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(b"%s %dx%d " % (image.mode.encode(), *image.size) + image.tobytes()).hexdigest()


def embedding_key(encoder_file: ModelFile, image: Image.Image, hidden_states: bool, dtype, device) -> tuple:
    return (str(encoder_file.path), encoder_file.size, encoder_file.mtime, image_digest(image), hidden_states,
            str(dtype), str(device))


def prepare_image_prompts(request, units: Indexed, *, registry: ModelRegistry, unet, device,
                          load_encoder: Callable[..., Any] = load_image_encoder,
                          load_adapter: Callable[..., tuple] = load_ip_adapter) -> JobImagePrompts:
    """The image prompt units of `request` (from `split_units`) loaded and encoded for `unet`.

    Every unit is checked (adapter, encoder, image) before anything loads. `load_encoder(path, dtype)`
    and `load_adapter(path, dtype)`: the model cache's loaders (default: from the file). Embeddings
    come from `embedding_slot` when this image was encoded by this encoder before."""
    checked = []
    for index, unit in units:
        adapter = adapter_spec(registry, index, unit, unet)
        checked.append((index, unit, adapter, find_encoder_file(registry, index, unit, adapter),
                        prompt_image(index, unit, request.init_image)))
    job, encoders = JobImagePrompts(), {}
    for index, unit, (file, spec), (encoder_file, encoder_spec), image in checked:
        slot = embedding_slot(embedding_key(encoder_file, image, spec.hidden_states, unet.dtype, device))
        if not slot:
            key = str(encoder_file.path)
            if key not in encoders:  # units sharing an encoder load it once
                encoders[key] = load_encoder(encoder_file.path, unet.dtype).to(device)
            slot["embeds"], slot["negative"] = encode_image_prompt(encoders[key], image_processor(encoder_spec),
                                                                   image, spec.hidden_states, device)
        _, state = load_adapter(file.path, unet.dtype)
        job.prompts.append(ImagePrompt(unit, state, slot["embeds"], slot["negative"]))
        registry.ensure_hash(file)  # once per file (cached): the infotext names it "name [hash]"
        job.titles[index] = control_model_title(file)
    return job


def unused_notes(request, units: Indexed) -> list[str]:
    """Where a job's image prompts (`split_units`' second list) do not act, for `result.warnings`: the
    refiner's steps and hires fix's second pass on another checkpoint (the adapters sit inside the
    first checkpoint's U-Net and fit no other)."""
    if not units:
        return []
    notes = []
    if request.refiner_checkpoint and request.refiner_switch_at < 1:
        notes.append(f"Image prompts (IP-Adapter) act until the refiner takes over (Switch at "
                     f"{request.refiner_switch_at:g}), not on the refiner's steps ({request.refiner_checkpoint})")
    if request.enable_hr and request.hr_checkpoint_name and request.hr_checkpoint_name != request.checkpoint:
        notes.append(f"Image prompts (IP-Adapter) act in hires fix's first pass only: the second pass runs on "
                     f"{request.hr_checkpoint_name}, which the adapters do not sit in")
    return notes


# --- the job -----------------------------------------------------------------------------------------

class ImagePromptSteps:
    """The adapters inside the U-Net for one job: each step's scales and U-Net keyword arguments."""

    def __init__(self, unet, prompts: Sequence[ImagePrompt]):
        self.prompts = list(prompts)
        self.dtype = unet.dtype
        self.processors = [p for p in unet.attn_processors.values() if hasattr(p, "to_k_ip")]
        self._embeds: dict[tuple[int, bool], list[torch.Tensor]] = {}

    def scales(self, step: int, steps: int) -> list[float]:
        return [p.unit.weight if acts_at(p.unit, step, steps) else 0.0 for p in self.prompts]

    def embeds(self, batch: int, cfg: bool) -> list[torch.Tensor]:
        """One tensor per adapter with the U-Net batch's rows: [negative x batch, prompt x batch] under CFG."""
        if (batch, cfg) not in self._embeds:
            self._embeds[batch, cfg] = [
                torch.cat([p.negative] * batch + [p.embeds] * batch if cfg else [p.embeds] * batch).to(self.dtype)
                for p in self.prompts]
        return self._embeds[batch, cfg]

    def unet_kwargs(self, step: int, steps: int, batch: int, cfg: bool, added: dict | None) -> dict:
        """Sets each adapter's scale for step `step` (0-based) of `steps` and returns the U-Net's
        `added_cond_kwargs` (the step's own, `added`, plus the image embeddings)."""
        scales = self.scales(step, steps)
        for processor in self.processors:
            processor.scale = list(scales)
        return {"added_cond_kwargs": {**(added or {}), "image_embeds": self.embeds(batch, cfg)}}


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def applied(unet, prompts: Sequence[ImagePrompt]) -> Iterator[ImagePromptSteps | None]:
    """The adapters inside `unet` for the block (None without prompts); afterwards the U-Net has its
    very own attention processors and image projection again (the cached model is unchanged)."""
    if not prompts:
        yield None
        return
    processors = dict(unet.attn_processors)
    projection, kind = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    try:
        # diffusers' loader builds its IP-Adapter processors and image projections from the states; its
        # closing `unet.to(unet.dtype)` warns about fp32 modules though it changes no dtype: silenced
        with quiet_logger("diffusers.models.modeling_utils"):
            unet._load_ip_adapter_weights([p.state for p in prompts])
        yield ImagePromptSteps(unet, prompts)
    finally:
        unet.encoder_hid_proj = projection  # first: a plus projection has attention layers of its own
        unet.config.encoder_hid_dim_type = kind
        unet.set_attn_processor(processors)
