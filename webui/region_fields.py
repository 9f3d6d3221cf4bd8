"""The "Regional prompts" accordion's components: their names, and UI values <-> `GenerationRequest.regions`.

Pure translations like `webui.convert` (no gradio, no torch). Region row i has the components
"region_<i>_<field>": `prompt` (a row with an empty prompt is off), `weight` (0..1: the region's
share in its pixels, the rest the base prompt's), `shape` ("Box" or "Mask"), the box's `left`,
`top`, `right`, `bottom` in percent of the picture, and `mask`, a sketch canvas value (whatever
is painted on it is the region; it is stretched to the picture's size). The prompt syntax's
settings are request fields under their own names (`regional_mode`, `regional_ratios`,
`regional_base_ratios`). `layout_preview` draws what the job will use.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from PIL import Image, ImageChops, ImageDraw, ImageFont

from pipelines.core.regions import MAX_REGIONS, Region, layout_of, region_from_fields
from pipelines.core.request import RequestError

REGION_ROWS = min(4, MAX_REGIONS)  # rows in the accordion
SHAPES = ("Box", "Mask")
BOX_SIDES = ("left", "top", "right", "bottom")
REGION_FIELDS = ("prompt", "weight", "shape", *BOX_SIDES, "mask")
REGION_LABELS = {"prompt": "Prompt", "weight": "Weight", "shape": "Shape", "left": "Left %", "top": "Top %",
                 "right": "Right %", "bottom": "Bottom %", "mask": "Painted mask"}
DEFAULT_BOX = (0.0, 0.0, 50.0, 100.0)  # a new row: the left half
# the preview's colours, one per region (the base prompt's area stays grey)
COLOURS = ((230, 60, 60), (60, 110, 235), (50, 180, 80), (235, 180, 40), (170, 80, 210), (40, 190, 200),
           (240, 120, 30), (130, 130, 130))
PREVIEW_SIDE = 384  # the preview's longer side, in pixels
BASE_GREY = (235, 235, 235)
_NAME = re.compile(r"region_(\d+)_(\w+)$")


def region_field(index: int, field: str) -> str:
    return f"region_{index}_{field}"


def split_region_field(name: str) -> tuple[int, str] | None:
    """(row index, field) of a region component's name; None for any other name."""
    match = _NAME.match(name)
    if match is None or match.group(2) not in REGION_FIELDS:
        return None
    return int(match.group(1)), match.group(2)


def region_title(index: int) -> str:
    return f"Region {index + 1}"


def region_where(field: str) -> str | None:
    """"Region i: Label (field)" for a region component's name; None for any other field."""
    found = split_region_field(field)
    if found is None:
        return None
    return f"{region_title(found[0])}: {REGION_LABELS[found[1]]} ({found[1]})"


# --- UI values -> regions ----------------------------------------------------------------------------

def painted_mask(value: Any) -> Image.Image | None:
    """What is painted on a sketch canvas value ({"background", "layers", "composite"}) as an "L"
    picture, white where painted (a layer's alpha); None when nothing is."""
    if value is None:
        return None
    layers = (value.get("layers") or []) if isinstance(value, Mapping) else [value]
    mask = None
    for layer in (_as_pil(layer) for layer in layers if layer is not None):
        alpha = layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L")
        mask = alpha if mask is None else ImageChops.lighter(mask, alpha.resize(mask.size))
    if mask is None or mask.getbbox() is None:
        return None
    return mask


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    return Image.open(image) if isinstance(image, str) else Image.fromarray(image)


def region_from_ui(index: int, values: Mapping[str, Any], width: int, height: int) -> Region:
    """Row `index`'s Region; a bad value names the row's component."""
    def fail(field: str, message: str) -> RequestError:
        return RequestError(region_field(index, field), message)

    fields: dict[str, Any] = {"prompt": values.get("prompt") or "", "weight": values.get("weight", 1.0)}
    if values.get("shape", SHAPES[0]) == SHAPES[1]:
        mask = painted_mask(values.get("mask"))
        if mask is None:
            raise fail("mask", "paint the region on the canvas (or choose Box)")
        fields["mask"] = mask.resize((width, height), Image.BILINEAR)
    else:
        left, top, right, bottom = (float(values.get(side, default) or 0.0)
                                    for side, default in zip(BOX_SIDES, DEFAULT_BOX))
        if right <= left:
            raise fail("right", f"must be right of Left ({right:g}% <= {left:g}%)")
        if bottom <= top:
            raise fail("bottom", f"must be below Top ({bottom:g}% <= {top:g}%)")
        fields["box"] = (left / 100, top / 100, right / 100, bottom / 100)
    try:
        return region_from_fields(index, fields)
    except RequestError as exc:
        field = exc.field.rsplit(".", 1)[-1]
        raise fail(field if field in REGION_FIELDS else "prompt", exc.message) from None


def regions_from_ui(region_values: Mapping[int, Mapping[str, Any]], width: int | None,
                    height: int | None) -> tuple[Region, ...]:
    """The request's `regions` from the rows' values by row index: every row with a prompt, in
    order; masks at the picture's size (`width` x `height`)."""
    size = int(width or 512), int(height or 512)
    return tuple(region_from_ui(index, values, *size) for index, values in sorted(region_values.items())
                 if str(values.get("prompt") or "").strip())


# --- regions -> UI values (pasted parameters) -----------------------------------------------------

def region_values(regions: Sequence[Region], rows: int) -> dict[str, Any]:
    """The rows' component values for pasted `regions` (the infotext carries boxes only): each of
    the first `rows` regions fills its row, the rows after them are emptied."""
    values: dict[str, Any] = {}
    for index in range(rows):
        region = regions[index] if index < len(regions) else None
        if region is None or region.box is None:
            values[region_field(index, "prompt")] = ""
            continue
        values.update({region_field(index, "prompt"): region.prompt, region_field(index, "weight"): region.weight,
                       region_field(index, "shape"): SHAPES[0]})
        values.update({region_field(index, side): round(share * 100, 2) for side, share in zip(BOX_SIDES, region.box)})
    return values


# --- the preview ---------------------------------------------------------------------------------------

def preview_size(width: int, height: int) -> tuple[int, int]:
    scale = PREVIEW_SIDE / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def blank_preview(width: int, height: int) -> Image.Image:
    """The preview of a picture without a layout: grey, where only the base prompt acts."""
    return Image.new("RGB", preview_size(width, height), BASE_GREY)


def layout_preview(request_like: Any) -> Image.Image:
    """The layout a request will use, drawn over its canvas (scaled): each region in its colour
    (weaker where its mask is soft), numbered; grey where only the base prompt acts. `request_like`
    has prompt, regions, regional_mode / _ratios / _base_ratios, width, height."""
    size = preview_size(int(request_like.width or 512), int(request_like.height or 512))
    canvas = blank_preview(*size)
    layout = layout_of(request_like)
    if layout is None:
        return canvas
    draw = ImageDraw.Draw(canvas)
    for number, region in enumerate(layout.regions):
        colour = COLOURS[number % len(COLOURS)]
        coverage = region.coverage(*size).point(lambda v: v * 6 // 10)  # 60% colour over the canvas
        canvas.paste(Image.new("RGB", size, colour), (0, 0), coverage)
        box = region.coverage(*size).getbbox()
        if box is not None:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=colour, width=2)
            draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), str(number + 1), fill=(0, 0, 0), anchor="mm",
                      font=ImageFont.load_default(size=max(12, min(size) // 8)))
    return canvas
