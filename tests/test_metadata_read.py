"""PNG Info: generation parameters of images made by this app, A1111, ComfyUI, InvokeAI, Fooocus.

Every image here is built by hand with the chunks each app writes (PIL's PngInfo), and the
A1111 parameters text PNG Info derives must paste into the same request fields.
"""

from __future__ import annotations

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.core.infotext import request_fields_from_infotext
from pipelines.core.metadata_read import A1111, COMFYUI, FOOOCUS, INVOKEAI, INVOKEAI_LEGACY, read_image_metadata


def png_with(**chunks: str) -> io.BytesIO:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key.replace("_", "-") if key == "sd_metadata" else key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 80, 120)).save(buffer, "PNG", pnginfo=info)
    buffer.seek(0)
    return buffer


A1111_TEXT = """a castle on a hill, <lora:add_detail:0.8>
Negative prompt: blurry, lowres
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, \
Model hash: 7f96a1a9ca, Model: anything-v5, Clip skip: 2, Version: v1.10.1"""

# ComfyUI's API graph (the `prompt` chunk) of the default workflow plus a LoRA loader and clip skip.
COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "_meta": {"title": "KSampler"},
          "inputs": {"seed": 1566802087, "steps": 24, "cfg": 7.5, "sampler_name": "dpmpp_2m",
                     "scheduler": "karras", "denoise": 1.0, "model": ["10", 0], "positive": ["6", 0],
                     "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "SD1.5/v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode",
          "inputs": {"text": "beautiful scenery nature glass bottle landscape, purple galaxy bottle",
                     "clip": ["10", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["10", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "add_detail.safetensors", "strength_model": 0.8,
                                                  "strength_clip": 0.8, "model": ["4", 0], "clip": ["11", 0]}},
    "11": {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2, "clip": ["4", 1]}},
}

# The editor graph (the `workflow` chunk): widget values by position, links as
# [link id, from node, from slot, to node, to slot, type].
COMFY_WORKFLOW = {
    "last_node_id": 9, "last_link_id": 9, "version": 0.4,
    "nodes": [
        {"id": 3, "type": "KSampler", "widgets_values": [42, "fixed", 30, 5.5, "euler_ancestral", "normal", 1],
         "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                    {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                    {"name": "latent_image", "type": "LATENT", "link": 2}]},
        {"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["sd_xl_base_1.0.safetensors"]},
        {"id": 5, "type": "EmptyLatentImage", "widgets_values": [1024, 832, 1]},
        {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a photo of a cat wearing a hat"],
         "inputs": [{"name": "clip", "type": "CLIP", "link": 3}]},
        {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["blurry"],
         "inputs": [{"name": "clip", "type": "CLIP", "link": 5}]},
        {"id": 8, "type": "VAEDecode", "inputs": [{"name": "samples", "type": "LATENT", "link": 7},
                                                  {"name": "vae", "type": "VAE", "link": 8}]},
        {"id": 9, "type": "SaveImage", "widgets_values": ["ComfyUI"],
         "inputs": [{"name": "images", "type": "IMAGE", "link": 9}]},
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
              [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
              [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
}

INVOKE_METADATA = {
    "generation_mode": "txt2img", "positive_prompt": "a lighthouse at dusk, dramatic sky",
    "negative_prompt": "lowres, jpeg artifacts", "width": 768, "height": 512, "seed": 3456789,
    "rand_device": "cpu", "cfg_scale": 7.5, "cfg_rescale_multiplier": 0, "steps": 30, "scheduler": "dpmpp_2m_k",
    "clip_skip": 1,
    "model": {"key": "c1f2", "hash": "blake3:9a1b2c", "name": "Deliberate v2", "base": "sd-1", "type": "main"},
    "loras": [{"model": {"key": "a1", "hash": "blake3:77", "name": "detail_tweaker", "base": "sd-1",
                         "type": "lora"}, "weight": 0.6}],
    "app_version": "4.2.4",
}

INVOKE_LEGACY = {
    "model": "stable diffusion", "model_weights": "stable-diffusion-1.5",
    "model_hash": "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
    "app_id": "invoke-ai/InvokeAI", "app_version": "2.2.4",
    "image": {"prompt": [{"prompt": "a red barn in the snow [blurry, people]", "weight": 1.0}], "steps": 50,
              "cfg_scale": 7.5, "threshold": 0, "perlin": 0, "height": 512, "width": 640, "seed": 1234,
              "seamless": False, "hires_fix": False, "type": "txt2img", "postprocessing": None,
              "sampler": "k_euler_a", "variations": []},
}

FOOOCUS_PARAMETERS = {
    "adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion.safetensors",
    "base_model_hash": "aeb7e9e689", "clip_skip": 2, "full_negative_prompt": ["unrealistic, saturated"],
    "full_prompt": ["a cozy cabin in the woods, cinematic"], "guidance_scale": 4,
    "lora_combined_1": "sd_xl_offset_example-lora_1.0.safetensors : 0.1", "metadata_scheme": "fooocus",
    "negative_prompt": "", "performance": "Speed", "prompt": "a cozy cabin in the woods",
    "refiner_model": "None", "refiner_switch": 0.5, "resolution": "(1152, 896)", "sampler": "dpmpp_2m_sde_gpu",
    "scheduler": "karras", "seed": "1234567", "sharpness": 2, "steps": 30,
    "styles": "['Fooocus V2', 'Fooocus Enhance']", "vae": "Default (model)", "version": "Fooocus v2.5.5",
}


def test_a1111_parameters_chunk():
    meta = read_image_metadata(png_with(parameters=A1111_TEXT))
    assert meta.found and meta.format == A1111
    assert meta.raw == meta.infotext == A1111_TEXT
    assert meta.fields["Prompt"] == "a castle on a hill, <lora:add_detail:0.8>"
    assert meta.fields["Sampler"] == "DPM++ 2M" and meta.fields["Schedule type"] == "Karras"


def test_a1111_jpeg_exif_user_comment():
    image = Image.new("RGB", (16, 16))
    exif = image.getexif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111_TEXT.encode("utf-16-be")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    buffer.seek(0)
    meta = read_image_metadata(buffer)
    assert meta.format == A1111 and meta.fields["Seed"] == "1234567890"


def test_comfyui_prompt_graph_maps_to_a1111_fields():
    meta = read_image_metadata(png_with(prompt=json.dumps(COMFY_PROMPT), workflow=json.dumps(COMFY_WORKFLOW)))
    assert meta.found and meta.format == COMFYUI
    fields = meta.fields
    # the LoRA loader between checkpoint and sampler becomes an A1111 LoRA tag
    assert fields["Prompt"] == ("beautiful scenery nature glass bottle landscape, purple galaxy bottle, "
                                "<lora:add_detail:0.8>")
    assert fields["Negative prompt"] == "text, watermark"
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"]) == ("24", "DPM++ 2M", "Karras")
    assert (fields["CFG scale"], fields["Seed"], fields["Size"]) == ("7.5", "1566802087", "512x768")
    assert fields["Model"] == "v1-5-pruned-emaonly" and fields["Clip skip"] == "2"
    assert "Denoising strength" not in fields  # txt2img: denoise 1.0
    assert '"class_type": "KSampler"' in meta.raw and "workflow:" in meta.raw

    pasted = request_fields_from_infotext(meta.infotext)
    assert (pasted["sampler"], pasted["schedule_type"], pasted["steps"]) == ("DPM++ 2M", "Karras", 24)
    assert (pasted["cfg_scale"], pasted["seed"], pasted["width"], pasted["height"]) == (7.5, 1566802087, 512, 768)
    assert pasted["clip_skip"] == 2 and pasted["model_name"] == "v1-5-pruned-emaonly"


def test_comfyui_workflow_alone():
    meta = read_image_metadata(png_with(workflow=json.dumps(COMFY_WORKFLOW)))
    assert meta.format == COMFYUI
    fields = meta.fields
    assert fields["Prompt"] == "a photo of a cat wearing a hat" and fields["Negative prompt"] == "blurry"
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"]) == ("30", "Euler a", "Uniform")
    assert (fields["CFG scale"], fields["Seed"], fields["Size"]) == ("5.5", "42", "1024x832")
    assert fields["Model"] == "sd_xl_base_1.0"


def test_comfyui_img2img_denoise_and_unknown_sampler_kept():
    graph = json.loads(json.dumps(COMFY_PROMPT))
    graph["3"]["inputs"].update(denoise=0.55, sampler_name="heunpp2")
    meta = read_image_metadata(png_with(prompt=json.dumps(graph)))
    assert meta.fields["Denoising strength"] == "0.55"
    assert meta.fields["Sampler"] == "heunpp2"  # no A1111 equivalent: shown as ComfyUI wrote it
    assert "sampler" not in request_fields_from_infotext(meta.infotext)  # and pasting leaves it alone


def test_invokeai_metadata():
    meta = read_image_metadata(png_with(invokeai_metadata=json.dumps(INVOKE_METADATA)))
    assert meta.found and meta.format == INVOKEAI
    fields = meta.fields
    assert fields["Prompt"] == "a lighthouse at dusk, dramatic sky, <lora:detail_tweaker:0.6>"
    assert fields["Negative prompt"] == "lowres, jpeg artifacts"
    assert (fields["Sampler"], fields["Schedule type"], fields["Steps"]) == ("DPM++ 2M", "Karras", "30")
    assert (fields["Size"], fields["Seed"], fields["Model"], fields["Clip skip"]) == (
        "768x512", "3456789", "Deliberate v2", "2")
    assert "Model hash" not in fields  # InvokeAI's blake3 hash is no A1111 short hash


def test_invokeai_legacy_sd_metadata():
    meta = read_image_metadata(png_with(sd_metadata=json.dumps(INVOKE_LEGACY)))
    assert meta.format == INVOKEAI_LEGACY
    fields = meta.fields
    assert fields["Prompt"] == "a red barn in the snow" and fields["Negative prompt"] == "blurry, people"
    assert (fields["Sampler"], fields["Steps"], fields["Size"]) == ("Euler a", "50", "640x512")
    assert fields["Model hash"] == "cc6cb27103" and fields["Model"] == "stable-diffusion-1.5"


def test_fooocus_json_parameters():
    meta = read_image_metadata(png_with(parameters=json.dumps(FOOOCUS_PARAMETERS), fooocus_scheme="fooocus"))
    assert meta.found and meta.format == FOOOCUS
    fields = meta.fields
    assert fields["Prompt"] == "a cozy cabin in the woods, <lora:sd_xl_offset_example-lora_1.0:0.1>"
    assert (fields["Sampler"], fields["Schedule type"], fields["CFG scale"]) == ("DPM++ 2M SDE", "Karras", "4")
    assert (fields["Seed"], fields["Size"], fields["Steps"]) == ("1234567", "1152x896", "30")
    assert (fields["Model"], fields["Model hash"], fields["Clip skip"]) == (
        "juggernautXL_v8Rundiffusion", "aeb7e9e689", "2")
    assert fields["Styles"] == "['Fooocus V2', 'Fooocus Enhance']"
    assert request_fields_from_infotext(meta.infotext)["width"] == 1152


def test_fooocus_a1111_scheme_is_read_as_a1111_text():
    meta = read_image_metadata(png_with(parameters=A1111_TEXT, fooocus_scheme="a1111"))
    assert meta.format == "Fooocus (A1111 scheme)" and meta.fields["Steps"] == "28"


def test_no_metadata_and_broken_metadata_are_not_found():
    assert not read_image_metadata(png_with()).found
    for chunks in ({"prompt": "{not json"}, {"workflow": '{"nodes": 5}'}, {"prompt": '{"3": {"class_type": 7}}'},
                   {"invokeai_metadata": "[1, 2]"}, {"sd_metadata": '{"image": "x"}'},
                   {"parameters": '{"unrelated": true}'}, {"Software": "GIMP"}):
        meta = read_image_metadata(png_with(**chunks))
        assert not meta.found, chunks
        assert meta.format == "" and meta.fields == {}
    # other text chunks are shown raw, so the user sees what the image does carry
    assert "GIMP" in read_image_metadata(png_with(Software="GIMP")).raw


def test_comfyui_webp_carries_its_graphs_in_exif():
    image = Image.new("RGB", (16, 16))
    exif = image.getexif()
    exif[0x0110] = "prompt:" + json.dumps(COMFY_PROMPT)  # Model
    exif[0x010F] = "workflow:" + json.dumps(COMFY_WORKFLOW)  # Make
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", exif=exif)
    buffer.seek(0)
    meta = read_image_metadata(buffer)
    assert meta.format == COMFYUI and meta.fields["Steps"] == "24"
