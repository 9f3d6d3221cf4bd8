"""A1111 "parameters" text: what we write, and what pasting a text restores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from pipelines.core.infotext import (
    build_infotext,
    generation_params,
    parse_infotext,
    request_fields_from_infotext,
)
from pipelines.core.request import GenerationRequest
from pipelines.core.samplers import split_sampler_name

# A real-looking A1111 1.6 text: quoted values with commas and colons, a pre-1.9 sampler name
# carrying the schedule, a LoRA tag whose colons must stay in the prompt.
A1111_TEXT = """masterpiece, best quality, 1girl, <lora:add_detail:0.8>, (detailed eyes:1.2)
Negative prompt: (worst quality, low quality:1.4), easynegative
Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, \
Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.45, Clip skip: 2, \
Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, \
Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03, bad-hands: 1a2b3c", \
Version: v1.6.0"""

CIVITAI_TEXT = """a photo of a lighthouse at dusk
Negative prompt: blurry
Steps: 25, CFG scale: 4.5, Sampler: Euler a, Seed: 42, Size: 832x1216, \
Created Date: 2024-05-01T12:34:56.789Z, \
Civitai resources: [{"type":"checkpoint","modelVersionId":128078,"modelName":"SDXL, base"}], \
Civitai metadata: {"remixOfId": 1}"""


def _params(request: GenerationRequest, **overrides) -> dict:
    kwargs = dict(seed=request.seed, subseed=request.subseed, width=request.width or 512,
                  height=request.height or 512, model_name="v1-5-pruned-emaonly",
                  model_hash="6ce0161689", version="sdui-0.1.0")
    kwargs.update(overrides)
    return generation_params(request, **kwargs)


def test_txt2img_text_has_a1111_layout_and_key_order():
    request = GenerationRequest(prompt="a cat", negative_prompt="blurry", seed=1234, steps=20,
                                cfg_scale=7.0, sampler="DPM++ 2M", schedule_type="Karras",
                                width=512, height=512)
    text = build_infotext(request.prompt, request.negative_prompt, _params(request))
    assert text.split("\n") == [
        "a cat",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, "
        "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, "
        "Version: sdui-0.1.0",
    ]


def test_negative_prompt_line_omitted_when_empty_and_none_dropped():
    text = build_infotext("a dog", "", {"Steps": 20, "Sampler": "Euler", "Model hash": None, "Seed": 3})
    assert text == "a dog\nSteps: 20, Sampler: Euler, Seed: 3"


def test_values_with_separators_are_json_quoted():
    text = build_infotext("p", "", {"Steps": 1, "Lora hashes": "a: 1, b: 2", "Note": 'say "hi"', "Seed": 1})
    assert 'Lora hashes: "a: 1, b: 2"' in text
    assert 'Note: "say \\"hi\\""' in text
    parsed = parse_infotext(text)
    assert parsed["Lora hashes"] == "a: 1, b: 2"
    assert parsed["Note"] == 'say "hi"'


def test_optional_keys_appear_only_when_they_apply():
    plain = _params(GenerationRequest(seed=1, subseed=2))
    assert "Variation seed" not in plain and "Denoising strength" not in plain and "Clip skip" not in plain

    varied = _params(GenerationRequest(seed=1, subseed=2, subseed_strength=0.25, clip_skip=2))
    keys = list(varied)
    assert varied["Variation seed"] == 2 and varied["Variation seed strength"] == 0.25
    assert varied["Clip skip"] == 2
    assert keys.index("Model") < keys.index("Variation seed") < keys.index("Clip skip") < keys.index("Version")


def test_inpaint_keys_and_extras_go_before_version():
    image = Image.new("RGB", (64, 64))
    request = GenerationRequest(mode="inpaint", init_image=image, mask=image, seed=5, subseed=6,
                                denoising_strength=0.6, mask_blur=4, inpaint_full_res=True,
                                inpaint_full_res_padding=32, inpainting_mask_invert=True,
                                inpainting_fill="fill")
    params = _params(request, vae_name="vae-ft-mse", vae_hash="735e4c3a44",
                     extra={"Lora hashes": "x: 1", "Schedule type": "Karras"})
    keys = list(params)
    assert params["Denoising strength"] == 0.6
    assert params["Mask mode"] == "Inpaint not masked"
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == 32
    assert params["Masked content"] == "fill" and params["Mask blur"] == 4
    # the resolved schedule passed as an extra keeps its place after the sampler
    assert keys[:3] == ["Steps", "Sampler", "Schedule type"] and params["Schedule type"] == "Karras"
    assert keys.index("VAE hash") < keys.index("VAE") < keys.index("Denoising strength")
    assert keys.index("Masked content") < keys.index("Lora hashes") < keys.index("Version") == len(keys) - 1


def test_round_trip_restores_request_fields():
    request = GenerationRequest(
        prompt="a castle on a hill, (sunset:1.2)\nsecond line of prompt",
        negative_prompt="blurry, lowres\nwatermark", seed=987654321, subseed=42,
        subseed_strength=0.35, steps=33, cfg_scale=6.5, sampler="DPM++ 2M SDE",
        schedule_type="Exponential", width=768, height=512, clip_skip=2)
    text = build_infotext(request.prompt, request.negative_prompt, _params(request))
    fields = request_fields_from_infotext(text)
    assert fields.pop("model_name") == "v1-5-pruned-emaonly"
    assert fields.pop("model_hash") == "6ce0161689"
    rebuilt = GenerationRequest().replace(**fields)
    for name in ("prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "steps",
                 "cfg_scale", "sampler", "schedule_type", "width", "height", "clip_skip"):
        assert getattr(rebuilt, name) == getattr(request, name), name


def test_round_trip_img2img_inpaint_fields():
    image = Image.new("RGB", (64, 64))
    request = GenerationRequest(mode="inpaint", init_image=image, mask=image, prompt="x", seed=1,
                                subseed=1, denoising_strength=0.55, mask_blur=9,
                                inpaint_full_res=True, inpaint_full_res_padding=48,
                                inpainting_mask_invert=True, inpainting_fill="latent noise")
    fields = request_fields_from_infotext(build_infotext("x", "", _params(request)))
    assert fields["denoising_strength"] == 0.55
    assert fields["mask_blur"] == 9 and fields["inpaint_full_res"] is True
    assert fields["inpaint_full_res_padding"] == 48 and fields["inpainting_mask_invert"] is True
    assert fields["inpainting_fill"] == "latent noise"


def test_parses_real_a1111_text_with_quoted_values():
    info = parse_infotext(A1111_TEXT)
    assert info["Prompt"].endswith("<lora:add_detail:0.8>, (detailed eyes:1.2)")
    assert info["Negative prompt"] == "(worst quality, low quality:1.4), easynegative"
    assert info["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert info["TI hashes"] == "easynegative: c74b4e810b03, bad-hands: 1a2b3c"
    assert info["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert (info["Size-1"], info["Size-2"]) == ("512", "768")
    assert info["Version"] == "v1.6.0"

    fields = request_fields_from_infotext(A1111_TEXT)
    assert fields["sampler"] == "DPM++ 2M" and fields["schedule_type"] == "Karras"
    assert fields["steps"] == 28 and fields["cfg_scale"] == 7.0 and fields["seed"] == 1234567890
    assert (fields["width"], fields["height"]) == (512, 768)
    assert fields["denoising_strength"] == 0.45 and fields["clip_skip"] == 2
    assert fields["model_name"] == "anything-v5" and fields["model_hash"] == "7f96a1a9ca"
    GenerationRequest().replace(**{k: v for k, v in fields.items() if not k.startswith(("model_", "vae_"))})


def test_parses_civitai_text_with_bracketed_json_values():
    info = parse_infotext(CIVITAI_TEXT)
    assert info["Created Date"] == "2024-05-01T12:34:56.789Z"
    assert info["Civitai resources"].startswith("[{") and info["Civitai resources"].endswith("}]")
    assert info["Civitai metadata"] == '{"remixOfId": 1}'
    fields = request_fields_from_infotext(CIVITAI_TEXT)
    assert fields["sampler"] == "Euler a" and fields["schedule_type"] == "Automatic"
    assert (fields["width"], fields["height"]) == (832, 1216) and fields["cfg_scale"] == 4.5
    # absent keys mean A1111's defaults
    assert fields["clip_skip"] == 1 and fields["subseed_strength"] == 0.0


def test_missing_negative_prompt_and_multiline_prompt():
    text = "line one\nline two\nSteps: 10, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64"
    info = parse_infotext(text)
    assert info["Prompt"] == "line one\nline two"
    assert info["Negative prompt"] == ""
    assert info["Steps"] == "10"


def test_text_without_parameters_line_is_all_prompt():
    info = parse_infotext("just a prompt, with: colons\nNegative prompt: bad")
    assert info == {"Prompt": "just a prompt, with: colons", "Negative prompt": "bad"}
    fields = request_fields_from_infotext("just a prompt")
    assert fields == {"prompt": "just a prompt", "negative_prompt": ""}


def test_bad_values_and_unknown_keys_are_ignored_without_raising():
    text = ("p\nSteps: many, Sampler: Restart, Schedule type: Align Your Steps, CFG scale: nan, "
            "Seed: -5, Size: 513x9999, Clip skip: 99, Denoising strength: 2, Foo: bar, junk")
    fields = request_fields_from_infotext(text)
    assert fields == {"prompt": "p", "negative_prompt": "", "subseed_strength": 0.0,
                      "seed_resize_from_w": 0, "seed_resize_from_h": 0, "tiling": False,
                      "restore_faces": False, "s_min_uncond": 0.0, "s_min_uncond_all": False,
                      "skip_early_cond": 0.0, "soft_inpainting": False, "deepcache_interval": 1,
                      "tiny_vae_decode": False, "token_merging_ratio": 0.0}  # absent: off
    assert request_fields_from_infotext("") == {"prompt": "", "negative_prompt": ""}
    assert parse_infotext("Steps: 1, Seed: 2, Sampler: \"unterminated")["Sampler"] == '"unterminated'


def test_windows_line_endings():
    info = parse_infotext("a\r\nNegative prompt: b\r\nSteps: 1, Seed: 2, CFG scale: 3")
    assert (info["Prompt"], info["Negative prompt"], info["CFG scale"]) == ("a", "b", "3")


def test_split_sampler_name():
    assert split_sampler_name("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_sampler_name("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert split_sampler_name("DPM2 a Karras") == ("DPM2 a", "Karras")
    assert split_sampler_name("Euler a") == ("Euler a", None)
    assert split_sampler_name("DPM++ 2M SDE") == ("DPM++ 2M SDE", None)


def test_module_does_not_import_torch():
    code = ("import sys, pipelines.core.infotext, pipelines.generate.images, pipelines.core.outputs, "
            "pipelines.generate.upscalers; print('torch' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"


def test_hires_settings_come_back_from_a_pasted_text():
    text = ("a cat\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
            "Seed: 5, Size: 512x512, Model: m, Denoising strength: 0.45, Hires upscale: 2, Hires steps: 10, "
            "Hires upscaler: Latent, Version: v1.10.1")
    fields = request_fields_from_infotext(text)
    assert fields["enable_hr"] is True and fields["hr_scale"] == 2.0
    assert fields["hr_second_pass_steps"] == 10 and fields["hr_upscaler"] == "Latent"
    # A1111 writes the second pass's strength as "Denoising strength"; img2img reads it too
    assert fields["hr_denoising_strength"] == 0.45 and fields["denoising_strength"] == 0.45
    assert "enable_hr" not in request_fields_from_infotext(text.replace(", Hires upscale: 2, Hires steps: 10, "
                                                                        "Hires upscaler: Latent", ""))
