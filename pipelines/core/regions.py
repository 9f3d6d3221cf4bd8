"""Regional prompts (layout-to-image): different prompts for different parts of the picture.

A `Region` is a part of the canvas (a box, or a painted mask) with its own prompt and weight;
the request's prompt is the base prompt, which conditions the pixels outside every region and
the base's share inside them. `generate/regions.py` runs them as masked cross-attention.

The prompt alone can carry a layout too, in the syntax of the Regional Prompter extension
(hako-mikan/sd-webui-regional-prompter, its "Matrix" mode):

    a garden ADDCOMM         <- common: put in front of every region's prompt (and the base)
    a sunny day ADDBASE      <- base: the base prompt; the base ratio is its share in each region
    blue sky ADDCOL          <- regions, from the top left: ADDCOL starts the next column,
    a tree ADDROW               ADDROW the next row (BREAK counts as the next cell)
    red flowers

`regional_mode` says which split comes first. "Columns" (the extension's default): the picture
is cut into rows at ADDROW, each row into cells at ADDCOL. "Rows": into columns at ADDCOL, each
column into cells at ADDROW. `regional_ratios` gives the sizes, as the extension reads them:
"1,2" for one split (two cells, the second twice as wide); with ";" in "Columns" mode each
";"-group is a row whose first number is its height and the rest its cells' widths
("1,2,1,1;2,4,6": a row of height 1 with cells 2,1,1, then a row of height 2 with cells 4,6);
in "Rows" mode the groups are ","-separated columns with ";"-separated cells. A level whose
count of sizes does not match the prompt's parts is split equally (the extension's rule).
`regional_base_ratios`: one number for every region, or one per region ("0.2,0.3").

Torch-free: the UI and the infotext reader use it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from PIL import Image, ImageDraw

from pipelines.core.checks import RequestError, check_choice, check_number, check_text

ADDCOMM, ADDBASE, ADDCOL, ADDROW, BREAK = "ADDCOMM", "ADDBASE", "ADDCOL", "ADDROW", "BREAK"
LAYOUT_KEYWORDS = (ADDCOMM, ADDBASE, ADDCOL, ADDROW)
REGIONAL_MODES = ("Columns", "Rows")  # the extension's "Matrix submode" names
DEFAULT_BASE_RATIO = "0.2"  # the extension's default base ratio
MAX_REGIONS = 16
COMMON_JOIN = ", "  # "best quality ADDCOMM red hair" -> "best quality, red hair"

_WORD = r"(?<![A-Za-z0-9_]){}(?![A-Za-z0-9_])"
_KEYWORD_RE = re.compile("|".join(_WORD.format(k) for k in LAYOUT_KEYWORDS))


@dataclass(frozen=True)
class Region:
    """A part of the canvas with its own prompt. `box`: (left, top, right, bottom) as shares of
    the width and height (0..1), or `mask`: a picture of the canvas's size, white = this region,
    grey = partly (soft edges). `weight`: the share of this region's prompt in its pixels; the
    rest is the base prompt's (1: its own prompt only)."""

    prompt: str
    box: tuple[float, float, float, float] | None = None
    mask: Image.Image | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        check_text("prompt", self.prompt)
        if (self.box is None) == (self.mask is None):
            raise RequestError("box", "give a region either a box or a mask")
        if self.box is not None:
            object.__setattr__(self, "box", checked_box(self.box))
        if self.mask is not None and not isinstance(self.mask, Image.Image):
            raise RequestError("mask", "must be an image (white = the region)")
        weight = check_number("weight", self.weight)
        if not 0.0 <= weight <= 1.0:
            raise RequestError("weight", f"must be between 0 and 1, got {weight:g}")
        object.__setattr__(self, "weight", weight)

    def coverage(self, width: int, height: int) -> Image.Image:
        """The region on a `width` x `height` canvas: an "L" picture, 255 = fully inside."""
        if self.mask is not None:
            return self.mask.convert("L").resize((width, height), Image.BILINEAR)
        # drawn 4x larger and box-filtered down: a border inside a pixel covers it partly
        scale = 4
        big = Image.new("L", (width * scale, height * scale), 0)
        left, top, right, bottom = self.box
        corners = (left * width * scale, top * height * scale, right * width * scale - 1, bottom * height * scale - 1)
        ImageDraw.Draw(big).rectangle(corners, fill=255)
        return big.resize((width, height), Image.BOX)


@dataclass(frozen=True)
class Layout:
    """What a job conditions where: `base_prompt` everywhere outside the regions (and its share
    inside them), each region's prompt in its part. The SDXL pooled embedding is the base's."""

    base_prompt: str
    regions: tuple[Region, ...]


def checked_box(box: Any) -> tuple[float, float, float, float]:
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        raise RequestError("box", "must be [left, top, right, bottom], shares of the width and height (0 to 1)")
    left, top, right, bottom = (check_number("box", v) for v in box)
    if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
        raise RequestError("box", f"must have 0 <= left < right <= 1 and 0 <= top < bottom <= 1, got {list(box)}")
    return left, top, right, bottom


def check_regions(regions: Any, width: int | None = None, height: int | None = None) -> tuple[Region, ...]:
    """A request's regions as a tuple; errors name `regions[i].field`. A mask must have the
    canvas's size (`width` x `height`, when known)."""
    if regions is None:
        return ()
    if isinstance(regions, Region) or not isinstance(regions, (list, tuple)):
        raise RequestError("regions", "must be a list of regions")
    if len(regions) > MAX_REGIONS:
        raise RequestError("regions", f"at most {MAX_REGIONS} regions are allowed, got {len(regions)}")
    for index, region in enumerate(regions):
        if not isinstance(region, Region):
            raise RequestError(f"regions[{index}]", "must be a region (a box or a mask, a prompt and a weight)")
        if region.mask is not None and width and height and region.mask.size != (width, height):
            raise RequestError(f"regions[{index}].mask", f"is {region.mask.width}x{region.mask.height}; it must "
                                                         f"have the image's size, {width}x{height}")
    return tuple(regions)


def region_from_fields(index: int, fields: Mapping[str, Any]) -> Region:
    """A region from named fields (an API body's entry); errors name `regions[index].field`."""
    try:
        return Region(**fields)
    except RequestError as error:
        raise RequestError(f"regions[{index}].{error.field}", error.message) from None
    except TypeError:
        unknown = sorted(set(fields) - {"prompt", "box", "mask", "weight"}) or ["prompt"]
        raise RequestError(f"regions[{index}].{unknown[0]}", "unknown or missing field; a region has prompt, "
                                                             "box or mask, and weight") from None


# --- the prompt syntax ---------------------------------------------------------------------------

def has_layout_keywords(prompt: str) -> bool:
    return bool(_KEYWORD_RE.search(prompt))


def _split_words(text: str, *words: str) -> list[str]:
    pattern = "|".join(_WORD.format(w) for w in words)
    return [part.strip() for part in re.split(pattern, text)]


def _numbers(text: str, field: str) -> list[float]:
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise RequestError(field, f"{item.strip()!r} is not a number (e.g. \"1,1\" or \"1,2,1;1,1\")") from None
        if not value > 0 or value == float("inf"):
            raise RequestError(field, f"sizes must be positive numbers, got {item.strip()!r}")
        values.append(value)
    return values


def _sizes(given: list[float] | None, count: int) -> list[float]:
    """Shares of a level: the given sizes normalised when their count matches, else equal."""
    if given is None or len(given) != count:
        given = [1.0] * count
    total = sum(given)
    return [v / total for v in given]


def parse_ratios(ratios: str, mode: str) -> tuple[list[float] | None, list[list[float]] | None, list[float] | None]:
    """`regional_ratios` as (group sizes, cell sizes per group, or a 1-D list); unused parts None."""
    check_choice("regional_mode", mode, REGIONAL_MODES)
    text = ratios.strip().replace(" ", "")
    if not text:
        return None, None, None
    if ";" not in text:
        return None, None, _numbers(text, "regional_ratios")
    group_sep, cell_sep = (";", ",") if mode == "Columns" else (",", ";")
    groups, cells = [], []
    for group in text.split(group_sep):
        values = _numbers(group.replace(cell_sep, ","), "regional_ratios")
        groups.append(values[0])
        cells.append(values[1:] or values[:1])
    return groups, cells, None


def check_syntax(mode: str, ratios: str, base_ratios: str) -> None:
    """The prompt syntax's settings alone (the request checks them even without a layout)."""
    check_text("regional_ratios", ratios)
    check_text("regional_base_ratios", base_ratios)
    parse_ratios(ratios, mode)
    base_weights(base_ratios, 1)


def base_weights(base_ratios: str, count: int) -> list[float]:
    """Each region's weight from the base ratios: one number for all, or one per region (the last
    one repeats). A base ratio b gives the region's own prompt the share 1 - b."""
    text = base_ratios.strip().replace(" ", "") or "0"
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise RequestError("regional_base_ratios", f"{item!r} is not a number between 0 and 1") from None
        if not 0.0 <= value <= 1.0:
            raise RequestError("regional_base_ratios", f"must be between 0 and 1, got {item}")
        values.append(value)
    return [1.0 - values[min(i, len(values) - 1)] for i in range(count)]


def _grid(parts: list[list[str]], mode: str, ratios: str) -> list[tuple[float, float, float, float]]:
    """Boxes of the cells, in the prompt's order (groups, then cells in each group)."""
    groups, cells, flat = parse_ratios(ratios, mode)
    if flat is not None:
        if len(parts) == 1:
            cells = [flat]
        elif all(len(p) == 1 for p in parts):
            groups = flat
    group_shares = _sizes(groups, len(parts))
    boxes, start = [], 0.0
    for index, (group, share) in enumerate(zip(parts, group_shares)):
        given = cells[index] if cells is not None and index < len(cells) else None
        end = 1.0 if index == len(parts) - 1 else start + share
        cell_start = 0.0
        cell_shares = _sizes(given, len(group))
        for cell_index, cell_share in enumerate(cell_shares):
            cell_end = 1.0 if cell_index == len(group) - 1 else cell_start + cell_share
            if mode == "Columns":  # groups are rows (top to bottom), cells go left to right
                boxes.append((cell_start, start, cell_end, end))
            else:
                boxes.append((start, cell_start, end, cell_end))
            cell_start = cell_end
        start = end
    return boxes


def split_prompt(prompt: str, mode: str = "Columns", ratios: str = "",
                 base_ratios: str = DEFAULT_BASE_RATIO) -> Layout | None:
    """The layout a prompt's Regional Prompter syntax describes; None when it has none (no
    ADDCOL / ADDROW / ADDBASE / ADDCOMM, and no ratios with BREAK). See the module doc."""
    check_syntax(mode, ratios, base_ratios)
    if not has_layout_keywords(prompt) and not (ratios.strip() and _split_words(prompt, BREAK)[1:]):
        return None
    common = ""
    if re.search(_WORD.format(ADDCOMM), prompt):
        common, prompt = (part.strip() for part in re.split(_WORD.format(ADDCOMM), prompt, maxsplit=1))
    base = None
    if re.search(_WORD.format(ADDBASE), prompt):
        base, prompt = (part.strip() for part in re.split(_WORD.format(ADDBASE), prompt, maxsplit=1))
    group_word, cell_word = (ADDROW, ADDCOL) if mode == "Columns" else (ADDCOL, ADDROW)
    parts = [_split_words(group, cell_word, BREAK) for group in _split_words(prompt, group_word)]
    boxes = _grid(parts, mode, ratios)
    texts = [with_common(common, text) for group in parts for text in group]
    if len(texts) > MAX_REGIONS:
        raise RequestError("prompt", f"at most {MAX_REGIONS} regions are allowed, the layout has {len(texts)}")
    weights = base_weights(base_ratios, len(texts)) if base is not None else [1.0] * len(texts)
    regions = tuple(Region(prompt=text, box=box, weight=weight) for text, box, weight in zip(texts, boxes, weights))
    # without ADDBASE the regions cover the canvas: the first one stands for the base (SDXL's pooled text)
    return Layout(base_prompt=with_common(common, base) if base is not None else texts[0], regions=regions)


def with_common(common: str, text: str) -> str:
    return COMMON_JOIN.join(t for t in (common, text) if t) if common else text


def request_layout(prompt: str, regions: Sequence[Region], mode: str = "Columns", ratios: str = "",
                   base_ratios: str = DEFAULT_BASE_RATIO) -> Layout | None:
    """A request's layout: its regions with the prompt as the base, or the prompt's own syntax;
    None when it has neither."""
    if regions:
        if has_layout_keywords(prompt):
            raise RequestError("regions", "give regions or a prompt with ADDCOL / ADDROW / ADDBASE / ADDCOMM, "
                                          "not both")
        return Layout(base_prompt=prompt, regions=tuple(regions))
    return split_prompt(prompt, mode, ratios, base_ratios)


def layout_of(request: Any, prompt: str | None = None) -> Layout | None:
    """`request_layout` of a GenerationRequest (duck-typed: core.request imports this module),
    for its prompt or another one (hires fix's `hr_prompt`)."""
    return request_layout(request.prompt if prompt is None else prompt, request.regions, request.regional_mode,
                          request.regional_ratios, request.regional_base_ratios)


def checked_request_regions(request: Any) -> tuple[Region, ...]:
    """A GenerationRequest's `regions`, checked with the syntax settings and its layout (bad
    ratios, too many regions, regions and keywords both: a RequestError naming the field)."""
    found = check_regions(request.regions, request.width, request.height)
    check_syntax(request.regional_mode, request.regional_ratios, request.regional_base_ratios)
    request_layout(request.prompt, found, request.regional_mode, request.regional_ratios,
                   request.regional_base_ratios)
    return found


# --- the API ---------------------------------------------------------------------------------------

SCRIPT_TITLE = "Regional Prompter"  # the extension's `alwayson_scripts` key
# its script arguments, in its order (`process`): active, debug, divide mode, matrix submode, mask
# submode, prompt submode, ratios, base ratios, use base, use common, use common negative, calc mode
_ARG_ACTIVE, _ARG_MODE, _ARG_SUBMODE, _ARG_RATIOS, _ARG_BASE_RATIOS, _ARG_BASE, _ARG_COMMON, _ARG_CALC = \
    0, 2, 3, 6, 7, 8, 9, 11


def regions_from_entries(entries: Any, decode_mask: Callable[[str, Any], Image.Image] | None = None
                         ) -> tuple[Region, ...]:
    """An API body's `regions`: a list of {"prompt", "box" or "mask", "weight"}. `decode_mask(field,
    value)` turns a mask's text into a picture (the API's base64 decoder, which names the field).
    Errors name `regions[i].field`."""
    if entries is None:
        return ()
    if not isinstance(entries, (list, tuple)):
        raise RequestError("regions", "must be a list of {prompt, box or mask, weight}")
    found = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise RequestError(f"regions[{index}]", "must be an object with prompt, box or mask, and weight")
        entry = dict(entry)
        if isinstance(entry.get("mask"), str) and decode_mask is not None:
            entry["mask"] = decode_mask(f"regions[{index}].mask", entry["mask"])
        found.append(region_from_fields(index, entry))
    return check_regions(found)


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() == "true"


def keywords_for_flags(prompt: str, use_base: bool, use_common: bool) -> str:
    """The extension's "Use common prompt" / "Use base prompt" checkboxes as keywords: the first
    BREAK-separated part becomes the common prompt, the next one the base (its order)."""
    for wanted, keyword in ((use_common, ADDCOMM), (use_base, ADDBASE)):
        if wanted and not re.search(_WORD.format(keyword), prompt):
            prompt = re.sub(_WORD.format(BREAK), keyword, prompt, count=1)
    return prompt


def fields_from_script_args(prompt: str, args: Any) -> tuple[dict[str, Any], list[str]]:
    """Request fields from the extension's `alwayson_scripts` arguments, and notes for what runs
    otherwise than asked. Inactive: no fields. Its Matrix mode only; "Latent" runs as Attention."""
    if not isinstance(args, (list, tuple)):
        raise RequestError("alwayson_scripts.Regional Prompter.args", "must be a list of the extension's arguments")

    def arg(index: int, default: Any) -> Any:
        return args[index] if index < len(args) and args[index] is not None else default

    if not _flag(arg(_ARG_ACTIVE, False)):
        return {}, []
    notes = []
    if str(arg(_ARG_MODE, "Matrix")) != "Matrix":
        notes.append(f"Regional Prompter: {arg(_ARG_MODE, '')} mode is not supported; the prompt is split as a "
                     "Matrix (ADDCOL / ADDROW / BREAK), or give `regions` with masks")
    if str(arg(_ARG_CALC, "Attention")) != "Attention":
        notes.append("Regional Prompter: Latent mode runs as Attention mode (masked cross-attention)")
    submode = {"Horizontal": "Columns", "Vertical": "Rows"}.get(str(arg(_ARG_SUBMODE, "Columns")),
                                                               str(arg(_ARG_SUBMODE, "Columns")))
    ratios = str(arg(_ARG_RATIOS, ""))
    prompt = keywords_for_flags(prompt, _flag(arg(_ARG_BASE, False)), _flag(arg(_ARG_COMMON, False)))
    if not has_layout_keywords(prompt) and not ratios.strip():
        ratios = "1,1"  # active with BREAK alone: the extension's default ratios
    return {"prompt": prompt, "regional_mode": submode, "regional_ratios": ratios,
            "regional_base_ratios": str(arg(_ARG_BASE_RATIOS, DEFAULT_BASE_RATIO))}, notes


# --- the infotext --------------------------------------------------------------------------------

REGIONS_KEY = "Regions"  # ours: the API's box regions as JSON (masks are pictures, not text)


def infotext_params(prompt: str, regions: Sequence[Region], mode: str, ratios: str,
                    base_ratios: str) -> dict[str, Any]:
    """The infotext entries of a request's layout: the Regional Prompter's keys (as the
    extension writes them) for the prompt syntax, `Regions` for regions given as boxes."""
    if regions:
        boxes = [{"prompt": r.prompt, "box": [round(v, 4) for v in r.box], "weight": r.weight}
                 for r in regions if r.box is not None]
        return {REGIONS_KEY: json.dumps(boxes)} if boxes else {}
    if split_prompt(prompt, mode, ratios, base_ratios) is None:
        return {}
    return {"RP Active": True, "RP Divide mode": "Matrix", "RP Matrix submode": mode,
            "RP Mask submode": "Mask", "RP Prompt submode": "Prompt", "RP Calc Mode": "Attention",
            "RP Ratios": ratios or "1,1", "RP Base Ratios": base_ratios,
            "RP Use Base": bool(re.search(_WORD.format(ADDBASE), prompt)),
            "RP Use Common": bool(re.search(_WORD.format(ADDCOMM), prompt)), "RP Use Ncommon": False}


def request_infotext_params(request: Any) -> dict[str, Any]:
    """`infotext_params` of a GenerationRequest (duck-typed)."""
    return infotext_params(request.prompt, request.regions, request.regional_mode, request.regional_ratios,
                           request.regional_base_ratios)


def fields_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields from a parsed infotext: the Regional Prompter's keys (its older "Horizontal"
    / "Vertical" submodes too) and our `Regions`. Entries that do not parse are left out."""
    fields: dict[str, Any] = {}
    if str(params.get("RP Active", "")).strip().lower() == "true":
        mode = str(params.get("RP Matrix submode", "")).strip()
        mode = {"Horizontal": "Columns", "Vertical": "Rows"}.get(mode, mode)
        if mode in REGIONAL_MODES:
            fields["regional_mode"] = mode
        if "RP Ratios" in params:
            fields["regional_ratios"] = str(params["RP Ratios"]).strip()
        if "RP Base Ratios" in params:
            fields["regional_base_ratios"] = str(params["RP Base Ratios"]).strip()
        try:
            check_syntax(fields.get("regional_mode", "Columns"), fields.get("regional_ratios", ""),
                         fields.get("regional_base_ratios", DEFAULT_BASE_RATIO))
        except RequestError:  # a pasted text never makes a request fail: its bad settings are left out
            for name in ("regional_mode", "regional_ratios", "regional_base_ratios"):
                fields.pop(name, None)
        prompt = str(params.get("Prompt", ""))  # the extension's own texts may say "Use Base" with BREAK only
        flagged = keywords_for_flags(prompt, _flag(params.get("RP Use Base")), _flag(params.get("RP Use Common")))
        if flagged != prompt:
            fields["prompt"] = flagged
    if REGIONS_KEY in params:
        try:
            entries = json.loads(params[REGIONS_KEY]) if isinstance(params[REGIONS_KEY], str) else params[REGIONS_KEY]
            fields["regions"] = tuple(region_from_fields(i, e) for i, e in enumerate(entries))
        except (ValueError, TypeError, RequestError):
            pass
    return fields
