"""A1111 request bodies -> GenerationRequest / UpscaleRequest, and results -> A1111 answers.

Pure translation: no HTTP here beyond raising `ApiError` for a bad field, so the rules are
easy to test and to read in one place.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from PIL import Image

from pipelines.core import infotext as infotexts
from pipelines.core import regions, samplers, user_settings
from pipelines.core.engine_api import EngineAPI, ModelFileInfo
from pipelines.core.request import (
    HR_DEFAULT_UPSCALER,
    HR_SAME_CHECKPOINT,
    HR_SAME_SAMPLER,
    INPAINT_FILLS,
    OUTPAINT_SIDES,
    RESIZE_MODES,
    GenerationRequest,
    RequestError,
    UpscaleRequest,
)
from pipelines.core.styles import apply_styles, style_database
from pipelines.core.uploads import UploadLimits

from . import controlnet, forge_modules, image_prompts, scripts, speed_options
from .bodies import ExtrasSingleImageRequest, GenerationFields, Img2ImgRequest, Txt2ImgRequest
from .errors import ApiError, bad_field
from .extensions import extension_args
from .images import decode_image
from .names import parse_clip_skip, parse_sampler, resolve_checkpoint_field
from .options import KNOWN_OPTIONS, ApiOptions

# A1111's face restoration options: per request in override_settings, else the server's /options
FACE_OPTIONS = ("face_restoration", "face_restoration_model", "code_former_weight")

# --- generation -----------------------------------------------------------------------------

# GenerationRequest field -> the A1111 field a client sent it in (when the names differ)
_API_NAMES = {
    "schedule_type": "scheduler",
    "batch_count": "n_iter",
    "init_image": "init_images",
}
OVERRIDES = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", forge_modules.KEY, *FACE_OPTIONS,
             *speed_options.OVERRIDE_KEYS)


@dataclass
class Prepared:
    request: GenerationRequest
    checkpoint: ModelFileInfo
    warnings: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    styles: list[str] = field(default_factory=list)  # applied to the prompts, in order
    started: datetime.datetime = field(default_factory=datetime.datetime.now)
    sd_upscale: dict[str, Any] | None = None  # script_name "sd upscale": engine.sd_upscale's options
    control_args: tuple[int, ...] = ()  # each control unit's index in alwayson_scripts.controlnet.args

    def api_field(self, request_field: str) -> str:
        return api_field_of(request_field, self.names, self.control_args)


def api_field_of(request_field: str, names: Mapping[str, str], control_args: tuple[int, ...]) -> str:
    """The A1111 field a request field (or the engine's error about it) came from; units after the
    ControlNet ones are the body's `image_prompts`."""
    return (image_prompts.api_field(request_field, len(control_args))
            or controlnet.api_field(request_field, control_args) or names.get(request_field, request_field))


def _choice(field_name: str, value: int, choices: tuple[str, ...], labels: Iterable[str]) -> str:
    if isinstance(value, bool) or not 0 <= value < len(choices):
        listed = ", ".join(f"{i} ({label})" for i, label in enumerate(labels))
        raise bad_field(field_name, f"must be one of {listed}; got {value!r}")
    return choices[value]


def _unsupported(body: GenerationFields) -> list[str]:
    """Warnings for A1111 features that would change the picture but are not available here."""
    notes = []
    if body.infotext:
        notes.append("infotext: not applied on this server; send the fields themselves")
    if not body.override_settings_restore_afterwards:
        notes.append("override_settings_restore_afterwards=false: override_settings only ever apply to "
                     "their own request here; use POST /sdapi/v1/options to change the defaults")
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        if body.firstphase_width or body.firstphase_height:
            notes.append("firstphase_width/height: ignored; width and height are the first pass's size")
    if isinstance(body, Img2ImgRequest) and body.initial_noise_multiplier not in (None, 1, 1.0):
        notes.append("initial_noise_multiplier: not available on this server; 1 was used")
    return notes


def prepare_generation(engine: EngineAPI, body: GenerationFields, options: ApiOptions) -> Prepared:
    """Validate `body` and build the GenerationRequest; raises ApiError naming an A1111 field."""
    names = dict(_API_NAMES)
    warnings = _unsupported(body)
    mode = "img2img" if isinstance(body, Img2ImgRequest) else "txt2img"
    script = scripts.choose(engine, body.script_name, body.script_args, mode, warnings)  # None: no script_name
    if script is not None:
        names.update(script.names)

    overrides = body.override_settings or {}
    unknown = [key for key in overrides if key not in OVERRIDES]
    if unknown:
        warnings.append(f"override_settings: ignored setting(s) {', '.join(map(repr, unknown))}; "
                        f"supported: {', '.join(OVERRIDES)}")
    defaults = options.snapshot()
    checkpoint, vae, clip_skip = _model_settings(engine, overrides, defaults, names)
    sampler, schedule_type, names["sampler"] = parse_sampler(body)
    controlnet_value, other_scripts = controlnet.split_scripts(body.alwayson_scripts)
    try:
        regional = _regional_fields(body, other_scripts, warnings, upload_limits(engine))
    except RequestError as exc:
        raise bad_field(exc.field, exc.message) from None
    control = controlnet.control_units(engine, controlnet_value, has_init_image=isinstance(body, Img2ImgRequest),
                                       limits=upload_limits(engine), warnings=warnings)
    prompt_units = image_prompts.image_prompt_units(engine, body.image_prompts, limits=upload_limits(engine),
                                                    control_count=len(control.units))
    fields: dict[str, Any] = dict(
        mode="txt2img", prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed,
        subseed=body.subseed, subseed_strength=body.subseed_strength, steps=body.steps,
        cfg_scale=body.cfg_scale, sampler=sampler, schedule_type=schedule_type,
        s_min_uncond=body.s_min_uncond or 0.0,
        seed_resize_from_w=body.seed_resize_from_w, seed_resize_from_h=body.seed_resize_from_h,
        **_size(engine, body, checkpoint), batch_size=body.batch_size, batch_count=body.n_iter,
        checkpoint=checkpoint.name, vae=vae, clip_skip=clip_skip, tiling=bool(body.tiling),
        tiny_vae_decode=body.tiny_vae_decode,
        distilled_cfg_scale=body.distilled_cfg_scale, shift=body.shift,
        save_images=bool(body.save_images and not body.do_not_save_samples and defaults.get("samples_save", True)),
        save_options=user_settings.save_options(defaults),
        extension_args=scripts.with_script(extension_args(engine, other_scripts, warnings), script),
        control_units=control.units + prompt_units,  # image prompts after the ControlNet units
    )
    fields.update(regional)  # regional prompts (may rewrite the prompt: the extension's Use base / common)
    fields.update(_face_fields(body, overrides, defaults, names))
    fields.update(forge_modules.module_fields(engine, overrides, defaults, names))  # Forge's VAE / Text Encoder
    fields.update(_other_checkpoints(engine, body))
    fields.update(speed_options.speed_fields(body, overrides, names))  # token merging, CFG cutoff, DeepCache
    if isinstance(body, Img2ImgRequest):
        fields.update(_img2img_fields(body, warnings, upload_limits(engine)))
    if script is not None and script.target == scripts.REQUEST_FIELDS:  # A1111's outpainting scripts
        fields.update(script.args)
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        fields.update(_hires_fields(body))
        names.update(hr_denoising_strength="denoising_strength", hr_sampler="hr_sampler_name",
                     hr_schedule_type="hr_scheduler")
    if body.styles:
        fields.update(_styled_prompts(engine, body.styles, fields))
    try:
        request = GenerationRequest(**fields)
    except RequestError as exc:
        raise bad_field(api_field_of(exc.field, names, control.arg_indices), exc.message) from None
    return Prepared(request=request, checkpoint=checkpoint, warnings=warnings, names=names,
                    styles=list(body.styles or []), control_args=control.arg_indices,
                    sd_upscale=script.args if script is not None and script.target == scripts.SD_UPSCALE else None)


def _regional_fields(body: GenerationFields, other_scripts: dict[str, Any], warnings: list[str],
                     limits: UploadLimits) -> dict[str, Any]:
    """Regional prompts: the body's `regions` and `regional_*`, or the Regional Prompter extension's
    `alwayson_scripts` arguments (taken out of `other_scripts`, so they are not an unknown extension)."""
    def decode_mask(name: str, text: Any) -> Image.Image:
        return decode_image(name, text, limits)

    fields = {"regions": regions.regions_from_entries(body.regions, decode_mask), "regional_mode": body.regional_mode,
              "regional_ratios": body.regional_ratios, "regional_base_ratios": body.regional_base_ratios}
    title = regions.SCRIPT_TITLE.lower()
    key = next((k for k in other_scripts if isinstance(k, str) and k.strip().lower() == title), None)
    if key is not None:
        value = other_scripts.pop(key)
        args = value.get("args", []) if isinstance(value, Mapping) else value
        extension, notes = regions.fields_from_script_args(body.prompt, args)
        fields.update(extension)
        warnings.extend(notes)
    return fields


def _face_fields(body: GenerationFields, overrides: Mapping[str, Any], defaults: Mapping[str, Any],
                 names: dict[str, str]) -> dict[str, Any]:
    """restore_faces (the body's; left out: the face_restoration option, as A1111), the restorer
    and CodeFormer's weight from override_settings or the server's options."""
    values = {key: KNOWN_OPTIONS[key].parse(f"override_settings.{key}", overrides[key]) if key in overrides
              else defaults.get(key, KNOWN_OPTIONS[key].default) for key in FACE_OPTIONS}
    for key, request_field in (("face_restoration_model", "face_restorer"), ("code_former_weight", None)):
        names[request_field or key] = f"override_settings.{key}" if key in overrides else key
    restore = body.restore_faces if body.restore_faces is not None else values["face_restoration"]
    return dict(restore_faces=restore, face_restorer=values["face_restoration_model"],
                code_former_weight=values["code_former_weight"])


def _other_checkpoints(engine: EngineAPI, body: GenerationFields) -> dict[str, Any]:
    """The refiner (switching at refiner_switch_at; absent: 0.8, A1111's UI default) and hires fix's
    checkpoint, as listed names; a 422 naming the field for a name the server does not list."""
    fields: dict[str, Any] = {}
    wanted = {"refiner_checkpoint": body.refiner_checkpoint}
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        wanted["hr_checkpoint_name"] = body.hr_checkpoint_name
    for name, value in wanted.items():
        if value not in (None, "", "None", "none", HR_SAME_CHECKPOINT):
            fields[name] = resolve_checkpoint_field(engine, name, value).name
    if body.refiner_switch_at is not None:
        fields["refiner_switch_at"] = body.refiner_switch_at
    return fields


def _size(engine: EngineAPI, body: GenerationFields, checkpoint: ModelFileInfo) -> dict[str, Any]:
    """width and height: the body's, or the checkpoint's native size for one it leaves out (as
    the UI starts from), so the demo model draws at 64 and SDXL at 1024; an explicit 512 stays."""
    native = None
    if body.width is None or body.height is None:
        native = engine.native_resolution(checkpoint.name)
    return {"width": native if body.width is None else body.width,
            "height": native if body.height is None else body.height}


def _model_settings(engine: EngineAPI, overrides: Mapping[str, Any], defaults: Mapping[str, Any],
                    names: dict[str, str]) -> tuple[ModelFileInfo, str, int]:
    """(checkpoint, VAE, clip skip): each from override_settings when given there, else from the
    server defaults; `names` learns which A1111 field each came from (for error messages)."""
    if overrides.get("sd_model_checkpoint") not in (None, ""):
        names["checkpoint"] = "override_settings.sd_model_checkpoint"
        checkpoint = resolve_checkpoint_field(engine, names["checkpoint"], overrides["sd_model_checkpoint"])
    else:
        names["checkpoint"] = "sd_model_checkpoint"
        if defaults["sd_model_checkpoint"]:
            checkpoint = resolve_checkpoint_field(engine, "sd_model_checkpoint", defaults["sd_model_checkpoint"])
        else:
            try:
                checkpoint = engine.resolve_checkpoint(None)
            except RequestError as exc:
                raise bad_field("sd_model_checkpoint", exc.message) from None
    if overrides.get("sd_vae") not in (None, ""):
        names["vae"], vae = "override_settings.sd_vae", overrides["sd_vae"]
    else:
        names["vae"], vae = "sd_vae", defaults["sd_vae"]
    if overrides.get("CLIP_stop_at_last_layers") not in (None, ""):
        names["clip_skip"] = "override_settings.CLIP_stop_at_last_layers"
        clip_skip = parse_clip_skip(names["clip_skip"], overrides["CLIP_stop_at_last_layers"])
    else:
        names["clip_skip"], clip_skip = "CLIP_stop_at_last_layers", defaults["CLIP_stop_at_last_layers"]
    return checkpoint, vae, clip_skip


def _styled_prompts(engine: EngineAPI, names: list[str], fields: Mapping[str, Any]) -> dict[str, str]:
    """The prompts with the named styles of styles.csv applied in order (A1111's rule). Hires
    prompts too when given; an empty one already follows the styled prompt."""
    database = style_database(engine)
    known = {style.name: style for style in (database.styles() if database is not None else [])}
    unknown = [name for name in names if name not in known]
    if unknown:
        listed = ", ".join(map(repr, known)) if known else "none (styles.csv is empty or missing)"
        raise bad_field("styles", f"unknown style(s) {', '.join(map(repr, unknown))}; available: {listed}")
    chosen = [known[name] for name in names]
    styled = dict(zip(("prompt", "negative_prompt"),
                      apply_styles(fields["prompt"] or "", fields["negative_prompt"] or "", chosen)))
    if fields.get("hr_prompt"):
        styled["hr_prompt"] = apply_styles(fields["hr_prompt"], "", chosen)[0]
    if fields.get("hr_negative_prompt"):
        styled["hr_negative_prompt"] = apply_styles("", fields["hr_negative_prompt"], chosen)[1]
    return styled


def _hires_fields(body: Txt2ImgRequest) -> dict[str, Any]:
    """A1111's hires fix fields; txt2img's `denoising_strength` is the second pass's."""
    sampler, schedule = body.hr_sampler_name, body.hr_scheduler
    if sampler not in (None, "", HR_SAME_SAMPLER) and sampler not in samplers.SAMPLER_NAMES:
        sampler, in_name = samplers.split_sampler_name(sampler)  # "DPM++ 2M Karras"
        schedule = schedule or in_name
    return dict(enable_hr=True, hr_scale=body.hr_scale, hr_upscaler=body.hr_upscaler or HR_DEFAULT_UPSCALER,
                hr_second_pass_steps=body.hr_second_pass_steps, hr_resize_x=body.hr_resize_x,
                hr_resize_y=body.hr_resize_y, hr_denoising_strength=body.denoising_strength,
                hr_sampler=sampler, hr_schedule_type=schedule, hr_prompt=body.hr_prompt or "",
                hr_negative_prompt=body.hr_negative_prompt or "")


def upload_limits(engine: EngineAPI) -> UploadLimits:
    """The engine's limits on uploaded images (`--max-upload-mb`, `--max-upload-megapixels`)."""
    return UploadLimits.of(engine.settings)


def max_body_bytes(engine: EngineAPI) -> int:
    """The largest request body worth reading: two images at the upload limit (init image and
    mask) as base64, plus room for the other fields. Bigger ones are refused unread."""
    return upload_limits(engine).max_bytes * 4 // 3 * 2 + (1 << 20)


def _img2img_fields(body: Img2ImgRequest, warnings: list[str], limits: UploadLimits) -> dict[str, Any]:
    if not body.init_images:
        raise bad_field("init_images", "img2img needs an input image: a list with one base64 image")
    init = decode_image("init_images.0", body.init_images[0], limits)
    if len(body.init_images) > 1:
        warnings.append(f"init_images: only the first of {len(body.init_images)} images is used")
    mask = decode_image("mask", body.mask, limits) if body.mask else None
    resize_mode = _choice("resize_mode", body.resize_mode, (*RESIZE_MODES, RESIZE_MODES[0]),
                          ("just resize", "crop and resize", "resize and fill", "just resize (latent upscale)"))
    if body.resize_mode == 3:
        warnings.append("resize_mode 3 (latent upscale) is not available; the image was resized in pixels (0)")
    values: dict[str, Any] = dict(mode="inpaint" if mask is not None else "img2img", init_image=init,
                                  denoising_strength=body.denoising_strength, resize_mode=resize_mode,
                                  soft_inpainting=body.soft_inpainting,
                                  **{side: getattr(body, side) for side in OUTPAINT_SIDES})
    if mask is not None:
        blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
        if body.mask_blur is None and body.mask_blur_x != body.mask_blur_y:
            warnings.append(f"mask_blur_x/mask_blur_y: separate blurs are not available; {blur} was used for both")
        if body.inpainting_mask_invert not in (0, 1):
            raise bad_field("inpainting_mask_invert", f"must be 0 (inpaint masked) or 1 (inpaint not masked), "
                                                      f"got {body.inpainting_mask_invert!r}")
        values.update(
            mask=mask, mask_blur=blur,
            inpainting_fill=_choice("inpainting_fill", body.inpainting_fill, INPAINT_FILLS, INPAINT_FILLS),
            inpaint_full_res=bool(body.inpaint_full_res),
            inpaint_full_res_padding=body.inpaint_full_res_padding,
            inpainting_mask_invert=bool(body.inpainting_mask_invert),
        )
    return values


def generation_parameters(body: GenerationFields, request: GenerationRequest | None = None) -> dict[str, Any]:
    """The `parameters` echo: the request as A1111 saw it, with every default filled in (an
    absent width/height as the size `request` was made at)."""
    params = body.model_dump()
    if request is not None:
        for name in ("width", "height"):
            if params.get(name) is None:
                params[name] = getattr(request, name)
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        params["init_images"] = None
        params["mask"] = None
    return params


def generation_info(prepared: Prepared, result) -> dict[str, Any]:
    """A1111's `info` object (Processed.js()), plus `warnings` and `interrupted`."""
    request = result.request or prepared.request
    total = request.batch_size * request.batch_count
    seeds = list(result.seeds) or ([request.seed + i for i in range(total)] if request.seed != -1 else [])
    subseeds = list(result.subseeds) or ([request.subseed + i for i in range(total)]
                                         if request.subseed != -1 else [])
    first = infotexts.parse_infotext(result.infotexts[0]) if result.infotexts else {}
    schedule = first.get("Schedule type") or samplers.resolve_schedule_type(request.sampler, request.schedule_type)
    file = prepared.checkpoint
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * len(seeds),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(seeds),
        "seed": seeds[0] if seeds else request.seed,
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else request.subseed,
        "all_subseeds": subseeds,
        "subseed_strength": request.subseed_strength,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler,
        "scheduler": schedule,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": request.restore_faces,
        "face_restoration_model": first.get("Face restoration") if request.restore_faces else None,
        "sd_model_name": first.get("Model") or file.stem,
        "sd_model_hash": first.get("Model hash") or file.short_hash,
        "sd_vae_name": first.get("VAE"),
        "sd_vae_hash": first.get("VAE hash"),
        "seed_resize_from_w": request.seed_resize_from_w or -1,  # A1111's "off" is -1
        "seed_resize_from_h": request.seed_resize_from_h or -1,
        "denoising_strength": (request.denoising_strength if request.mode != "txt2img"
                               else request.hr_denoising_strength if request.enable_hr else None),
        "extra_generation_params": {"Schedule type": schedule},
        "index_of_first_image": 0,
        "infotexts": list(result.infotexts),
        "memory": getattr(result, "memory", None),  # estimated peak, free memory, mode, retried
        "styles": prepared.styles,
        "job_timestamp": prepared.started.strftime("%Y%m%d%H%M%S"),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": bool(file.details.get("inpainting")),  # what the header says
        "version": first.get("Version"),
        "interrupted": bool(result.interrupted),
        "warnings": [*prepared.warnings, *result.warnings],
    }


# --- extras ---------------------------------------------------------------------------------

_UPSCALE_NAMES = {"upscaler": "upscaler_1", "scale": "upscaling_resize",
                  "target_width": "upscaling_resize_w", "target_height": "upscaling_resize_h",
                  "upscaler_2_visibility": "extras_upscaler_2_visibility", "image": "image"}


def upscale_request(body: ExtrasSingleImageRequest, image: Image.Image) -> UpscaleRequest | None:
    """None when no upscaler is chosen ("None"): A1111 then returns the image as it came."""
    faces = dict(gfpgan_visibility=body.gfpgan_visibility, codeformer_visibility=body.codeformer_visibility,
                 codeformer_weight=body.codeformer_weight)
    restoring = body.gfpgan_visibility > 0 or body.codeformer_visibility > 0
    if body.upscaler_1 in ("", "None") and not restoring:
        return None
    names = dict(_UPSCALE_NAMES)
    values: dict[str, Any] = dict(image=image, upscaler=body.upscaler_1, save_images=False, **faces)
    if body.upscaler_1 in ("", "None"):  # faces only: the size stays (Lanczos by 1 returns the image as it is)
        values.update(upscaler="Lanczos", scale=1.0)
        return _upscale(values, names)
    if body.upscaler_2 not in ("", "None") and body.extras_upscaler_2_visibility > 0:
        # A1111 caps the visibility at 1; the engine blends the second upscaler in
        values.update(upscaler_2=body.upscaler_2,
                      upscaler_2_visibility=min(float(body.extras_upscaler_2_visibility), 1.0))
    if body.resize_mode == 0:
        values["scale"] = body.upscaling_resize
    elif body.resize_mode == 1:
        if body.upscaling_crop:
            values.update(target_width=body.upscaling_resize_w, target_height=body.upscaling_resize_h)
        else:  # A1111 without crop: scale by the larger ratio, keep the aspect
            for name in ("upscaling_resize_w", "upscaling_resize_h"):
                if getattr(body, name) < 1:
                    raise bad_field(name, f"must be at least 1, got {getattr(body, name)}")
            values["scale"] = max(body.upscaling_resize_w / image.width, body.upscaling_resize_h / image.height)
            names["scale"] = "upscaling_resize_w"
    else:
        raise bad_field("resize_mode", f"must be 0 (scale by) or 1 (scale to), got {body.resize_mode!r}")
    return _upscale(values, names)


def _upscale(values: dict[str, Any], names: Mapping[str, str]) -> UpscaleRequest:
    try:
        return UpscaleRequest(**values)
    except RequestError as exc:
        raise bad_field(names.get(exc.field, exc.field), exc.message) from None


def upscale_error(exc: RequestError) -> ApiError:
    """The engine's RequestError about an upscale, naming the A1111 field."""
    return bad_field(_UPSCALE_NAMES.get(exc.field, exc.field), exc.message)


def dumps(info: Mapping[str, Any]) -> str:
    return json.dumps(info, ensure_ascii=False, default=str)
