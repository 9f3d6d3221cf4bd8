"""The fast final decode: a job's images decoded by the tiny autoencoder (TAESD / TAESDXL of
models/VAE-approx) instead of the full VAE, when its request asks (`tiny_vae_decode`).

SD.Next calls this "VAE type: Tiny"; A1111 has no such option. It costs a fraction of a VAE
decode (on a CPU the decode of a 512x512 image drops from seconds to a fraction of one) for a
slightly softer picture. The infotext says so ("VAE decoder: TAESD", `core.infotext_options`),
so a pasted text asks for it again.

How: for the job, the VAE module's `decode` is the tiny decoder's (`applied`), so every place
that decodes (the plain run, hires fix's second pass, the refiner, SD upscale's tiles) uses it
and encoding (img2img, inpainting) still uses the full VAE; the cached module is unchanged
afterwards, as `seamless.applied` leaves it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from diffusers.models.autoencoders.vae import DecoderOutput

from pipelines.core.checks import RequestError
from pipelines.models import taesd
from pipelines.models.checkpoint_file import CheckpointError

FIELD = "tiny_vae_decode"  # the request's field


def choose(wanted: bool, files: Iterable, family: str, label: str | None = None):
    """The VAE-approx file a job that asks for the fast decode uses (None when it does not ask);
    RequestError naming `tiny_vae_decode` when no file fits the checkpoint's family."""
    if not wanted:
        return None
    file = taesd.pick_taesd(files, family)
    if file is None:
        raise RequestError(FIELD, taesd.missing_text(family, label))
    return file


def prepare(wanted: bool, files: Iterable, cache: taesd.TinyAutoencoders, family: str,
            label: str | None = None) -> taesd.TinyAutoencoder | None:
    """The loaded tiny decoder of a job that asks for the fast decode (None when it does not
    ask), from `cache`; RequestError naming `tiny_vae_decode` when no file fits the family or
    the one that fits is no TAESD decoder."""
    file = choose(wanted, files, family, label)
    if file is None:
        return None
    try:
        return cache.get(file)
    except (CheckpointError, OSError) as exc:
        raise RequestError(FIELD, f"{file.name} in models/VAE-approx did not load: {exc}") from None


def tiny_decode(vae, tiny: taesd.TinyAutoencoder):
    """A `decode` for `vae` that decodes with `tiny`. The runner divides the latents by the VAE's
    scaling factor before decoding; TAESD decodes them as sampled, so the factor goes back on."""
    scaling = float(vae.config.scaling_factor)

    def decode(z: torch.Tensor, return_dict: bool = True, **_) -> DecoderOutput | tuple:
        samples = tiny.decode_samples(z.float() * scaling).float()
        return DecoderOutput(sample=samples) if return_dict else (samples,)

    return decode


@contextlib.contextmanager
def applied(models: Sequence, tiny: taesd.TinyAutoencoder | None) -> Iterator[None]:
    """For the job: each of `models`' (components') VAEs whose family `tiny` decodes for decodes
    with it; restored afterwards, even when the job fails. Nothing changes without `tiny`."""
    if tiny is None:
        yield
        return
    patched: dict[int, tuple] = {}
    for components in models:
        vae = components.vae
        if id(vae) in patched or not tiny.fits(components.spec.family.name):
            continue
        patched[id(vae)] = (vae, vae.__dict__.get("decode"))  # an instance's own decode (a hook's) comes back
        vae.decode = tiny_decode(vae, tiny)
    try:
        yield
    finally:
        for vae, own in patched.values():
            if own is None:
                del vae.decode
            else:
                vae.decode = own
