"""The procedural, captioned coloured-shapes data set and the image judge that scores it.

Every scene is one flat-coloured shape (circle, square or triangle pointing up) of a
colour from ``COLOURS`` on a flat background of another colour, small or large, at one
of five positions. Scene *i* of a split is a pure function of ``(seed, split, i)``, so
the data set needs no storage and any part of it can be regenerated exactly.

A fixed set of (colour, shape, background) triples (``HELD_OUT``, about one in seven)
never appears in the training split; the evaluator prompts for exactly those. Each
held-out triple keeps its (colour, background) pair, (colour, shape) pair and
(shape, background) pair in training with other third members, so generalising to it
means composing things the model has seen separately.

``judge(image)`` reads the background colour, the object colour and the shape back from
pixels with simple image analysis; it is what the tests check the captions against and
what ``bench/demo_quality.py`` scores generated images with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels; the model's native resolution
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down (anti-aliased edges)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (250, 130, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "purple": (130, 50, 200),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (18, 24), "large": (34, 42)}  # side length range in pixels
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
JITTER_PX = 3  # position jitter
COLOUR_JITTER = 6  # per-channel colour jitter, so the palette is not 8 exact points


def is_held_out(colour: str, shape: str, background: str) -> bool:
    """One in seven of the triples, chosen so each held-out triple keeps all its pairs in training."""
    ci, si, bi = COLOUR_NAMES.index(colour), SHAPES.index(shape), COLOUR_NAMES.index(background)
    return (ci + 2 * si + 3 * bi) % 7 == 0


ALL_TRIPLES = tuple((c, s, b) for c in COLOUR_NAMES for s in SHAPES for b in COLOUR_NAMES if c != b)
HELD_OUT = tuple(t for t in ALL_TRIPLES if is_held_out(*t))
TRAIN_TRIPLES = tuple(t for t in ALL_TRIPLES if not is_held_out(*t))


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str  # "small" | "large"
    position: str
    side: float  # pixels
    cx: float
    cy: float
    rgb: tuple[int, int, int]
    bg_rgb: tuple[int, int, int]

    def caption(self, with_size: bool = True, with_position: bool = True) -> str:
        words = ["a"]
        if with_size:
            words.append(self.size)
        words += [self.colour, self.shape]
        if with_position:
            words.append("in the center" if self.position == "center" else f"in the {self.position}")
        words += ["on", "a" if self.background[0] not in "aeiou" else "an", self.background, "background"]
        return " ".join(words)

    def captions(self) -> tuple[str, str, str, str]:
        """The four caption variants: full, without size, without position, minimal."""
        return (self.caption(True, True), self.caption(False, True), self.caption(True, False),
                self.caption(False, False))


def simple_caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on {'an' if background[0] in 'aeiou' else 'a'} {background} background"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _jitter(rgb, rng) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for v in rgb)


def make_scene(seed: int, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split`` ("train": training triples only; "heldout": held-out only)."""
    rng = _rng(seed, split, index)
    triples = TRAIN_TRIPLES if split == "train" else HELD_OUT
    colour, shape, background = triples[int(rng.integers(len(triples)))]
    size = ("small", "large")[int(rng.integers(2))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    lo, hi = SIZES[size]
    side = float(rng.uniform(lo, hi))
    margin = 4 + side / 2
    centre = {"center": (SIZE / 2, SIZE / 2), "top left": (margin, margin), "top right": (SIZE - margin, margin),
              "bottom left": (margin, SIZE - margin), "bottom right": (SIZE - margin, SIZE - margin)}[position]
    jitter = rng.uniform(-JITTER_PX, JITTER_PX, size=2)
    # keep the shape inside the frame (2 px clear) whatever the jitter
    cx = float(np.clip(centre[0] + jitter[0], side / 2 + 2, SIZE - side / 2 - 2))
    cy = float(np.clip(centre[1] + jitter[1], side / 2 + 2, SIZE - side / 2 - 2))
    return Scene(colour, shape, background, size, position, side, cx, cy,
                 _jitter(COLOURS[colour], rng), _jitter(COLOURS[background], rng))


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 [64, 64, 3]."""
    k = SUPERSAMPLE
    big = Image.new("RGB", (SIZE * k, SIZE * k), scene.bg_rgb)
    draw = ImageDraw.Draw(big)
    h = scene.side / 2
    x0, y0, x1, y1 = ((scene.cx - h) * k, (scene.cy - h) * k, (scene.cx + h) * k, (scene.cy + h) * k)
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=scene.rgb)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=scene.rgb)
    else:
        draw.polygon([(scene.cx * k, y0), (x0, y1), (x1, y1)], fill=scene.rgb)
    return np.asarray(big.resize((SIZE, SIZE), Image.BOX), dtype=np.uint8)


def sample(seed: int, split: str, index: int) -> tuple[np.ndarray, Scene]:
    scene = make_scene(seed, split, index)
    return render(scene), scene


def batch_pixels(seed: int, split: str, indices) -> np.ndarray:
    """uint8 [n, 64, 64, 3] of the given scene indices."""
    return np.stack([render(make_scene(seed, split, int(i))) for i in indices])


def to_model_range(pixels_uint8: np.ndarray):
    """uint8 NHWC -> float32 NCHW tensor in [-1, 1] (the engine's convention)."""
    import torch  # heavy: the scenes and the judge need only numpy

    x = torch.from_numpy(np.ascontiguousarray(pixels_uint8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# --- the judge -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Judgement:
    background: str | None
    colour: str | None
    shape: str | None
    bbox: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (inclusive) of the object mask
    area: int = 0


_PALETTE = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float32)


def nearest_colour(rgb) -> str:
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float32)[None]) ** 2).sum(1)
    return COLOUR_NAMES[int(d.argmin())]


def judge(image) -> Judgement:
    """Background colour (median of the 2-px border), object colour (median of the pixels far
    from the background) and shape (fill of the bounding box, narrowing towards the top)."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = nearest_colour(bg)
    dist = np.sqrt(((a - bg[None, None]) ** 2).sum(-1))
    mask = dist > 60
    area = int(mask.sum())
    if area < 24:
        return Judgement(background, None, None, None, area)
    core = mask & (dist >= 0.7 * np.percentile(dist[mask], 90))
    colour = nearest_colour(np.median(a[core], axis=0))
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    box = mask[y0:y1 + 1, x0:x1 + 1]
    fill = area / box.size
    widths = box.sum(1).astype(np.float32)
    third = max(1, len(widths) // 3)
    top, bottom = widths[:third].mean(), widths[-third:].mean()
    if bottom > 0 and top / bottom < 0.6:
        shape = "triangle"
    elif fill > 0.88:
        shape = "square"
    else:
        shape = "circle"
    return Judgement(background, colour, shape, (x0, y0, x1, y1), area)


def score(images, expected: list[tuple[str, str, str]]) -> dict[str, float]:
    """Fractions of images whose object colour, background colour and shape match ``expected``
    (``[(colour, shape, background), ...]``), plus ``all`` (the three together)."""
    hits = {"colour": 0, "background": 0, "shape": 0, "all": 0}
    for image, (colour, shape, background) in zip(images, expected):
        j = judge(image)
        ok = (j.colour == colour, j.background == background, j.shape == shape)
        hits["colour"] += ok[0]
        hits["background"] += ok[1]
        hits["shape"] += ok[2]
        hits["all"] += all(ok)
    n = max(1, len(expected))
    return {k: v / n for k, v in hits.items()}
