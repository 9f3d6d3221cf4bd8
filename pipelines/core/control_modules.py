"""The control preprocessors' table: sd-webui-controlnet's module names, sliders and weights.

A preprocessor ("module") turns a unit's image into the map a control model was trained on
(edges, depth, ...). Each row says what the extension's `/controlnet/module_list` says about it:
its name (what clients send), its label (the UI's alias: "depth" shows as "depth_midas"), the
preprocessor-resolution slider and its two threshold sliders (None where unused), which
annotator weights it needs (None: built in), and `model_hint`, the part of a control model's
file name it goes with ("canny" -> control_v11p_sd15_canny).

Also the rules that follow from the table alone: a unit's thresholds with the defaults filled
in and checked, the `module_detail` the extension's API reports, and its pixel-perfect rule.
The work itself is `pipelines.generate.control_preprocess`.

Torch-free, so the UI can build its sliders from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pipelines.core.checks import RequestError
from pipelines.core.control import CONTROL_RESIZE_MODES, NO_MODULE, ControlUnit

RESIZE_AND_FILL = CONTROL_RESIZE_MODES[2]
ANNOTATORS_SOURCE = "https://huggingface.co/lllyasviel/Annotators"  # where the extension gets its weights


class Slider(NamedTuple):
    label: str
    minimum: float
    maximum: float
    default: float
    step: float = 1.0


@dataclass(frozen=True)
class AnnotatorFiles:
    """The weights a network preprocessor reads, in the extension's `annotator/downloads/<folder>/`
    layout (also under models/ControlNet-annotators/<folder>/)."""

    folder: str
    files: tuple[str, ...]
    source: str = ANNOTATORS_SOURCE
    transformers: bool = False  # a transformers model folder (config.json + weights) that we run


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str
    resolution: Slider | None
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    needs: AnnotatorFiles | None = None  # None: built in, nothing to download
    model_hint: str = ""  # "": goes with any control model

    @property
    def built_in(self) -> bool:
        return self.needs is None


RESOLUTION = Slider("Preprocessor Resolution", 64, 2048, 512)
RECOLOR_GAMMA = Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001)


def _transformers_depth(folder: str, repository: str) -> AnnotatorFiles:
    files = ("config.json", "model.safetensors", "preprocessor_config.json")  # what save_pretrained writes
    return AnnotatorFiles(folder, files, f"https://huggingface.co/{repository}", transformers=True)


def _row(name: str, label: str = "", resolution: Slider | None = RESOLUTION, a: Slider | None = None,
         b: Slider | None = None, needs: AnnotatorFiles | None = None, hint: str = "") -> Preprocessor:
    return Preprocessor(name, label or name, resolution, a, b, needs, hint)


def _files(folder: str, *files: str, source: str = ANNOTATORS_SOURCE) -> AnnotatorFiles:
    return AnnotatorFiles(folder, files, source)


_OPENPOSE = _files("openpose", "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_HED = _files("hed", "ControlNetHED.pth")
_PIDINET = _files("pidinet", "table5_pidinet.pth")
_LERES = _files("leres", "res101.pth", "latest_net_G.pth")
_MIDAS_DEPTH = _transformers_depth("midas", "Intel/dpt-hybrid-midas")

_ROWS = (
    # built in: no weights
    _row("none", resolution=None),
    _row("invert", "invert (from white bg & black line)", None, hint="canny"),
    _row("canny", a=Slider("Canny Low Threshold", 1, 255, 100), b=Slider("Canny High Threshold", 1, 255, 200),
         hint="canny"),
    _row("threshold", a=Slider("Binarization Threshold", 0, 255, 127), hint="scribble"),
    _row("scribble_xdog", a=Slider("XDoG Threshold", 1, 64, 32), hint="scribble"),
    _row("lineart_standard", "lineart_standard (from white bg & black line)", hint="lineart"),
    _row("blur_gaussian", a=Slider("Sigma", 0.01, 64.0, 9.0, 0.01), hint="tile"),
    _row("tile_resample", resolution=None, a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01), hint="tile"),
    _row("shuffle", hint="shuffle"),
    _row("color", "t2ia_color_grid", hint="color"),
    _row("recolor_luminance", resolution=None, a=RECOLOR_GAMMA, hint="recolor"),
    _row("recolor_intensity", resolution=None, a=RECOLOR_GAMMA, hint="recolor"),
    _row("inpaint", "inpaint_global_harmonious", None, hint="inpaint"),
    _row("inpaint_only", resolution=None, hint="inpaint"),
    # networks run through transformers when their folder is there
    _row("depth", "depth_midas", needs=_MIDAS_DEPTH, hint="depth"),
    _row("depth_anything", resolution=None, hint="depth",
         needs=_transformers_depth("depth_anything", "LiheYoung/depth-anything-large-hf")),
    _row("depth_anything_v2", resolution=None, hint="depth",
         needs=_transformers_depth("depth_anything_v2", "depth-anything/Depth-Anything-V2-Large-hf")),
    # networks with the extension's original weights: listed, named, not built in yet
    _row("depth_leres", a=Slider("Remove Near %", 0, 100, 0, 0.1), b=Slider("Remove Background %", 0, 100, 0, 0.1),
         needs=_LERES, hint="depth"),
    _row("depth_leres++", a=Slider("Remove Near %", 0, 100, 0, 0.1),
         b=Slider("Remove Background %", 0, 100, 0, 0.1), needs=_LERES, hint="depth"),
    _row("depth_zoe", resolution=None, needs=_files("zoedepth", "ZoeD_M12_N.pt"), hint="depth"),
    _row("normal_map", "normal_midas", a=Slider("Normal Background Threshold", 0.0, 1.0, 0.4, 0.01),
         needs=_files("midas", "dpt_hybrid-midas-501f0c75.pt"), hint="normal"),
    _row("normal_bae", needs=_files("normal_bae", "scannet.pt"), hint="normalbae"),
    _row("hed", "softedge_hed", needs=_HED, hint="softedge"),
    _row("hed_safe", "softedge_hedsafe", needs=_HED, hint="softedge"),
    _row("pidinet", "softedge_pidinet", needs=_PIDINET, hint="softedge"),
    _row("pidinet_safe", "softedge_pidisafe", needs=_PIDINET, hint="softedge"),
    _row("te_hed", "softedge_teed", a=Slider("Safe Steps", 0, 10, 2), needs=_files("TEED", "7_model.pth"),
         hint="softedge"),
    _row("scribble_hed", needs=_HED, hint="scribble"),
    _row("pidinet_scribble", "scribble_pidinet", needs=_PIDINET, hint="scribble"),
    _row("pidinet_sketch", "t2ia_sketch_pidi", needs=_PIDINET, hint="sketch"),
    _row("lineart", "lineart_realistic", needs=_files("lineart", "sk_model.pth"), hint="lineart"),
    _row("lineart_coarse", needs=_files("lineart", "sk_model2.pth"), hint="lineart"),
    _row("lineart_anime", needs=_files("lineart_anime", "netG.pth"), hint="lineart_anime"),
    _row("lineart_anime_denoise", needs=_files("manga_line", "erika.pth"), hint="lineart_anime"),
    _row("mlsd", a=Slider("MLSD Value Threshold", 0.01, 2.0, 0.1, 0.01),
         b=Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1, 0.01),
         needs=_files("mlsd", "mlsd_large_512_fp32.pth"), hint="mlsd"),
    _row("openpose", needs=_OPENPOSE, hint="openpose"),
    _row("openpose_face", needs=_OPENPOSE, hint="openpose"),
    _row("openpose_faceonly", needs=_OPENPOSE, hint="openpose"),
    _row("openpose_full", needs=_OPENPOSE, hint="openpose"),
    _row("openpose_hand", needs=_OPENPOSE, hint="openpose"),
    _row("dw_openpose_full", needs=_files("openpose", "yolox_l.onnx", "dw-ll_ucoco_384.onnx",
                                          source="https://huggingface.co/yzd-v/DWPose"), hint="openpose"),
    _row("animal_openpose", needs=_files("openpose", "yolox_l.onnx", "rtmpose-m_ap10k_256.onnx",
                                         source="https://huggingface.co/yzd-v/DWPose"), hint="openpose"),
    _row("segmentation", "seg_ufade20k", needs=_files("uniformer", "upernet_global_small.pth"), hint="seg"),
    _row("oneformer_coco", "seg_ofcoco", needs=_files("oneformer", "150_16_swin_l_oneformer_coco_100ep.pth"),
         hint="seg"),
    _row("oneformer_ade20k", "seg_ofade20k",
         needs=_files("oneformer", "250_16_swin_l_oneformer_ade20k_160k.pth"), hint="seg"),
    _row("inpaint_only+lama", resolution=None, needs=_files("lama", "ControlNetLama.pth"), hint="inpaint"),
    # image prompts (IP-Adapter): the image goes to a CLIP vision encoder from models/clip_vision as it
    # is; which encoder is the one whose widths fit the adapter (see models/ip_adapter_files.py)
    _row("ip-adapter-auto", resolution=None, hint="ip-adapter"),
    _row("ip-adapter_clip_h", resolution=None, hint="ip-adapter"),  # OpenCLIP ViT-H/14
    _row("ip-adapter_clip_g", resolution=None, hint="ip-adapter"),  # OpenCLIP ViT-bigG/14
    _row("ip-adapter_clip_sd15", resolution=None, hint="ip-adapter"),  # the older names of the same two
    _row("ip-adapter_clip_sdxl", resolution=None, hint="ip-adapter"),
    _row("ip-adapter_clip_sdxl_plus_vith", resolution=None, hint="ip-adapter"),
)

# name -> row, in the order the extension's UI lists them ("none" and "invert" first)
PREPROCESSORS: dict[str, Preprocessor] = {row.name: row for row in _ROWS}
_BY_LABEL = {row.label: row for row in _ROWS}
INPAINT_MODULES = ("inpaint", "inpaint_only")  # the map is the image with its mask (see inpaint_control_tensor)
# a unit with one of these is an image prompt: its image conditions the cross-attention (IP-Adapter)
IMAGE_PROMPT_MODULES = tuple(row.name for row in _ROWS if row.model_hint == "ip-adapter")


def find_preprocessor(module: str | None) -> Preprocessor:
    """The row a unit's `module` names: its name or its label (the extension accepts both);
    a RequestError naming `module` for anything else."""
    key = NO_MODULE if module is None or module == "" else module
    row = (PREPROCESSORS.get(key) or _BY_LABEL.get(key)) if isinstance(key, str) else None
    if row is None:
        raise RequestError("module", f"unknown preprocessor {module!r}; choose one of: {', '.join(PREPROCESSORS)}")
    return row


def module_list(alias_names: bool = False) -> list[str]:
    """`/controlnet/module_list`'s names (labels with ?alias_names=true)."""
    return [row.label if alias_names else row.name for row in _ROWS]


def _slider_json(slider: Slider) -> dict:
    return {"name": slider.label, "value": slider.default, "min": slider.minimum, "max": slider.maximum,
            "step": slider.step}


def module_detail(module: str) -> dict:
    """One entry of `/controlnet/module_list`'s `module_detail`: {"model_free", "sliders"}
    (model_free: the module works without a control model; none of ours does)."""
    row = find_preprocessor(module)
    sliders = [s for s in (row.resolution, row.threshold_a, row.threshold_b) if s is not None]
    return {"model_free": False, "sliders": [_slider_json(s) for s in sliders]}


def modules_detail(alias_names: bool = False) -> dict[str, dict]:
    return {name: module_detail(name) for name in module_list(alias_names)}


def _threshold(row: Preprocessor, field: str, value: float | None) -> float | None:
    slider: Slider | None = getattr(row, field)
    if slider is None:
        return value  # unused by this module: passed along, never checked
    if value is None or value < 0:
        return slider.default  # the extension's API sends -1 for "the default"
    if not slider.minimum <= value <= slider.maximum:
        raise RequestError(field, f"{slider.label} of {row.name} must be between {slider.minimum:g} and "
                                  f"{slider.maximum:g}, got {value:g}")
    return value


def resolve_thresholds(module: str, threshold_a: float | None,
                       threshold_b: float | None) -> tuple[float | None, float | None]:
    """(threshold_a, threshold_b) with None (or -1) replaced by the module's defaults; a
    RequestError naming the threshold when it lies outside the module's slider."""
    row = find_preprocessor(module)
    return _threshold(row, "threshold_a", threshold_a), _threshold(row, "threshold_b", threshold_b)


def unit_thresholds(unit: ControlUnit) -> tuple[float | None, float | None]:
    """The unit's thresholds, resolved as `resolve_thresholds` does."""
    return resolve_thresholds(unit.module, unit.threshold_a, unit.threshold_b)


def resolve_resolution(module: str, resolution: int | None) -> int | None:
    """The resolution the module works at: None for modules without the slider, the slider's
    default for None or -1 (the extension's API default)."""
    row = find_preprocessor(module)
    if row.resolution is None:
        return None
    if resolution is None or resolution < 0:
        return int(row.resolution.default)
    return int(resolution)


def pixel_perfect_resolution(image_size: tuple[int, int], target_width: int, target_height: int,
                             resize_mode: str) -> int:
    """sd-webui-controlnet's pixel-perfect preprocessor resolution: the size the image's short side
    has once fitted to the target, so the map needs no further scaling. "Resize and Fill" fits
    the whole image inside (the smaller scale), the other modes cover the target (the larger)."""
    width, height = image_size
    scales = (target_width / width, target_height / height)
    scale = min(scales) if resize_mode == RESIZE_AND_FILL else max(scales)
    return round(scale * min(width, height))
