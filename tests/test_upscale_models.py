"""Neural upscalers: tiny spandrel models (real architectures, tiny configs) saved to files,
listed, loaded with weights_only, run tile by tile; tiling, OOM fallback, batch, blend."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from pipelines.core.progress import JobControl
from pipelines.core.request import LATENT_UPSCALE_MODES, RequestError, UpscaleRequest
from pipelines.core.settings import EngineSettings, Paths
from pipelines.engine import Engine
from pipelines.generate import tiling, upscalers
from webui.api import create_app


def write_tiny_esrgan(path: Path, scale: int = 4, seed: int = 0) -> Path:
    """ESRGAN (RRDBNet, the RealESRGAN_x4plus architecture) with 8 filters and 1 block."""
    from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet  # heavy: spandrel (a test model)

    torch.manual_seed(seed)
    net = RRDBNet(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def write_tiny_compact(path: Path, scale: int = 2, seed: int = 1) -> Path:
    """RealESRGAN Compact (SRVGGNetCompact) with 8 features and 2 convs, as .safetensors."""
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact  # heavy: spandrel (a test model)

    torch.manual_seed(seed)
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale, act_type="prelu")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


class _Hostile:
    """Unpickling this would create a marker file; weights_only must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_hostile(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model.0.weight": torch.zeros(1), "payload": _Hostile(marker)}, path)
    return path


@pytest.fixture(scope="module")
def esrgan_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ESRGAN")
    write_tiny_esrgan(root / "4x-Tiny.pth")
    write_tiny_compact(root / "sub" / "2x-TinyCompact.safetensors")
    return root


@pytest.fixture(scope="module")
def up_engine(esrgan_dir, tmp_path_factory) -> Engine:
    tmp = tmp_path_factory.mktemp("upengine")
    return Engine(Paths(models_dir=tmp / "models", esrgan_dir=esrgan_dir, data_dir=tmp / "data",
                        outdir=tmp / "outputs"), EngineSettings(device="cpu"))


def _image(w=40, h=30, seed=1) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _smooth(w=96, h=80) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 60], -1)
    return Image.fromarray(arr.astype(np.uint8))


# --- listing and loading ------------------------------------------------------------------

def test_models_are_listed_after_the_builtins_with_their_native_scale(up_engine):
    names = up_engine.upscaler_names()
    assert names[:3] == ["Lanczos", "Nearest", "Bicubic"]
    assert names[3:] == ["4x-Tiny", "sub/2x-TinyCompact"]
    found = {u.name: u for u in up_engine.upscalers()}
    assert found["4x-Tiny"].scale == 4 and found["4x-Tiny"].architecture == "ESRGAN"
    assert found["sub/2x-TinyCompact"].scale == 2
    assert up_engine.hires_upscaler_names()[:6] == list(LATENT_UPSCALE_MODES)
    assert "4x-Tiny" in up_engine.hires_upscaler_names()


def test_listing_builds_no_weights(esrgan_dir):
    details = upscalers.describe_model_file(esrgan_dir / "4x-Tiny.pth")
    assert details == {"architecture": "ESRGAN", "scale": 4, "tiling": "supported"}


def test_hostile_pth_is_refused_never_executed_and_not_listed(tmp_path):
    marker = tmp_path / "pwned"
    bad = write_hostile(tmp_path / "ESRGAN" / "4x-Evil.pth", marker)
    write_tiny_esrgan(tmp_path / "ESRGAN" / "4x-Good.pth")
    with pytest.raises(upscalers.UpscalerLoadError, match="refused"):
        upscalers.read_state_dict(bad)
    with pytest.raises(upscalers.UpscalerLoadError):
        upscalers.load_model_file(bad)
    engine = Engine(Paths(models_dir=tmp_path, data_dir=tmp_path / "data", outdir=tmp_path / "out"),
                    EngineSettings(device="cpu"))
    assert "4x-Good" in engine.upscaler_names() and "4x-Evil" not in engine.upscaler_names()
    assert not marker.exists()


def test_spandrels_own_loader_is_not_used_for_pickles(tmp_path, monkeypatch):
    """Every pickle goes through torch.load(weights_only=True)."""
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    upscalers.load_model_file(write_tiny_esrgan(tmp_path / "m.pth"))
    assert seen == [True]


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(upscalers.UpscalerLoadError, match="no architecture"):
        upscalers.load_model_file(path)


# --- scale and size -------------------------------------------------------------------------

@pytest.mark.parametrize("name, scale, size", [
    ("4x-Tiny", 4, (160, 120)), ("4x-Tiny", 2, (80, 60)), ("4x-Tiny", 8, (320, 240)),
    ("sub/2x-TinyCompact", 2, (80, 60)), ("sub/2x-TinyCompact", 3, (120, 90)),
])
def test_upscale_by_factor(up_engine, name, scale, size):
    result = up_engine.upscale(UpscaleRequest(image=_image(), upscaler=name, scale=scale, save_images=False))
    assert result.images[0].size == size
    assert f"Postprocess upscaler: {name}" in result.infotexts[0]


def test_native_pass_really_is_the_model(up_engine):
    """At the native factor, the output is the model's output, not a resampled image."""
    image = _image()
    model = up_engine.upscaler_models.get(next(u.path for u in up_engine.upscalers() if u.name == "4x-Tiny"))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    expected = (model(tensor)[0].permute(1, 2, 0).numpy() * 255).round()
    got = up_engine.upscale(UpscaleRequest(image=image, upscaler="4x-Tiny", scale=4, tile_size=0,
                                           save_images=False)).images[0]
    assert np.abs(np.asarray(got, dtype=np.float32) - expected).max() <= 1


def test_upscale_to_target_size(up_engine):
    result = up_engine.upscale(UpscaleRequest(image=_image(), upscaler="4x-Tiny", target_width=100,
                                              target_height=100, save_images=False))
    assert result.images[0].size == (100, 100)
    assert "Postprocess upscale to: 100x100" in result.infotexts[0]


# --- tiling ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untiled(up_engine):
    image = _image(70, 52, seed=3)
    return image, up_engine.upscale(UpscaleRequest(image=image, upscaler="4x-Tiny", scale=4, tile_size=0,
                                                   save_images=False)).images[0]


@pytest.mark.parametrize("tile, overlap", [(32, 8), (40, 16)])
def test_tiled_matches_untiled(up_engine, untiled, tile, overlap):
    image, whole = untiled
    tiled = up_engine.upscale(UpscaleRequest(image=image, upscaler="4x-Tiny", scale=4, tile_size=tile,
                                             tile_overlap=overlap, save_images=False)).images[0]
    diff = np.abs(np.asarray(whole, dtype=np.int16) - np.asarray(tiled, dtype=np.int16))
    assert tiled.size == whole.size == (280, 208)
    assert diff.max() <= 3, f"seams differ by up to {diff.max()}"
    assert diff.mean() < 0.05


def test_tiles_cover_evenly_and_feathers_sum_to_one():
    assert tiling.positions(100, 200, 16) == [0]
    starts = tiling.positions(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 68
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))
    # two tiles overlapping by 16: their weights add up to 1 across the overlap
    a, b = tiling.feather(32, 0, 16), tiling.feather(32, 16, 0)
    assert np.allclose(a[16:] + b[:16], 1.0, atol=1e-3)
    assert np.allclose(a[:16], 1.0) and np.allclose(b[16:], 1.0)


def test_band_accumulation_keeps_memory_per_row():
    """Identity 'model' (scale 1): tiling returns the image exactly."""
    image = torch.rand(1, 3, 70, 90)
    out = tiling.tile_once(lambda t: t, image, 1, 24, 8)
    expected = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(out, expected)


def test_out_of_memory_halves_the_tile():
    image = torch.rand(1, 3, 64, 64)
    sizes = []

    def fn(t):
        sizes.append(t.shape[-1])
        if t.shape[-1] > 16:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")

    out, used = tiling.run_tiled(fn, image, 2, 0, 4, min_tile=8)
    assert used == 16 and out.shape == (128, 128, 3)
    assert sizes[0] == 64 and sizes[-1] == 16
    with pytest.raises(RuntimeError):
        tiling.run_tiled(fn, image, 2, 0, 4, min_tile=32)
    with pytest.raises(ValueError):  # other errors are not retried
        tiling.run_tiled(lambda t: (_ for _ in ()).throw(ValueError("bad")), image, 2, 32, 4)


def test_cancel_between_tiles(up_engine):
    control = JobControl()
    control.interrupt()
    result = up_engine.upscale(UpscaleRequest(image=_image(), upscaler="4x-Tiny", scale=4, tile_size=16,
                                              save_images=False), control=control)
    assert result.images == [] and result.interrupted


# --- second upscaler, batch, progress, saving -------------------------------------------------

def test_second_upscaler_is_blended_by_visibility(up_engine):
    image = _smooth()
    only = {name: up_engine.upscale(UpscaleRequest(image=image, upscaler=name, scale=2, save_images=False))
            .images[0] for name in ("Nearest", "sub/2x-TinyCompact")}
    mixed = up_engine.upscale(UpscaleRequest(image=image, upscaler="Nearest", upscaler_2="sub/2x-TinyCompact",
                                             upscaler_2_visibility=0.25, scale=2, save_images=False))
    a, b = (np.asarray(only[n], dtype=np.float32) for n in ("Nearest", "sub/2x-TinyCompact"))
    got = np.asarray(mixed.images[0], dtype=np.float32)
    assert np.abs(got - (0.75 * a + 0.25 * b)).max() <= 1
    assert "Postprocess upscaler 2: sub/2x-TinyCompact, Postprocess upscaler 2 visibility: 0.25" in mixed.infotexts[0]
    with pytest.raises(RequestError) as info:
        up_engine.upscale(UpscaleRequest(image=image, upscaler_2="nope", upscaler_2_visibility=0.5))
    assert info.value.field == "upscaler_2"


def test_batch_upscales_every_image_and_reports_progress(up_engine, tmp_path):
    seen = []
    images = (_image(40, 30, 1), _image(20, 24, 2), _image(33, 17, 3).convert("L"))
    result = up_engine.upscale(UpscaleRequest(images=images, upscaler="4x-Tiny", scale=2, tile_size=16,
                                              save_images=True), on_progress=seen.append)
    assert [i.size for i in result.images] == [(80, 60), (40, 48), (66, 34)]
    assert len(result.paths) == 3 and all(Path(p).is_file() for p in result.paths)
    assert Image.open(result.paths[0]).info["parameters"] == result.infotexts[0]
    assert {p.batch_index for p in seen} == {0, 1, 2} and all(p.batch_count == 3 for p in seen)
    assert any(p.steps > 1 for p in seen)  # tiles counted


def test_alpha_survives_a_neural_upscaler(up_engine):
    image = _image().convert("RGBA")
    image.putalpha(128)
    out = up_engine.upscale(UpscaleRequest(image=image, upscaler="4x-Tiny", scale=4, save_images=False)).images[0]
    assert out.mode == "RGBA" and out.getchannel("A").getextrema() == (128, 128)


def test_request_validation():
    with pytest.raises(RequestError) as info:
        UpscaleRequest()
    assert info.value.field == "image"
    with pytest.raises(RequestError) as info:
        UpscaleRequest(image=_image(), tile_size=-1)
    assert info.value.field == "tile_size"
    with pytest.raises(RequestError) as info:
        UpscaleRequest(image=_image(), upscaler_2_visibility=2)
    assert info.value.field == "upscaler_2_visibility"
    assert UpscaleRequest(image=_image(), upscaler_2="None").upscaler_2 is None
    assert len(UpscaleRequest(images=[_image(), _image()]).all_images) == 2


def test_unknown_upscaler_names_the_field(up_engine):
    with pytest.raises(RequestError) as info:
        up_engine.upscale(UpscaleRequest(image=_image(), upscaler="8x-Nothing"))
    assert info.value.field == "upscaler" and "4x-Tiny" in info.value.message


def _tiny_span():
    from spandrel.architectures.SPAN.__arch.span import SPAN  # heavy: spandrel (a test model)

    return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2)


def _tiny_swinir():
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR  # heavy: spandrel (a test model)

    return SwinIR(upscale=2, in_chans=3, img_size=16, window_size=4, img_range=1.0, depths=[1], embed_dim=12,
                  num_heads=[2], mlp_ratio=2, upsampler="pixelshuffledirect")


@pytest.mark.parametrize("build, arch", [(_tiny_span, "SPAN"), (_tiny_swinir, "SwinIR")])
def test_other_architectures_are_detected_listed_and_run(tmp_path, build, arch):
    torch.manual_seed(0)
    path = tmp_path / f"2x-{arch}.pth"
    torch.save(build().state_dict(), path)
    details = upscalers.describe_model_file(path)
    assert details["architecture"] == arch and details["scale"] == 2
    upscaler = upscalers.ModelUpscaler(path.stem, path, 2, upscalers.UpscalerModels()).with_options(
        upscalers.TileOptions(tile=32, overlap=8))
    assert upscalers.upscale_image(_image(45, 38), upscaler, scale=2).size == (90, 76)


def test_layout_shrinks_tiles_instead_of_overlapping_a_lot():
    size, starts = tiling.layout(512, 256, 16)
    assert size == 182 and len(starts) == 3 and starts[-1] + size == 512
    assert min(a + size - b for a, b in zip(starts, starts[1:])) >= 16
    assert tiling.layout(300, 512, 16) == (300, [0])


def test_rest_api_lists_model_upscalers_with_their_scale(up_engine):
    listed = {u["name"]: u for u in TestClient(create_app(up_engine)).get("/sdapi/v1/upscalers").json()}
    assert listed["None"]["scale"] is None and listed["Lanczos"]["model_path"] is None
    assert listed["4x-Tiny"]["scale"] == 4 and listed["4x-Tiny"]["model_name"] == "ESRGAN"
    assert listed["4x-Tiny"]["model_path"].endswith("4x-Tiny.pth")
