"""Request and response bodies with AUTOMATIC1111's field names and defaults (A1111 1.10).

Clients send many fields this server has no use for (sampler tuning knobs, extension
settings): every A1111 field is declared so it shows up in the
OpenAPI docs and in the `parameters` echo, and anything else is accepted and ignored.
A JSON `null` means "the default", as A1111's all-optional models allow.

Limits (steps, sizes, ...) are not repeated here: `GenerationRequest` checks them in one
place for every entry point, and the API maps its errors back to these field names.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items()
                    if value is not None or key not in cls.model_fields
                    or cls.model_fields[key].default is None}
        return data


class GenerationFields(ApiModel):
    """Fields txt2img and img2img share (A1111's StableDiffusionProcessing)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[list[str]] = Field(None, description="names of styles in styles.csv (in --data-dir), "
                                                          "applied to the prompts in order")
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = Field(-1, description="resize seed from height: the noise of this size, centred; "
                                                    "<= 0 is off")
    seed_resize_from_w: int = Field(-1, description="resize seed from width (with seed_resize_from_h)")
    sampler_name: Optional[str] = Field(None, description='e.g. "Euler a", "DPM++ 2M" or "DPM++ 2M Karras"')
    scheduler: Optional[str] = Field(None, description='schedule type: "automatic", "karras", ... (name or label)')
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: Optional[int] = Field(None, description="absent: the checkpoint's native size (512 SD 1.x, "
                                                   "1024 SDXL, 64 the demo model)")
    height: Optional[int] = Field(None, description="absent: the checkpoint's native size")
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = Field(None, description="seamless: the picture repeats without a seam "
                                                     "(circular padding; SD upscale wraps its tiles)")
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: float = 0.75
    tiny_vae_decode: bool = Field(False, description="decode the final images with the TAESD of models/VAE-approx "
                                                      "(faster, a little softer); refused when none fits the model")
    distilled_cfg_scale: Optional[float] = Field(None, description="Flux dev's guidance (Forge's Distilled CFG "
                                                                   "Scale); absent: the model's own, 3.5")
    shift: Optional[float] = Field(None, description="SD 3 / Flux: the flow schedule's shift; absent: the model's own")
    s_min_uncond: Optional[float] = Field(None, description="NGMS: below this sigma every other step skips the "
                                                            "negative prompt's pass (0 or absent: off)")
    deepcache_interval: Optional[int] = Field(None, description="DeepCache: the whole U-Net runs every Nth step, the "
                                                                "others reuse its deep features (1 or absent: off)")
    deepcache_branch: Optional[int] = Field(None, description="DeepCache: layers kept live besides the outermost "
                                                              "(0..2; absent: 0, the fastest)")
    deepcache_start: Optional[float] = Field(None, description="DeepCache: share of the first steps that always run "
                                                               "in full (absent: 0.2)")
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers, forge_additional_modules (Forge's "
                    "VAE / text encoder files, names or paths), face_restoration options, token_merging_ratio, "
                    "skip_early_cond, s_min_uncond_all: for this request only")
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = Field(None, description="a checkpoint the steps after refiner_switch_at run "
                                                                "on (SDXL refiner, or a model of the same latents)")
    refiner_switch_at: Optional[float] = Field(None, description="share of the sampling steps (0..1) run before the "
                                                                 "refiner takes over; absent: 0.8")
    disable_extra_networks: bool = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    sampler_index: str = "Euler"
    script_name: Optional[str] = Field(None, description='an A1111 script by name ("x/y/z plot", "prompt matrix", '
                                                         '"prompts from file or textbox", img2img: "sd upscale", '
                                                         '"loopback"); see GET /sdapi/v1/scripts')
    script_args: list[Any] = Field(default_factory=list, description="the script's arguments in A1111's order "
                                                                     "(GET /sdapi/v1/script-info); missing ones "
                                                                     "and nulls take A1111's defaults")
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description='extension arguments: {"<extension id or title>": {"args": ...}}; '
                                          'ones this server lacks are listed in info.warnings')
    infotext: Optional[str] = None
    force_task_id: Optional[str] = None
    image_prompts: Optional[list[Any]] = Field(
        None, description='image prompts (IP-Adapter): [{"image": base64, "model": an IP-Adapter from GET '
                          '/controlnet/model_list, "weight": 0..2 (1), "start": 0..1 (0), "end": 0..1 (1)}]; they '
                          'follow the alwayson_scripts.controlnet units and count as units')
    regions: Optional[list[Any]] = Field(
        None, description='regional prompts: [{"prompt": "...", "box": [left, top, right, bottom] as shares (0..1) '
                          'of the image, or "mask": a base64 picture of the image\'s size (white = the region), '
                          '"weight": 0..1 (the rest is the base prompt\'s)}]; `prompt` is the base prompt')
    regional_mode: str = Field("Columns", description='the prompt\'s ADDCOL / ADDROW layout: "Columns" (rows of '
                                                      'cells, Regional Prompter\'s default) or "Rows"')
    regional_ratios: str = Field("", description='sizes of the layout\'s parts as Regional Prompter reads them: '
                                                 '"1,2" or "1,2,1;1,1"; "": equal')
    regional_base_ratios: str = Field("0.2", description="with ADDBASE: the base prompt's share in each region "
                                                         "(one number, or one per region)")


class Txt2ImgRequest(GenerationFields):
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = Field(None, description='the checkpoint of the second pass; absent or '
                                                                '"Use same checkpoint": the first pass\'s')
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationFields):
    init_images: Optional[list[str]] = Field(None, description="base64 images (a data: URL prefix is fine)")
    resize_mode: int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill, "
                                            "3 just resize (latent upscale)")
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = Field(None, description="base64 mask: white (or opaque) = repaint")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = Field(0, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="inpaint area: true = only masked, false = whole picture")
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, description="1 = inpaint the unmasked part")
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = Field(False, description="echo init_images and mask in `parameters`")
    soft_inpainting: bool = Field(False, description="with a mask: its grey values say how much each pixel may "
                                                     "change (differential diffusion)")
    outpaint_left: int = Field(0, description="outpainting: grow the canvas by this many pixels on the left "
                                              "and paint the new area (also outpaint_right/up/down)")
    outpaint_right: int = 0
    outpaint_up: int = 0
    outpaint_down: int = 0


class GenerationResponse(BaseModel):
    images: Optional[list[str]] = Field(None, description="base64 PNGs carrying the `parameters` text chunk")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: seeds, infotexts, model, warnings, ...")


class ExtrasSingleImageRequest(ApiModel):
    resize_mode: int = Field(0, description="0 scale by upscaling_resize, 1 scale to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False
    image: str = Field("", description="base64 image (a data: URL prefix is fine)")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: Optional[str] = None


class PNGInfoRequest(ApiModel):
    image: str = Field(description="base64 image (a data: URL prefix is fine)")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the parameters text")
    items: dict[str, Any] = Field(description="other text chunks of the image")
    parameters: dict[str, Any] = Field(description="the parameters text parsed into keys and values")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: Optional[str] = None
    textinfo: Optional[str] = None
    jobs_ahead: Optional[int] = None  # not in A1111: jobs before the caller's own, null when it has none


class ControlNetDetectRequest(ApiModel):
    """sd-webui-controlnet's POST /controlnet/detect: run one preprocessor on images."""

    controlnet_module: str = Field("none", description="a name (or alias) from GET /controlnet/module_list")
    controlnet_input_images: list[Any] = Field(default_factory=list, description="base64 images")
    controlnet_processor_res: float = Field(-1, description="the map's short side; -1: the module's default")
    controlnet_threshold_a: float = Field(-1, description="-1: the module's default")
    controlnet_threshold_b: float = Field(-1, description="-1: the module's default")
    controlnet_masks: list[Any] = Field(default_factory=list, description="base64 masks, one per image (inpaint)")
    low_vram: bool = Field(False, description="accepted, no effect")

    @model_validator(mode="before")
    @classmethod
    def _images_alias(cls, data: Any) -> Any:
        # the webuiapi client sends the images as `controlnet_images`
        if isinstance(data, dict) and "controlnet_images" in data and "controlnet_input_images" not in data:
            data = {**data, "controlnet_input_images": data["controlnet_images"]}
        return data
