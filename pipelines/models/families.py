"""Checkpoint families: how to recognise one from its keys, and what it is made of.

Adding a family is adding a `Family` entry to `FAMILIES`: its key prefixes, its text
encoder layout, its training schedule, its conditioning and its native size. Architecture
details that the weights do tell (channel counts, depths, attention placement, context
width, ADM input width) are read from the tensor shapes by `architecture.py`, so tiny
test checkpoints and real ones take the same path.

It is also the one home of the single-file (LDM / A1111) weight-key prefixes: the loader,
the exporter and the model cache all spell them through the constants below.

Facts the weights do not tell live here:
- heads: SD 1.x uses 8 heads per U-Net attention; SD 2.x and SDXL head width 64;
- which hidden state of each text encoder conditions the U-Net (see `TextEncoderSpec.layer`);
- the prediction type (epsilon or v) where no `.yaml`, metadata or user override says it;
- SDXL's extra conditioning (pooled text embedding + size/crop/target or aesthetic ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.core.prediction_types import EPSILON, V_PREDICTION

# Where each component's weights sit in a single-file checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."  # full (training) files: the U-Net's EMA copy, names without dots
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIP names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: open_clip names
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."
REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."
# SD 3 / 3.5 single files (SAI's layout): MMDiT under the U-Net prefix, encoders under their own.
SD3_TEXT_ENCODERS_PREFIX = "text_encoders."
SD3_CLIP_L_PREFIX = SD3_TEXT_ENCODERS_PREFIX + "clip_l.transformer."
SD3_CLIP_G_PREFIX = SD3_TEXT_ENCODERS_PREFIX + "clip_g.transformer."
SD3_T5_PREFIX = SD3_TEXT_ENCODERS_PREFIX + "t5xxl.transformer."
# Flux.1 single files (BFL's layout): the transformer bare or under the U-Net prefix; ComfyUI's and
# Forge's all-in-one files add the VAE under `vae.` and the encoders under SD 3's names above.
FLUX_VAE_PREFIX = "vae."
# every text encoder prefix above starts with one of these (LDM's, SGM's and SD3's names)
TEXT_ENCODER_ROOTS = ("cond_stage_model.", "conditioner.", SD3_TEXT_ENCODERS_PREFIX)
DIFFUSERS_INDEX = "model_index.json"  # a folder holding it is one diffusers model, not single files



@dataclass(frozen=True)
class TextEncoderSpec:
    prefix: str  # key prefix in the single file
    # "hf_clip": transformers' CLIPTextModel names under `text_model.` (SD 1.x, SDXL's CLIP-L);
    # "open_clip": open_clip's names (`transformer.resblocks.N.attn.in_proj_weight`, ...)
    layout: str
    pad_token: str  # SD 1.x pads with <|endoftext|>; OpenCLIP-based encoders with "!"
    # Which hidden state conditions the U-Net:
    # "user": the last layer, or A1111's clip skip N (N-1 layers earlier), then the final norm;
    # "penultimate": always the second-to-last layer, then the final norm (SD 2.x; clip skip ignored);
    # "penultimate_raw": always the second-to-last layer, no final norm (SDXL; clip skip ignored).
    layer: str = "user"
    pooled: bool = False  # its projected pooled output conditions the U-Net (SDXL's bigG)
    hidden_act: str = "quick_gelu"  # OpenAI CLIP: quick_gelu; OpenCLIP ViT-H / bigG: gelu


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    markers: tuple[str, ...]  # any of these keys identifies the family
    text_encoders: tuple[TextEncoderSpec, ...]
    native_resolution: int
    latent_scaling_factor: float
    # Heads cannot be read from shapes: SD 1.x uses 8 heads everywhere, later ones head width 64.
    unet_heads: int | None = None
    unet_head_width: int | None = None
    scheduler: dict = field(default_factory=dict)
    # SDXL micro-conditioning: None, "size_crop_target" (base) or "size_crop_aesthetic" (refiner)
    time_ids: str | None = None
    zero_empty_negative: bool = False  # SDXL: an empty negative prompt is all zeros (A1111 and diffusers agree)
    upcast_attention: bool = False  # SD 2.x: attention scores overflow fp16
    # SD 2.x: epsilon and v files have identical weights; the 768 ones are v-prediction
    prediction_undecidable: bool = False
    v_resolution: int | None = None  # native size of the v-prediction variant
    # Flow-matching families (SD 3.x): latents are (z - shift) * scale, and the sampler's
    # timestep shift (Forge's "Shift") comes from the model's scheduler config.
    latent_shift_factor: float = 0.0
    flow_shift: float | None = None  # None with a flow schedule: resolution-dependent (Flux's dynamic shift)
    # Guidance-distilled models (Flux.1 dev): the guidance the transformer takes as an input
    # (Forge's "Distilled CFG Scale"), and the CFG scale at which no second pass runs.
    distilled_guidance: float | None = None
    default_cfg_scale: float | None = None  # None: A1111's 7; 1.0: real CFG off (one pass per step)

    def resolution_for(self, prediction_type: str, inpainting: bool, declared: int | None = None) -> int:
        """The size a model of this family was trained at: what its file declares, else the
        v-prediction variant's size (SD 2.x 768-v), else the family's."""
        if declared:
            return declared
        if self.v_resolution and prediction_type == V_PREDICTION and not inpainting:
            return self.v_resolution
        return self.native_resolution


# Stable Diffusion's training schedule (shared by SD 1.x, 2.x and SDXL).
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": EPSILON,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}

CLIP_L = "<|endoftext|>"

SD1 = Family(
    name="sd1",
    label="SD 1.x",
    markers=(
        CLIP_PREFIX + "text_model.embeddings.token_embedding.weight",
        CLIP_PREFIX + "embeddings.token_embedding.weight",  # files from older transformers
    ),
    text_encoders=(TextEncoderSpec(prefix=CLIP_PREFIX, layout="hf_clip", pad_token=CLIP_L),),
    native_resolution=512,
    latent_scaling_factor=0.18215,
    unet_heads=8,
    scheduler=SD_SCHEDULE,
)

SD2 = Family(
    name="sd2",
    label="SD 2.x",
    markers=(OPEN_CLIP_PREFIX + "token_embedding.weight",),
    text_encoders=(
        TextEncoderSpec(prefix=OPEN_CLIP_PREFIX, layout="open_clip", pad_token="!",
                        layer="penultimate", hidden_act="gelu"),
    ),
    native_resolution=512,
    latent_scaling_factor=0.18215,
    unet_head_width=64,
    scheduler=SD_SCHEDULE,
    upcast_attention=True,
    prediction_undecidable=True,
    v_resolution=768,
)

SDXL = Family(
    name="sdxl",
    label="SDXL",
    markers=(SDXL_CLIP_G_PREFIX + "token_embedding.weight",),
    text_encoders=(
        TextEncoderSpec(prefix=SDXL_CLIP_L_PREFIX, layout="hf_clip", pad_token=CLIP_L, layer="penultimate_raw"),
        TextEncoderSpec(prefix=SDXL_CLIP_G_PREFIX, layout="open_clip", pad_token="!",
                        layer="penultimate_raw", pooled=True, hidden_act="gelu"),
    ),
    native_resolution=1024,
    latent_scaling_factor=0.13025,
    unet_head_width=64,
    scheduler=SD_SCHEDULE,
    time_ids="size_crop_target",
    zero_empty_negative=True,
)

SDXL_REFINER = Family(
    name="sdxl_refiner",
    label="SDXL refiner",
    markers=(REFINER_CLIP_G_PREFIX + "token_embedding.weight",),
    text_encoders=(
        TextEncoderSpec(prefix=REFINER_CLIP_G_PREFIX, layout="open_clip", pad_token="!",
                        layer="penultimate_raw", pooled=True, hidden_act="gelu"),
    ),
    native_resolution=1024,
    latent_scaling_factor=0.13025,
    unet_head_width=64,
    scheduler=SD_SCHEDULE,
    time_ids="size_crop_aesthetic",
)

SD3 = Family(
    name="sd3",
    label="SD 3",
    markers=(UNET_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias",),
    # both CLIPs are stored in transformers' layout; penultimate layer, final norm skipped (diffusers'
    # SD3Pipeline), pooled projections of both concatenated; T5-XXL (see sd3_prompts) after them
    text_encoders=(
        TextEncoderSpec(prefix=SD3_CLIP_L_PREFIX, layout="hf_clip", pad_token=CLIP_L,
                        layer="penultimate_raw", pooled=True),
        TextEncoderSpec(prefix=SD3_CLIP_G_PREFIX, layout="hf_clip", pad_token="!",
                        layer="penultimate_raw", pooled=True, hidden_act="gelu"),
    ),
    native_resolution=1024,
    latent_scaling_factor=1.5305,  # SD3's VAE config
    latent_shift_factor=0.0609,
    unet_head_width=64,  # MMDiT attention heads are 64 wide (the transformer's width / 64 heads)
    scheduler={"num_train_timesteps": 1000, "shift": 3.0},  # FlowMatchEulerDiscreteScheduler
    flow_shift=3.0,
)

# Flux.1's schedules (the scheduler_config.json of BFL's diffusers folders): dev shifts by the
# image's token count (mu from base_shift at 256 tokens to max_shift at 4096); schnell does not.
FLUX_DEV_SCHEDULE = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                     "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULE = {**FLUX_DEV_SCHEDULE, "shift": 1.0, "use_dynamic_shifting": False}

FLUX = Family(
    name="flux",
    label="Flux.1",
    markers=(UNET_PREFIX + "double_blocks.0.img_attn.norm.key_norm.scale",
             "double_blocks.0.img_attn.norm.key_norm.scale"),  # diffusers' own Flux detection key
    # CLIP-L's pooled output (final norm, no projection: transformers' CLIPTextModel) is the
    # transformer's vector input; T5-XXL's 512 tokens (see flux_prompts) are its sequence
    text_encoders=(TextEncoderSpec(prefix=SD3_CLIP_L_PREFIX, layout="hf_clip", pad_token=CLIP_L),),
    native_resolution=1024,
    latent_scaling_factor=0.3611,  # Flux's VAE config (ae.safetensors)
    latent_shift_factor=0.1159,
    unet_head_width=128,
    scheduler=FLUX_DEV_SCHEDULE,
    flow_shift=None,
    distilled_guidance=3.5,  # diffusers' FluxPipeline and Forge's default
    default_cfg_scale=1.0,
)

# Most specific first: an SDXL file has no `cond_stage_model.` keys, but order keeps it obvious.
FAMILIES: tuple[Family, ...] = (FLUX, SD3, SDXL, SDXL_REFINER, SD2, SD1)
BY_NAME = {f.name: f for f in FAMILIES}

# SDXL aesthetic-score conditioning of the refiner (A1111's and diffusers' defaults)
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


class UnsupportedCheckpoint(ValueError):
    """The file is readable but is not a checkpoint family we know."""


def detect_family(keys) -> Family:
    keys = keys if isinstance(keys, (set, dict, frozenset)) else set(keys)
    if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        raise UnsupportedCheckpoint(
            f"not a Stable Diffusion checkpoint: no U-Net weights under '{UNET_PREFIX}' "
            "(is it a LoRA, a VAE or an upscaler? those go in models/Lora, models/VAE, models/ESRGAN)"
        )
    for family in FAMILIES:
        if any(marker in keys for marker in family.markers):
            return family
    known = ", ".join(f.label for f in FAMILIES)
    raise UnsupportedCheckpoint(f"unrecognised checkpoint family (this version loads: {known})")
