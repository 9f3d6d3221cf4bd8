"""Face restoration: find faces, restore each with a GFPGAN / CodeFormer / RestoreFormer model, paste back.

Models come from A1111's folders (`models/GFPGAN`, `models/Codeformer`, kinds "gfpgan" and
"codeformer") and load through spandrel (CodeFormer through `spandrel_extra_arches`), with the
same safe file reading as the upscalers (`upscalers.read_state_dict`). A restorer is named by
its architecture ("GFPGAN", "CodeFormer", "RestoreFormer": the names A1111 clients send as
`face_restoration_model`); a second file of the same architecture is "<arch> (<file stem>)".
The facexlib detector/parser weights A1111 keeps in the same folders are not restorers and
are left out of the list.

Faces are found by RetinaFace when facexlib's detector file is in those folders
(`face_detect`: boxes and five landmarks), each warped onto the FFHQ template, restored and
warped back (`face_align`). Without that file, OpenCV's Haar cascade for frontal faces (inside
the opencv-python-headless wheel: nothing is downloaded) finds boxes; each box is widened by a
margin to a square, resized to 512x512, restored, resized back. Either way the face is pasted
with a feathered mask, so everything outside the face square stays as it was.

Spandrel and cv2 load on first use.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.core.request import RequestError
from pipelines.generate import face_detect, upscalers
from pipelines.generate.face_align import FACE_SIZE, Face, alignment, feather_mask, paste_aligned, warp_face

log = logging.getLogger(__name__)

FACE_KINDS = ("gfpgan", "codeformer")  # core.settings.MODEL_KINDS: models/GFPGAN, models/Codeformer
NOT_RESTORERS = ("detection_", "parsing_")  # facexlib's weights, kept beside the restorers by A1111
MARGIN = 0.4  # each side of a detected face box grows by this fraction of the box
CASCADE = "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class FaceRestorer:
    """One restorer model file: its name in lists and requests, the file and its architecture."""

    name: str
    path: Path
    architecture: str
    folder: Path


# --- models --------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _arch_registry():
    import spandrel  # heavy: only when a face model is read

    registry = spandrel.ArchRegistry()
    registry.add(*spandrel.MAIN_REGISTRY.architectures())
    try:
        import spandrel_extra_arches  # optional: CodeFormer lives there

        registry.add(*spandrel_extra_arches.EXTRA_REGISTRY.architectures(), ignore_duplicates=True)
    except ImportError:
        log.info("spandrel_extra_arches is not installed: CodeFormer models cannot be read")
    return registry


def _build(state_dict: dict, name: str):
    import spandrel  # heavy: only when a face model is read

    try:
        descriptor = _arch_registry().load(spandrel.canonicalize_state_dict(state_dict))
    except spandrel.UnsupportedModelError:
        raise upscalers.UpscalerLoadError(f"{name}: no face restoration architecture matches this file") from None
    except Exception as exc:  # noqa: BLE001 - any failure to build is the file's, said as such
        raise upscalers.UpscalerLoadError(f"{name}: could not be built ({type(exc).__name__}: {exc})") from None
    if descriptor.purpose != "FaceSR":
        raise upscalers.UpscalerLoadError(f"{name}: is a {descriptor.architecture.name} {descriptor.purpose} "
                                          "model, not a face restorer")
    return descriptor


def load_face_model(path: Path):
    """A spandrel ImageModelDescriptor (CPU, eval mode) for a face restorer file."""
    return _build(upscalers.read_state_dict(path), Path(path).name).eval()


def describe_face_file(path: Path) -> dict:
    """The listing's facts: the architecture, built on the meta device (no weights allocated)."""
    import torch  # heavy: only when a model file is described

    if Path(path).name.startswith(NOT_RESTORERS):
        return {"error": "a face detector/parser weight file, not a restorer"}
    state_dict = upscalers.read_state_dict(path, mmap=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op"
            with torch.device("meta"):
                descriptor = _build(state_dict, Path(path).name)
    except upscalers.UpscalerLoadError as exc:
        if "could not be built" not in str(exc):
            raise
        descriptor = _build(state_dict, Path(path).name)  # some build with real values only
    return {"architecture": descriptor.architecture.name}


def restorers_from(files: Iterable[Any], folders: dict[str, Path]) -> list[FaceRestorer]:
    """Restorers for registry ModelFiles of the face kinds (`(kind, file)` pairs); unusable files
    are left out with a log line. The first file of an architecture takes its plain name."""
    result: list[FaceRestorer] = []
    taken: set[str] = set()
    for kind, f in files:
        details = getattr(f, "details", {}) or {}
        if "error" in details or not details.get("architecture"):
            if not Path(f.name).name.startswith(NOT_RESTORERS):
                log.warning("face restorer %s left out: %s", f.name, details.get("error", "unknown architecture"))
            continue
        arch = details["architecture"]
        name = arch if arch not in taken else f"{arch} ({Path(f.name).stem})"
        taken.add(arch)
        result.append(FaceRestorer(name, Path(f.path), arch, folders[kind]))
    return result


# --- finding faces -------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _cascade():
    import cv2  # heavy, and only needed when faces are restored

    classifier = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / CASCADE))
    if classifier.empty():
        raise RuntimeError(f"OpenCV's {CASCADE} could not be read")
    return classifier


def detect_faces(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """Frontal faces as (left, top, width, height), largest first."""
    gray = np.asarray(image.convert("L"))
    smallest = max(24, min(image.size) // 12)
    found = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    boxes = [tuple(int(v) for v in box) for box in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


def crop_box(face: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The square around a face box, widened by MARGIN on each side and kept inside the image
    (shifted, then shrunk when the image is smaller): (left, top, right, bottom)."""
    x, y, w, h = face
    width, height = size
    side = round(max(w, h) * (1 + 2 * MARGIN))
    side = max(1, min(side, width, height))
    cx, cy = x + w / 2, y + h / 2
    left = round(min(max(cx - side / 2, 0), width - side))
    top = round(min(max(cy - side / 2, 0), height - side))
    return left, top, left + side, top + side


def paste_face(image: Image.Image, restored: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """`restored` (any size) resized into the square `box` of `image` through a feathered mask."""
    left, top, right, _ = box
    side = right - left
    region = image.crop(box)
    face = restored.convert(image.mode).resize((side, side), Image.Resampling.LANCZOS)
    out = image.copy()
    out.paste(Image.composite(face, region, feather_mask(side)), (left, top))
    return out


# --- restoring -------------------------------------------------------------------------------

def run_model(model, face: Image.Image, code_former_weight: float) -> Image.Image:
    """One 512x512 RGB face through the restorer. GFPGAN and CodeFormer take and give [-1, 1]
    (CodeFormer with its fidelity weight); other architectures go through spandrel's call."""
    import torch  # heavy: only when a model runs

    array = np.asarray(face.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None].to(model.device, model.dtype)
    with torch.inference_mode():
        arch = model.architecture.name
        if arch == "CodeFormer":
            out = (model.model(tensor * 2 - 1, weight=float(code_former_weight))[0] + 1) / 2
        elif arch == "GFPGAN":
            out = (model.model(tensor * 2 - 1, return_rgb=False)[0] + 1) / 2
        else:
            out = model(tensor)
    out = out[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((out * 255).round().astype(np.uint8), "RGB")


def restore_each(image: Image.Image, faces: list[Face], restore_one: Callable[[Image.Image], Image.Image]
                 ) -> Image.Image:
    """Each face through `restore_one` (a FACE_SIZE RGB square in, a square out) and pasted back:
    aligned on the FFHQ template when the face has landmarks, else its widened box."""
    out = image
    for face in faces:
        if face.landmarks is not None:
            matrix = alignment(face.landmarks)
            out = paste_aligned(out, restore_one(warp_face(out, matrix)), matrix)
        else:
            box = crop_box(face.box, image.size)
            crop = out.crop(box).convert("RGB").resize((FACE_SIZE, FACE_SIZE), Image.Resampling.LANCZOS)
            out = paste_face(out, restore_one(crop), box)
    if faces and out is not image:
        out.info = dict(image.info)
    return out


def as_faces(found: Iterable[Face | tuple]) -> list[Face]:
    """Faces, with plain (left, top, width, height) boxes (the Haar cascade's) taken as landmark-less faces."""
    return [f if isinstance(f, Face) else Face(tuple(f)) for f in found]


def restore(image: Image.Image, model, code_former_weight: float = 0.5,
            faces: list[Face | tuple[int, int, int, int]] | None = None) -> tuple[Image.Image, int]:
    """Every face of `image` restored and pasted back: (new image, faces restored).
    `faces`: Faces or (left, top, width, height) boxes; None: the Haar cascade finds them."""
    faces = as_faces(detect_faces(image) if faces is None else faces)
    return restore_each(image, faces, lambda crop: run_model(model, crop, code_former_weight)), len(faces)


class FaceRestoration:
    """The engine's face restorers: what the folders hold, and running one (models cached)."""

    def __init__(self, registry, folders: dict[str, Path], device: Any = "cpu"):
        self.registry = registry
        self.folders = {kind: Path(folders[kind]) for kind in FACE_KINDS}  # of every model kind: the face ones
        self.models = upscalers.UpscalerModels(device, capacity=1, loader=load_face_model)
        self.detectors = upscalers.UpscalerModels(device, capacity=1, loader=face_detect.load_retinaface)

    def restorers(self, refresh: bool = False) -> list[FaceRestorer]:
        files = [(kind, f) for kind in FACE_KINDS for f in self.registry.list(kind, refresh)]
        return restorers_from(files, self.folders)

    def listing(self, refresh: bool = False) -> list[dict]:
        """A1111's /sdapi/v1/face-restorers: [{name, cmd_dir}]."""
        return [{"name": r.name, "cmd_dir": str(r.folder)} for r in self.restorers(refresh)]

    def choose(self, name: str | None) -> FaceRestorer:
        """The restorer a request names (None or "Automatic": the first one); a RequestError
        naming restore_faces when there is none, face_restorer when the name is unknown."""
        found = self.restorers()
        if not found:
            where = " or ".join(str(self.folders[kind]) for kind in FACE_KINDS)
            raise RequestError("restore_faces", f"no face restoration model is installed: put a GFPGAN, "
                                                f"CodeFormer or RestoreFormer model in {where}")
        if not name or name == "Automatic":
            return found[0]
        for restorer in found:
            if restorer.name == name or restorer.name.casefold() == name.casefold():
                return restorer
        names = ", ".join(r.name for r in found)
        raise RequestError("face_restorer", f"unknown face restorer {name!r}; choose one of: {names}")

    def postprocess_restorers(self, request) -> list[tuple[FaceRestorer, float, float]]:
        """What an Extras request (core UpscaleRequest) asks for, in A1111's order: models/GFPGAN's
        first restorer at gfpgan_visibility, then models/Codeformer's at codeformer_visibility:
        [(restorer, visibility, weight)]. A RequestError names the visibility whose folder is empty."""
        wanted = (("gfpgan", "gfpgan_visibility", "GFPGAN or RestoreFormer"), ("codeformer", "codeformer_visibility",
                                                                               "CodeFormer"))
        chosen = []
        for kind, field, what in wanted:
            visibility = float(getattr(request, field))
            if visibility <= 0:
                continue
            found = [r for r in self.restorers() if r.folder == self.folders[kind]]
            if not found:
                raise RequestError(field, f"no {what} model is installed: put one in {self.folders[kind]}, "
                                          "or send 0")
            chosen.append((found[0], visibility, float(request.codeformer_weight)))
        return chosen

    def postprocess(self, image: Image.Image, chosen: list[tuple[FaceRestorer, float, float]]) -> Image.Image:
        """Each chosen restorer's result blended over the image by its visibility (A1111's Extras)."""
        for restorer, visibility, weight in chosen:
            restored, _ = self.restore(image.convert("RGB"), restorer, weight)
            image = Image.blend(image.convert("RGB"), restored, visibility) if visibility < 1 else restored
        return image

    def detector_file(self) -> Path | None:
        """facexlib's RetinaFace file in the face folders, ResNet-50 before MobileNet-0.25; None: none there."""
        found = {Path(f.path).name.casefold(): Path(f.path) for kind in FACE_KINDS for f in self.registry.list(kind)}
        return next((found[layout.file.casefold()] for layout in face_detect.LAYOUTS
                     if layout.file.casefold() in found), None)

    def find_faces(self, image: Image.Image, warnings: list[str] | None = None) -> list[Face]:
        """The faces of `image`: RetinaFace's (with landmarks) when its file is there and reads,
        else the Haar cascade's boxes. `warnings` hears of the detector when it matters: a detector
        file that cannot be used, or the cascade (frontal faces only) finding nothing."""
        path = self.detector_file()
        if path is not None:
            try:
                return face_detect.detect(self.detectors.get(path), image)
            except face_detect.DetectorLoadError as exc:
                log.warning("face detector left out: %s", exc)
                note(warnings, f"restore_faces: {exc}; OpenCV's Haar cascade looked for faces instead")
        faces = as_faces(detect_faces(image))
        if not faces and path is None:
            note(warnings, "restore_faces: OpenCV's Haar cascade finds frontal faces only; with facexlib's "
                           f"{face_detect.RESNET50.file} in {self.folders['gfpgan']}, RetinaFace looks instead")
        return faces

    def restore(self, image: Image.Image, restorer: FaceRestorer, code_former_weight: float = 0.5,
                faces: list[Face | tuple[int, int, int, int]] | None = None,
                warnings: list[str] | None = None) -> tuple[Image.Image, int]:
        """Every face of `image` restored (None: found by `find_faces`): (new image, faces restored)."""
        try:
            model = self.models.get(restorer.path)
        except upscalers.UpscalerLoadError as exc:
            raise RequestError("face_restorer", str(exc)) from None
        faces = as_faces(self.find_faces(image, warnings) if faces is None else faces)
        return restore(image, model, code_former_weight, faces)


def note(warnings: list[str] | None, message: str) -> None:
    """Add a warning once (a job restores faces in every image of its batch)."""
    if warnings is not None and message not in warnings:
        warnings.append(message)
