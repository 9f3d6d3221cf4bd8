"""Live previews (pipelines/generate/previews.py): the two A1111 settings ("Live preview display
method", "every N steps"), TAESD decoding from models/VAE-approx, and the cheap map standing in
(said once) when no TAESD file fits the job's family."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_taesd import original_layout, tiny_autoencoder, write

from pipelines.core.checks import RequestError
from pipelines.core.progress import JobControl, Progress
from pipelines.core.user_settings import SettingsStore, check_setting
from pipelines.generate import previews
from pipelines.models import taesd

LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 2


def progress(step: int, steps: int = 6, latents=LATENTS) -> Progress:
    return Progress(step=step, steps=steps, batch_index=0, batch_count=1, elapsed=0.1, eta=1.0,
                    preview=previews.preview_of(latents))


def listed(path, name=None):
    """A VAE-approx file as the registry lists it: name relative to the folder, path."""
    return SimpleNamespace(name=name or path.name, path=path)


def live(files, method="TAESD", every=1):
    values = {"show_progress_type": method, "show_progress_every_n_steps": every}
    return previews.LivePreviews(lambda: files, lambda: values, taesd.TinyAutoencoders())


@pytest.fixture(scope="module")
def taesd_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("VAE-approx")
    return write(folder / "taesd_decoder.safetensors", original_layout(tiny_autoencoder(seed=1)), "safetensors")


def test_the_settings_table_offers_the_methods_this_server_makes():
    assert check_setting("show_progress_type", "taesd") == "TAESD"
    assert check_setting("show_progress_type", "Approx cheap") == "Approx cheap"
    with pytest.raises(RequestError, match="show_progress_type"):  # A1111's network is not shipped: said, by name
        check_setting("show_progress_type", "Approx NN")
    assert SettingsStore(None).get("show_progress_every_n_steps") == 1  # a preview at every step, as before


def test_every_nth_step_keeps_the_last_preview_between_and_zero_shows_none():
    job = previews.JobPreviews(previews.PreviewSettings(every_n_steps=3))
    reports = [job(progress(step, latents=LATENTS * step)) for step in range(1, 7)]
    assert reports[0].preview is None and reports[1].preview is None  # nothing before step 3
    assert reports[2].preview is reports[3].preview is reports[4].preview  # step 3's, until step 6
    assert torch.equal(reports[2].preview.latents, LATENTS * 3)
    assert torch.equal(reports[5].preview.latents, LATENTS * 6)
    last = job(progress(5, steps=5))  # the last step of a batch always shows
    assert torch.equal(last.preview.latents, LATENTS)
    never = previews.JobPreviews(previews.PreviewSettings(every_n_steps=0))
    assert never(progress(3)).preview is None


def test_a_preview_is_decoded_once_however_often_it_is_polled():
    calls = []
    job = previews.JobPreviews(previews.PreviewSettings(), decode=lambda latents: calls.append(1) or "picture")
    report = job(progress(1))
    assert report.preview() == report.preview() == "picture" and len(calls) == 1


def test_taesd_previews_decode_with_the_tiny_autoencoder_at_full_size(taesd_file):
    control = JobControl()
    job = live([listed(taesd_file)]).for_job("sd1", control, "SD 1.x")
    picture = job(progress(1)).preview()
    expected = taesd.to_images(tiny_autoencoder(seed=1).decode(LATENTS[:1]).sample)[0]
    assert picture.size == (64, 64)  # 8x8 latents, full size
    assert np.array_equal(np.asarray(picture), np.asarray(expected))
    assert control.notes == []


def test_the_cheap_map_is_the_default_and_costs_no_file(taesd_file):
    job = live([listed(taesd_file)], method="Approx cheap").for_job("sd1")
    assert job(progress(1)).preview().size == (8, 8)  # latent size: no decoding


def test_without_a_file_for_the_family_the_cheap_map_stands_in_and_says_so_once(taesd_file):
    server = live([listed(taesd_file)])  # SD 1.x's file only
    first, second = JobControl(), JobControl()
    job = server.for_job("sdxl", first, "SDXL")
    assert job(progress(1)).preview().size == (8, 8)
    assert len(first.notes) == 1 and "taesdxl_decoder.pth" in first.notes[0] and "cheap" in first.notes[0]
    server.for_job("sdxl", second, "SDXL")
    assert second.notes == []  # once per server, not at every job


def test_a_file_that_does_not_load_falls_back_and_says_so(tmp_path):
    broken = tmp_path / "taesd_decoder.safetensors"
    broken.write_bytes(b"not a safetensors file")
    control = JobControl()
    job = live([listed(broken)]).for_job("sd1", control)
    assert job(progress(1)).preview().size == (8, 8)
    assert len(control.notes) == 1 and "taesd_decoder.safetensors" in control.notes[0]


def test_reports_without_latents_pass_through():
    job = previews.JobPreviews(previews.PreviewSettings(every_n_steps=2))
    bare = Progress(step=2, steps=4, batch_index=0, batch_count=1, elapsed=0.0, eta=None)
    assert job(bare) is bare


# --- through the engine: the settings of the data folder, the job's family, its notes -----------

def test_a_job_previews_the_way_the_settings_say(tmp_path, taesd_file):
    from conftest import make_engine
    from test_tiny_decode import request
    from tiny import write_tiny_sd1_checkpoint

    from pipelines.core.user_settings import settings_in

    models = tmp_path / "models"
    write_tiny_sd1_checkpoint(models / "Stable-diffusion" / "tiny.safetensors", seed=0)
    engine = make_engine(models, tmp_path)
    store = settings_in(engine.paths.data_dir)
    store.update({"show_progress_type": "TAESD", "show_progress_every_n_steps": 2})
    reports = []
    result = engine.generate(request(steps=3), on_progress=reports.append)
    assert [r.preview is None for r in reports] == [True, False, False]  # step 1: none yet; 2; 3 (the last)
    assert reports[1].preview is not reports[2].preview
    assert "taesd_decoder.pth" in " ".join(result.warnings)  # no TAESD file in this models folder: said
    assert reports[2].preview().size == (8, 8)  # the cheap map stood in

    write(models / "VAE-approx" / "taesd_decoder.safetensors", original_layout(tiny_autoencoder(seed=1)),
          "safetensors")
    reports.clear()
    result = engine.generate(request(steps=2), on_progress=reports.append)
    assert reports[-1].preview().size == (64, 64) and not result.warnings  # TAESD, at full size
