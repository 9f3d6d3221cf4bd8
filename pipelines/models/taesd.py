"""Tiny autoencoders (TAESD for SD 1.x/2.x, TAESDXL for SDXL) from ``models/VAE-approx``
(A1111's folder): live previews at every step, and an optional fast final decode.

The files people have, all read into diffusers' ``AutoencoderTiny`` (built here, offline):
- ``taesd_decoder.pth`` / ``taesdxl_decoder.pth`` (and their ``.safetensors``): the decoder alone,
  as madebyollin's ``taesd.py`` saves it: a Sequential whose index 0 is a weightless clamp, so
  layer N there is diffusers' ``decoder.layers.N-1`` (``N.conv.0.weight``, ``N.weight``...);
  some copies carry a ``decoder.`` prefix;
- diffusers' AutoencoderTiny single file (``diffusion_pytorch_model.safetensors`` of
  madebyollin/taesd, keys ``decoder.layers.N...``, the encoder too).

The decoder's shape (levels, blocks per level, widths, latent channels) is read from the
tensors, so no config is needed. The weights cannot tell SD from SDXL (same architecture, other
latent space), so the name does: "taesdxl" is SDXL's, "taesd" SD 1.x/2.x's; 16-channel ones
(taesd3, taef1) fit no family here. TAESD decodes the latents the U-Net works on as they are
(its scaling factor is 1), to images in [-1, 1].

- ``describe_taesd(path)``: the listing's details (family names, latent channels, or error).
- ``pick_taesd(files, family)``: the file for a checkpoint family (None if none fits).
- ``load_taesd(path)`` -> ``TinyAutoencoder`` with ``decode_preview(latents)`` and ``decode(latents)``.
- ``TinyAutoencoders``: the one kept loaded, shared by live previews and fast final decodes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipelines.models.checkpoint_file import CheckpointError, read_header, sniff_format, torch_state_dict

# file name -> the checkpoint families whose latent space it decodes (first match wins)
NAME_FAMILIES = (
    (re.compile(r"taesdxl"), ("sdxl", "sdxl_refiner")),
    (re.compile(r"taesd(?![0-9a-z])"), ("sd1", "sd2")),
)
# the file each family's users download (madebyollin/taesd's names): what a message asks for
EXPECTED_FILES = {"sd1": "taesd_decoder.pth", "sd2": "taesd_decoder.pth",
                  "sdxl": "taesdxl_decoder.pth", "sdxl_refiner": "taesdxl_decoder.pth"}
DECODER = "decoder.layers."
ORIGINAL_KEY = re.compile(r"^(?:decoder\.)?(\d+)\.(.+)$")  # taesd.py's Sequential: "3.conv.0.weight"


def families_for(name: str) -> tuple[str, ...]:
    """The families a tiny autoencoder's listed name (folders included: "taesdxl/diffusion_pytorch_model")
    says it decodes for; () when it does not say, or names an encoder."""
    lowered = str(name).replace("\\", "/").lower()
    if "encoder" in Path(lowered).name:
        return ()
    return next((families for pattern, families in NAME_FAMILIES if pattern.search(lowered)), ())


def to_diffusers_keys(names: Iterable[str]) -> dict[str, str]:
    """Original -> diffusers names of a file's decoder tensors (encoder tensors and anything
    else are left out: only the decoder is used)."""
    mapping = {}
    for name in names:
        if name.startswith(DECODER):
            mapping[name] = name
            continue
        match = ORIGINAL_KEY.match(name)
        if match and int(match.group(1)) >= 1:  # index 0 is the weightless clamp
            mapping[name] = f"{DECODER}{int(match.group(1)) - 1}.{match.group(2)}"
    return mapping


@dataclass(frozen=True)
class DecoderShape:
    latent_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    num_blocks: tuple[int, ...]


def decoder_shape(shapes: dict[str, tuple[int, ...]]) -> DecoderShape:
    """The DecoderTiny layout of tensors named the diffusers way: conv_in at layer 0, then per
    level its blocks (``N.conv.0.weight``) closed by one plain conv (``N.weight``), the last
    of which (with a bias) gives the image channels."""
    layers: dict[int, str] = {}
    for name in shapes:
        rest = name[len(DECODER):]
        index, _, param = rest.partition(".")
        if index.isdigit():
            layers.setdefault(int(index), "block" if param.startswith("conv.") else "conv")
    if not layers or layers.get(0) != "conv" or f"{DECODER}0.weight" not in shapes:
        raise CheckpointError("not a tiny autoencoder (TAESD) decoder: no decoder input convolution")
    widths, counts, blocks = [], [], 0
    for index in sorted(layers)[1:]:
        if layers[index] == "block":
            blocks += 1
            continue
        counts.append(blocks)
        widths.append(shapes[f"{DECODER}{index}.weight"][1])
        blocks = 0
    last = max(layers)
    if blocks or layers[last] != "conv" or not counts:
        raise CheckpointError("not a tiny autoencoder (TAESD) decoder: it does not end in an output convolution")
    latent = shapes[f"{DECODER}0.weight"]
    return DecoderShape(latent_channels=latent[1], out_channels=shapes[f"{DECODER}{last}.weight"][0],
                        block_out_channels=tuple(widths), num_blocks=tuple(counts))


def describe_taesd(path: Path, name: str | None = None) -> dict:
    """What the VAE-approx listing shows: the families it decodes for and its latent channels
    (from the header; CheckpointError for a file that is no TAESD decoder). ``name``: as listed."""
    header = read_header(Path(path))
    mapping = to_diffusers_keys(header.shapes)
    shape = decoder_shape({new: header.shapes[old] for old, new in mapping.items()})
    # the folder counts too: a diffusers single file says its family by the folder it sits in
    listed = name or f"{Path(path).parent.name}/{Path(path).name}"
    families = families_for(listed) if shape.latent_channels == 4 else ()
    details = {"kind": "taesd", "latent_channels": shape.latent_channels, "families": list(families)}
    if not families:
        details["error"] = ("no checkpoint family here uses this latent space" if shape.latent_channels != 4
                            else "name it taesd_* (SD 1.x/2.x) or taesdxl_* (SDXL): the weights cannot tell")
    return details


def pick_taesd(files: Iterable, family: str):
    """The first listed file (a ModelFile or a path) whose name fits checkpoint ``family``;
    decoder-only files ("taesdxl_decoder") before others, so a diffusers single file named
    "taesdxl" does not win over one. None when none fits."""
    fitting = [f for f in files if family in families_for(str(getattr(f, "name", f)))]
    fitting.sort(key=lambda f: "decoder" not in str(getattr(f, "name", f)).lower())
    return fitting[0] if fitting else None


def read_decoder_state(path: Path) -> dict[str, torch.Tensor]:
    """The decoder tensors of a TAESD file, named the diffusers way."""
    path = Path(path)
    if sniff_format(path) == "safetensors":
        from safetensors.torch import load_file  # only when loading (the listing reads headers)

        state = load_file(str(path))
    else:
        state = torch_state_dict(path)
    return {new: state[old] for old, new in to_diffusers_keys(state).items()}


def build_tiny_autoencoder(shape: DecoderShape):
    """A diffusers AutoencoderTiny of this decoder shape (its encoder mirrors it and stays unused)."""
    from diffusers import AutoencoderTiny  # heavy: only when a tiny autoencoder is loaded

    levels = len(shape.block_out_channels)
    return AutoencoderTiny(
        in_channels=shape.out_channels, out_channels=shape.out_channels, latent_channels=shape.latent_channels,
        encoder_block_out_channels=shape.block_out_channels, decoder_block_out_channels=shape.block_out_channels,
        num_encoder_blocks=(1,) * levels, num_decoder_blocks=shape.num_blocks,
        scaling_factor=1.0, shift_factor=0.0,
    )


def to_images(samples: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] NCHW samples -> 8-bit RGB images, rounded as `generate.pixels.to_image` rounds a
    VAE decode (models may not import generate)."""
    pixels = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


@dataclass
class TinyAutoencoder:
    """A loaded TAESD decoder and the families whose latents it decodes."""

    model: object  # diffusers AutoencoderTiny
    families: tuple[str, ...]
    name: str = ""
    channels_last: bool = False  # the model's layout, which its input then takes too

    def fits(self, family: str) -> bool:
        return family in self.families

    @torch.no_grad()
    def decode_samples(self, latents: torch.Tensor) -> torch.Tensor:
        """The U-Net's latents (as sampled, not divided by the VAE scaling factor) -> NCHW
        samples in [-1, 1], like a VAE decode's."""
        parameter = next(self.model.parameters())
        latents = latents.to(device=parameter.device, dtype=parameter.dtype)
        if self.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        return self.model.decode(latents).sample

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """The U-Net's latents -> images (a fast final decode)."""
        return to_images(self.decode_samples(latents))

    def decode_preview(self, latents: torch.Tensor) -> Image.Image:
        """The first image of a batch: a live preview at full size for a fraction of a VAE decode."""
        return self.decode(latents[:1])[0]


def load_taesd(path: Path, name: str | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, channels_last: bool = False) -> TinyAutoencoder:
    """Build and load a TAESD / TAESDXL decoder file (CheckpointError naming it when it is none).
    ``name``: its listed name (relative to VAE-approx), which says its family; default the file name.
    ``channels_last``: NHWC convolutions (a 512x512 decode in bf16 on the CPU: 0.16 s against 0.47 s)."""
    path = Path(path)
    name = name or path.name
    try:
        state = read_decoder_state(path)
        model = build_tiny_autoencoder(decoder_shape({k: tuple(v.shape) for k, v in state.items()}))
        missing, unexpected = model.decoder.load_state_dict(
            {k[len("decoder."):]: v for k, v in state.items()}, strict=False)
    except CheckpointError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(f"{path.name}: not a TAESD decoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    families = families_for(name) if model.config.latent_channels == 4 else ()
    model = model.to(device=device, dtype=dtype).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return TinyAutoencoder(model, families, name, channels_last)


def missing_text(family: str, label: str | None = None) -> str:
    """What to say when no file fits `family`: which one to put where."""
    wanted = EXPECTED_FILES.get(family)
    if wanted is None:
        return f"no TAESD decoder fits {label or family} (its latents are not those TAESD decodes)"
    return f"no TAESD decoder for {label or family} in models/VAE-approx (put {wanted} there)"


class TinyAutoencoders:
    """The tiny autoencoder kept loaded: one at a time (a few MB; a job of another family swaps
    it), keyed by file, size and mtime so a replaced file is read again. Live previews load it
    from the thread that polls /progress while the job's thread decodes, hence the lock."""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 channels_last: bool = False):
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self._lock = threading.Lock()
        self._loaded: tuple[tuple, TinyAutoencoder] | None = None

    def get(self, file) -> TinyAutoencoder:
        """The loaded decoder of a listed file (a ModelFile: name relative to VAE-approx, path);
        CheckpointError naming it when it is no TAESD decoder."""
        path = Path(file.path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime)
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None  # the old one goes before the new one loads
                self._loaded = (key, load_taesd(path, file.name, device=self.device, dtype=self.dtype,
                                                       channels_last=self.channels_last))
            return self._loaded[1]
