"""Generation parameters of an image made by this app or by another one (for PNG Info).

Each reader turns one app's metadata into A1111 terms, so the UI shows one table and
"Send to txt2img" reuses the paste-parameters path (`infotext.request_fields_from_infotext`):

- A1111 / Forge / this app: the PNG `parameters` text chunk or the EXIF UserComment
  (JPEG/WebP), read by `outputs.read_infotext` and parsed by `infotext.parse_infotext`.
- ComfyUI: the `prompt` chunk (the API graph: {"<node id>": {"class_type", "inputs"}},
  an input wired to another node is `["<node id>", <output index>]`) and the `workflow`
  chunk (the editor graph: "nodes" with "widgets_values", "links"). WebP files carry
  them in EXIF Model/Make as "prompt:{...}" / "workflow:{...}".
- InvokeAI: the `invokeai_metadata` JSON chunk (3.x and later) and `sd-metadata` (2.x).
- Fooocus: `parameters` holding JSON (its own scheme; `fooocus_scheme` says "fooocus"),
  or A1111 text when `fooocus_scheme` is "a1111".

Sampler names are mapped to A1111's where A1111 has the same sampler; names without an
equivalent are kept as the app wrote them (pasting then leaves the sampler unchanged).
Nothing here raises on odd metadata: an unreadable part is just not found. No torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import IO, Any, Mapping

from PIL import Image

from pipelines.core import samplers
from pipelines.core.infotext import build_infotext, parse_infotext
from pipelines.core.metadata_values import (
    invoke_sampler,
    lora_tag,
    model_name,
    number,
    sampler_params,
    short_hash,
    size_text,
    with_loras,
)
from pipelines.core.outputs import read_infotext

# Formats, as shown to the user.
A1111 = "A1111 parameters"
FOOOCUS = "Fooocus"
COMFYUI = "ComfyUI"
INVOKEAI = "InvokeAI"
INVOKEAI_LEGACY = "InvokeAI 2.x (sd-metadata)"

# ComfyUI node types this reader understands (anything else is followed through its inputs).
_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_TEXT_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner")
_CHECKPOINT_NODES = ("CheckpointLoaderSimple", "CheckpointLoader", "ImageOnlyCheckpointLoader")
# widgets_values order of the editor graph's nodes (the inputs a user types in).
_WIDGETS = {
    "KSampler": ("seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "KSamplerAdvanced": ("add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name",
                         "scheduler", "start_at_step", "end_at_step", "return_with_leftover_noise"),
    "CLIPTextEncode": ("text",),
    "CheckpointLoaderSimple": ("ckpt_name",),
    "CheckpointLoader": ("config_name", "ckpt_name"),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "CLIPSetLastLayer": ("stop_at_clip_layer",),
    "LoraLoader": ("lora_name", "strength_model", "strength_clip"),
}


@dataclass(frozen=True)
class ImageMetadata:
    """What PNG Info shows for one image.

    format: which app's metadata was read ("" when none was found).
    raw: the metadata as stored (text, or each JSON chunk pretty-printed under its name).
    fields: A1111 keys ("Prompt", "Negative prompt", "Steps", "Sampler", ...) -> text.
    infotext: the same as an A1111 parameters text, for "Send to ..." (the paste path).
    """

    format: str = ""
    raw: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    infotext: str = ""

    @property
    def found(self) -> bool:
        return bool(self.format) and bool(self.infotext.strip())


def read_image_metadata(image_or_path: Image.Image | str | Any | IO[bytes]) -> ImageMetadata:
    """Metadata of an image (a PIL image, a path or a binary file). An unreadable file
    raises the usual OSError / PIL.UnidentifiedImageError; missing metadata does not."""
    if isinstance(image_or_path, Image.Image):
        return image_metadata(image_or_path)
    with Image.open(image_or_path) as image:
        return image_metadata(image)


def image_metadata(image: Image.Image) -> ImageMetadata:
    chunks = {key: _text(value) for key, value in image.info.items() if _text(value) is not None}
    _add_exif_chunks(image, chunks)
    scheme = (chunks.get("fooocus_scheme") or "").strip().casefold()
    text = chunks.get("parameters") or _safe(read_infotext, image)
    if text:
        data = _json_object(text)
        if data is not None and scheme != "a1111":
            return _fooocus(data, text)
        if data is None:
            label = f"{FOOOCUS} (A1111 scheme)" if scheme == "a1111" else A1111
            return ImageMetadata(label, text, parse_infotext(text), text)
    if "prompt" in chunks or "workflow" in chunks:
        result = _safe(_comfyui, chunks)
        if result is not None:
            return result
    for key, reader, label in (("invokeai_metadata", _invokeai, INVOKEAI), ("sd-metadata", _invokeai_legacy,
                                                                            INVOKEAI_LEGACY)):
        data = _json_object(chunks.get(key))
        if data is not None:
            prompt, negative, params = _safe(reader, data) or ("", "", {})
            return _result(label, _raw({key: data}), prompt, negative, params)
    return ImageMetadata(raw=_raw_chunks(chunks))


# --- helpers --------------------------------------------------------------------------------

def _safe(fn, *args):
    """Metadata in the wild is often malformed: a reader that trips over it finds nothing."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - any odd structure means "not this format"
        return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def _json_object(text: str | None) -> dict | None:
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _add_exif_chunks(image: Image.Image, chunks: dict[str, str]) -> None:
    """ComfyUI's WebP: EXIF Model (0x0110) "prompt:{...}", Make (0x010F) "workflow:{...}"."""
    try:
        exif = image.getexif()
    except Exception:  # noqa: BLE001
        return
    for tag in (0x010F, 0x0110):
        value = _text(exif.get(tag))
        if value and ":" in value:
            name, _, body = value.partition(":")
            if name in ("prompt", "workflow") and name not in chunks and body.lstrip().startswith("{"):
                chunks[name] = body


def _raw(parts: Mapping[str, Any]) -> str:
    return "\n\n".join(f"{name}:\n{json.dumps(value, indent=2, ensure_ascii=False)}"
                       for name, value in parts.items())


def _raw_chunks(chunks: Mapping[str, str]) -> str:
    """The image's other text chunks, so the user sees what there is (if anything)."""
    return "\n\n".join(f"{name}:\n{value}" for name, value in chunks.items() if len(value) < 20000)


def _result(label: str, raw: str, prompt: str, negative: str, params: Mapping[str, Any]) -> ImageMetadata:
    """A1111 fields and parameters text from one reader's findings (None values dropped)."""
    params = {key: value for key, value in params.items() if value not in (None, "")}
    text = build_infotext(prompt or "", negative or "", params)
    fields = parse_infotext(text)
    if len(fields) - 2 < len(params):  # fewer than three pairs: parse_infotext took them for prompt text
        fields = {"Prompt": (prompt or "").strip(), "Negative prompt": (negative or "").strip(),
                  **{key: str(value) for key, value in params.items()}}
    if not (prompt or negative or params):
        return ImageMetadata(raw=raw)
    return ImageMetadata(label, raw, fields, text)


# --- Fooocus --------------------------------------------------------------------------------

_FOOOCUS_EXTRAS = (("styles", "Styles"), ("performance", "Performance"), ("sharpness", "Sharpness"),
                   ("refiner_model", "Refiner"), ("refiner_switch", "Refiner switch at"),
                   ("version", "Version"))


def _fooocus(data: dict, text: str) -> ImageMetadata:
    prompt, negative = str(data.get("prompt") or ""), str(data.get("negative_prompt") or "")
    params: dict[str, Any] = {"Steps": number(data.get("steps")),
                              **sampler_params(data.get("sampler"), data.get("scheduler")),
                              "CFG scale": number(data.get("guidance_scale")), "Seed": number(data.get("seed"))}
    resolution = data.get("resolution")  # "(1152, 896)" or [1152, 896]
    numbers = re.findall(r"\d+", resolution if isinstance(resolution, str) else json.dumps(resolution))
    if len(numbers) == 2:
        params["Size"] = size_text(numbers[0], numbers[1])
    params["Model hash"] = data.get("base_model_hash")
    params["Model"] = model_name(data.get("base_model"))
    clip_skip = number(data.get("clip_skip"))
    if isinstance(clip_skip, int) and clip_skip > 1:
        params["Clip skip"] = clip_skip
    loras = [lora_tag(name, weight) for name, weight in _fooocus_loras(data)]
    prompt = with_loras(prompt, [tag for tag in loras if tag])
    for key, label in _FOOOCUS_EXTRAS:
        value = data.get(key)
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        if value not in (None, "", "None"):
            params[label] = value
    pretty = json.dumps(data, indent=2, ensure_ascii=False)
    result = _result(FOOOCUS, pretty, prompt, negative, params)
    return result if result.found else ImageMetadata(raw=text)


def _fooocus_loras(data: dict) -> list[list[str]]:
    """Fooocus writes LoRAs as "lora_combined_1": "name.safetensors : 0.5" (newer versions put
    the file's hash between name and weight)."""
    return [[parts[0], parts[-1]] for key, value in data.items()
            if key.startswith("lora_combined_") and isinstance(value, str)
            for parts in [value.split(" : ")] if len(parts) >= 2]


# --- ComfyUI --------------------------------------------------------------------------------

def _comfyui(chunks: Mapping[str, str]) -> ImageMetadata | None:
    prompt_graph = _json_object(chunks.get("prompt"))
    workflow = _json_object(chunks.get("workflow"))
    graph = _api_graph(prompt_graph) if prompt_graph else None
    if not graph and workflow:
        graph = _safe(_graph_from_workflow, workflow)
    if not graph:
        return None
    raw = _raw({name: data for name, data in (("prompt", prompt_graph), ("workflow", workflow)) if data})
    prompt, negative, params = _read_comfy_graph(graph)
    result = _result(COMFYUI, raw, prompt, negative, params)
    return result if result.found else None


def _api_graph(data: dict) -> dict[str, dict]:
    """{"id": {"class_type": ..., "inputs": {...}}} with only well-formed nodes."""
    return {str(node_id): node for node_id, node in data.items()
            if isinstance(node, dict) and isinstance(node.get("class_type"), str)
            and isinstance(node.get("inputs", {}), dict)}


def _graph_from_workflow(workflow: dict) -> dict[str, dict]:
    """The editor graph in the API graph's shape: widget values by name, links as [id, slot]."""
    link_source = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 3:  # [link id, from node, from slot, to node, to slot, type]
            link_source[link[0]] = [str(link[1]), link[2]]
        elif isinstance(link, dict) and "id" in link:
            link_source[link["id"]] = [str(link.get("origin_id")), link.get("origin_slot", 0)]
    graph = {}
    for node in workflow.get("nodes") or []:
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            continue
        inputs: dict[str, Any] = {}
        widgets = node.get("widgets_values")
        if isinstance(widgets, list):
            inputs.update(zip(_WIDGETS.get(node["type"], ()), widgets))
        for slot in node.get("inputs") or []:
            if isinstance(slot, dict) and slot.get("link") in link_source:
                inputs[slot.get("name")] = link_source[slot["link"]]
        graph[str(node.get("id"))] = {"class_type": node["type"], "inputs": inputs}
    return graph


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _upstream(graph: dict, value: Any, wanted: tuple[str, ...], depth: int = 8) -> dict | None:
    """The first node of a wanted type found by following a link upwards (through other
    nodes' linked inputs: LoRA loaders, conditioning combiners, reroutes)."""
    if depth == 0 or not _is_link(value):
        return None
    node = graph.get(str(value[0]))
    if node is None:
        return None
    if node["class_type"] in wanted:
        return node
    for item in node.get("inputs", {}).values():
        found = _upstream(graph, item, wanted, depth - 1)
        if found is not None:
            return found
    return None


def _resolved(graph: dict, value: Any, depth: int = 4) -> Any:
    """A widget value, or the value of the primitive/text node it is wired to."""
    while _is_link(value) and depth > 0:
        node = graph.get(str(value[0])) or {}
        inputs = node.get("inputs", {})
        value = next((inputs[key] for key in ("text", "string", "value", "seed", "noise_seed", "int")
                      if key in inputs), None)
        depth -= 1
    return None if _is_link(value) else value


def _conditioning_text(graph: dict, link: Any) -> str:
    node = _upstream(graph, link, _TEXT_NODES)
    if node is None:
        return ""
    inputs = node["inputs"]
    parts = [_resolved(graph, inputs.get(key)) for key in ("text", "text_g", "text_l")]
    texts = list(dict.fromkeys(str(part) for part in parts if isinstance(part, str) and part.strip()))
    return "\n".join(texts)


def _read_comfy_graph(graph: dict[str, dict]) -> tuple[str, str, dict[str, Any]]:
    nodes = sorted(graph.items(), key=lambda item: number(item[0]) if number(item[0]) is not None else 1e18)
    sampler = next((node for _, node in nodes if node["class_type"] in _SAMPLER_NODES), None)
    if sampler is None:  # no sampler: at least the first prompt and checkpoint
        text = next((node for _, node in nodes if node["class_type"] in _TEXT_NODES), None)
        prompt = _resolved(graph, text["inputs"].get("text")) if text else ""
        checkpoint = next((node for _, node in nodes if node["class_type"] in _CHECKPOINT_NODES), None)
        return (prompt if isinstance(prompt, str) else "", "",
                {"Model": model_name(checkpoint["inputs"].get("ckpt_name")) if checkpoint else None})
    inputs = sampler["inputs"]
    prompt = _conditioning_text(graph, inputs.get("positive"))
    negative = _conditioning_text(graph, inputs.get("negative"))
    seed = _resolved(graph, inputs.get("seed", inputs.get("noise_seed")))
    params: dict[str, Any] = {"Steps": number(_resolved(graph, inputs.get("steps"))),
                              **sampler_params(_resolved(graph, inputs.get("sampler_name")),
                                                _resolved(graph, inputs.get("scheduler"))),
                              "CFG scale": number(_resolved(graph, inputs.get("cfg"))), "Seed": number(seed)}
    latent = _upstream(graph, inputs.get("latent_image"), ("EmptyLatentImage", "EmptySD3LatentImage"))
    if latent is not None:
        params["Size"] = size_text(_resolved(graph, latent["inputs"].get("width")),
                               _resolved(graph, latent["inputs"].get("height")))
    checkpoint = _upstream(graph, inputs.get("model"), _CHECKPOINT_NODES)
    if checkpoint is not None:
        params["Model"] = model_name(checkpoint["inputs"].get("ckpt_name"))
    denoise = number(_resolved(graph, inputs.get("denoise")))
    if denoise is not None and denoise < 1:
        params["Denoising strength"] = denoise
    clip_layer = next((number(node["inputs"].get("stop_at_clip_layer")) for _, node in nodes
                       if node["class_type"] == "CLIPSetLastLayer"), None)
    if isinstance(clip_layer, int) and clip_layer < -1:
        params["Clip skip"] = -clip_layer
    loras = [lora_tag(node["inputs"].get("lora_name"), node["inputs"].get("strength_model"),
                       node["inputs"].get("strength_clip"))
             for _, node in nodes if node["class_type"] == "LoraLoader"]
    return with_loras(prompt, [tag for tag in loras if tag]), negative, params


# --- InvokeAI -------------------------------------------------------------------------------

def _invokeai(data: dict) -> tuple[str, str, dict[str, Any]]:
    model = data.get("model")
    if isinstance(model, dict):
        checkpoint, model_hash = model.get("name") or model.get("model_name"), model.get("hash")
    else:
        checkpoint, model_hash = model, None
    if isinstance(model_hash, str) and ":" in model_hash:  # "blake3:..." is no A1111 hash
        model_hash = None
    params: dict[str, Any] = {
        "Steps": number(data.get("steps")), **invoke_sampler(data.get("scheduler")),
        "CFG scale": number(data.get("cfg_scale")), "Seed": number(data.get("seed")),
        "Size": size_text(data.get("width"), data.get("height")), "Model hash": model_hash,
        "Model": model_name(checkpoint),
    }
    strength = number(data.get("strength"))
    if data.get("generation_mode") not in (None, "txt2img", "sdxl_txt2img") and strength is not None:
        params["Denoising strength"] = strength
    clip_skip = number(data.get("clip_skip"))
    if isinstance(clip_skip, int) and clip_skip > 0:
        params["Clip skip"] = clip_skip + 1  # InvokeAI counts the layers skipped, A1111 the last layer used
    tags = []
    for entry in data.get("loras") or []:
        if isinstance(entry, dict):
            lora = entry.get("model") or entry.get("lora") or {}
            name = lora.get("name") or lora.get("model_name") if isinstance(lora, dict) else None
            tags.append(lora_tag(name, entry.get("weight")))
    prompt = with_loras(str(data.get("positive_prompt") or ""), [tag for tag in tags if tag])
    return prompt, str(data.get("negative_prompt") or ""), params


def _split_invoke_negative(prompt: str) -> tuple[str, str]:
    """InvokeAI 2.x wrote the negative prompt in square brackets inside the prompt."""
    negative = re.findall(r"\[([^\[\]]*)\]", prompt)
    positive = re.sub(r"\s*\[[^\[\]]*\]", "", prompt).strip()
    return positive, ", ".join(part.strip() for part in negative if part.strip())


def _invokeai_legacy(data: dict) -> tuple[str, str, dict[str, Any]]:
    image = data.get("image") if isinstance(data.get("image"), dict) else {}
    prompt = image.get("prompt", "")
    if isinstance(prompt, list):  # [{"prompt": "...", "weight": 1.0}, ...]
        prompt = " ".join(str(part.get("prompt", "")) for part in prompt if isinstance(part, dict))
    prompt, negative = _split_invoke_negative(str(prompt or ""))
    sampler = image.get("sampler")
    try:
        name, schedule = samplers.parse_sampler_name(sampler)  # "k_euler_a" and friends
        found = {"Sampler": name, **({"Schedule type": schedule} if schedule != "Automatic" else {})}
    except (ValueError, TypeError):
        found = {"Sampler": sampler} if isinstance(sampler, str) else {}
    params: dict[str, Any] = {
        "Steps": number(image.get("steps")), **found, "CFG scale": number(image.get("cfg_scale")),
        "Seed": number(image.get("seed")), "Size": size_text(image.get("width"), image.get("height")),
        "Model hash": short_hash(data.get("model_hash")),
        "Model": model_name(data.get("model_weights") or data.get("model_id")),
    }
    if image.get("type") == "img2img":
        params["Denoising strength"] = number(image.get("strength"))
    return prompt, negative, params
