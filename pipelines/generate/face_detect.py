"""RetinaFace: face boxes, scores and five landmarks from the detector weights A1111 users have.

facexlib (which GFPGAN and CodeFormer use) keeps RetinaFace's released weights beside the
restorers in models/GFPGAN: `detection_Resnet50_Final.pth` (ResNet-50 body) and sometimes
`detection_mobilenet0.25_Final.pth` (MobileNet-0.25 body). The network is built here with the
module names of those files (`body.*`, `fpn.*`, `ssh1..3.*`, `ClassHead/BboxHead/LandmarkHead.N.*`;
the released files prefix every key with DataParallel's `module.`), and the file is read with
`upscalers.read_state_dict` (weights only) and loaded strictly: nothing is downloaded and no
pickle runs code. The facexlib package is not used: it would pull numba, filterpy and the GUI
build of OpenCV (which clashes with the headless one), and downloads weights on first use.

Facts kept from facexlib's detector and its face helper: BGR input minus the mean (104, 117, 123),
anchors of (16, 32), (64, 128), (256, 512) pixels on strides 8, 16, 32, variances (0.1, 0.2),
the image scaled so its shorter side is 640 pixels, a score threshold of 0.97, NMS at IoU 0.4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipelines.generate import upscalers
from pipelines.generate.face_align import Face

MEAN_BGR = (104.0, 117.0, 123.0)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))  # per pyramid level, in pixels of the scaled image
STRIDES = (8, 16, 32)
VARIANCES = (0.1, 0.2)
SCORE_THRESHOLD = 0.97  # facexlib's face helper (GFPGAN, CodeFormer)
NMS_IOU = 0.4
SHORT_SIDE = 640  # the face helper's resize: small pictures are enlarged so small faces are found
LONG_SIDE_MAX = 2150  # and large ones shrunk so the longer side stays within this (facexlib's max_size)
MIN_EYE_DISTANCE = 5.0  # pixels: narrower is a side view or a speck (the face helper's threshold)


@dataclass(frozen=True)
class Layout:
    """One released RetinaFace file: its name, its body and the pyramid widths."""

    file: str
    body: str  # "resnet50" | "mobilenet0.25"
    in_channels: tuple[int, int, int]  # the body's three outputs (strides 8, 16, 32)
    out_channels: int  # the FPN and SSH width

    @property
    def leaky(self) -> float:
        return 0.1 if self.out_channels <= 64 else 0.0  # the narrow network uses leaky ReLUs


RESNET50 = Layout("detection_Resnet50_Final.pth", "resnet50", (512, 1024, 2048), 256)
MOBILENET = Layout("detection_mobilenet0.25_Final.pth", "mobilenet0.25", (64, 128, 256), 64)
LAYOUTS = (RESNET50, MOBILENET)  # preferred first
ANCHORS_PER_CELL = 2


# --- the network ------------------------------------------------------------------------------

def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, leaky: float | None = 0.0) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ LeakyReLU unless `leaky` is None): keys `.0` conv, `.1` norm."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return nn.Sequential(*layers)


def conv_dw(cin: int, cout: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    """MobileNet's depthwise 3x3 then pointwise 1x1, each normed and activated."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.LeakyReLU(leaky, inplace=True), nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(leaky, inplace=True))


class ResNetBody(nn.Module):
    """torchvision's ResNet-50 without its classifier: the outputs of layer2, layer3 and layer4."""

    def __init__(self):
        super().__init__()
        # heavy (torchvision pulls torch._dynamo and sympy, seconds): only when a detector is built
        from torchvision.models import resnet50

        net = resnet50(weights=None)  # weights come from the detector file
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


class MobileNetBody(nn.Module):
    """MobileNet-0.25 in three stages (strides 8, 16, 32)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(3, 8, stride=2, leaky=0.1), conv_dw(8, 16, 1), conv_dw(16, 32, 2),
                                    conv_dw(32, 32, 1), conv_dw(32, 64, 2), conv_dw(64, 64, 1))
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *(conv_dw(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


class FPN(nn.Module):
    """Lateral 1x1s, top-down nearest upsampling, a 3x3 merge on the two finer levels."""

    def __init__(self, in_channels: tuple[int, int, int], out: int, leaky: float):
        super().__init__()
        self.output1, self.output2, self.output3 = (conv_bn(c, out, 1, leaky=leaky) for c in in_channels)
        self.merge1 = conv_bn(out, out, leaky=leaky)
        self.merge2 = conv_bn(out, out, leaky=leaky)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [p3, p4, p5]


class SSH(nn.Module):
    """The context module: 3x3, 5x5 and 7x7 receptive fields (stacked 3x3s), concatenated."""

    def __init__(self, channels: int, leaky: float):
        super().__init__()
        self.conv3X3 = conv_bn(channels, channels // 2, leaky=None)
        self.conv5X5_1 = conv_bn(channels, channels // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn(channels // 4, channels // 4, leaky=None)
        self.conv7X7_2 = conv_bn(channels // 4, channels // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn(channels // 4, channels // 4, leaky=None)  # sic: the released key's case

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(branch), self.conv7x7_3(self.conv7X7_2(branch))], 1))


class Head(nn.Module):
    """A 1x1 conv predicting `values` numbers per anchor: (batch, cells * anchors, values)."""

    def __init__(self, channels: int, values: int):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, ANCHORS_PER_CELL * values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """The detector network; `forward` gives (box offsets, class probabilities, landmark offsets) per anchor."""

    def __init__(self, layout: Layout = RESNET50):
        super().__init__()
        self.layout = layout
        self.body = ResNetBody() if layout.body == "resnet50" else MobileNetBody()
        width = layout.out_channels
        self.fpn = FPN(layout.in_channels, width, layout.leaky)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(width, layout.leaky) for _ in range(3))
        self.ClassHead = nn.ModuleList(Head(width, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(width, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(width, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3, p4, p5 = self.fpn(self.body(x))
        features = [self.ssh1(p3), self.ssh2(p4), self.ssh3(p5)]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], 1)
        scores = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], 1).softmax(-1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], 1)
        return boxes, scores, landmarks


# --- reading a file -------------------------------------------------------------------------

class DetectorLoadError(ValueError):
    """A detector file that cannot be used: the message names the file and why."""


def layout_of(path: Path) -> Layout:
    """The released layout a detector file name stands for."""
    for layout in LAYOUTS:
        if Path(path).name.casefold() == layout.file.casefold():
            return layout
    raise DetectorLoadError(f"{Path(path).name}: not a RetinaFace file name ({', '.join(x.file for x in LAYOUTS)})")


def load_retinaface(path: Path) -> RetinaFace:
    """The RetinaFace of a released detector file (CPU, eval mode), loaded strictly."""
    layout = layout_of(path)
    try:
        state_dict = upscalers.read_state_dict(path)
    except upscalers.UpscalerLoadError as exc:
        raise DetectorLoadError(str(exc)) from None
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()
                  if isinstance(value, torch.Tensor)}
    net = RetinaFace(layout)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = (str(exc).splitlines()[1:2] or [str(exc)])[0].strip()[:200]
        raise DetectorLoadError(f"{Path(path).name}: not a {layout.body} RetinaFace ({first})") from None
    return net.eval()


# --- detecting --------------------------------------------------------------------------------

def anchors(height: int, width: int) -> torch.Tensor:
    """(n, 4) anchor boxes (centre x, centre y, width, height) as fractions of the image, in the
    order the heads emit them: level, row, column, anchor size."""
    levels = []
    for sizes, stride in zip(ANCHOR_SIZES, STRIDES):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        cy, cx = torch.meshgrid((torch.arange(rows) + 0.5) * stride / height,
                                (torch.arange(cols) + 0.5) * stride / width, indexing="ij")
        per_size = [torch.stack([cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], -1)
                    for s in sizes]
        levels.append(torch.stack(per_size, 2).reshape(-1, 4))
    return torch.cat(levels)


def decode(offsets: torch.Tensor, landmark_offsets: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Boxes (n, 4: left, top, right, bottom) and landmarks (n, 5, 2), as fractions of the image."""
    centre = priors[:, :2] + offsets[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(offsets[:, 2:] * VARIANCES[1])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    points = priors[:, None, :2] + landmark_offsets.reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]
    return boxes, points


def detection_scale(size: tuple[int, int], short_side: int = SHORT_SIDE) -> float:
    """How much the picture is scaled for the detector: its shorter side to `short_side`,
    unless that makes the longer side exceed LONG_SIDE_MAX."""
    scale = short_side / min(size)
    return min(scale, LONG_SIDE_MAX / max(size))


def detect(net: RetinaFace, image: Image.Image, threshold: float = SCORE_THRESHOLD,
           short_side: int = SHORT_SIDE) -> list[Face]:
    """The faces in `image`, best score first, in the image's pixels (landmarks: left eye,
    right eye, nose, left and right mouth corner as seen in the picture)."""
    from torchvision.ops import nms  # heavy (torchvision): only when faces are detected

    scale = detection_scale(image.size, short_side)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    scaled = image.convert("RGB").resize(size, Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BILINEAR)
    param = next(net.parameters())
    bgr = torch.from_numpy(np.asarray(scaled, dtype=np.float32)[:, :, ::-1].copy())
    x = (bgr - torch.tensor(MEAN_BGR)).permute(2, 0, 1)[None].to(param.device, param.dtype)
    with torch.inference_mode():
        offsets, scores, landmark_offsets = (t[0].float().cpu() for t in net(x))
    boxes, points = decode(offsets, landmark_offsets, anchors(size[1], size[0]))
    to_pixels = torch.tensor([image.width, image.height], dtype=torch.float32)
    boxes, points, scores = boxes * to_pixels.repeat(2), points * to_pixels, scores[:, 1]
    keep = scores > threshold
    boxes, points, scores = boxes[keep], points[keep], scores[keep]
    keep = nms(boxes, scores, NMS_IOU)  # sorted by score, best first
    faces = []
    for box, marks, score in zip(boxes[keep].numpy(), points[keep].numpy(), scores[keep].numpy()):
        if np.linalg.norm(marks[0] - marks[1]) < MIN_EYE_DISTANCE:
            continue
        left, top, right, bottom = (float(v) for v in box)
        faces.append(Face((left, top, right - left, bottom - top), float(score), marks.astype(np.float64)))
    return faces
