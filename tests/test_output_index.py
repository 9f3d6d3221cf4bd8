"""The saved outputs as the Image browser lists them: newest first, paged, searched, trashed."""

from __future__ import annotations

import os
import time
from datetime import datetime

import pytest
from PIL import Image

from pipelines.core.checks import RequestError
from pipelines.core.output_index import OutputIndex
from pipelines.core.outputs import save_image


def info(prompt: str, seed: int, model: str = "tiny") -> str:
    return f"{prompt}\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, Seed: {seed}, Size: 8x8, Model: {model}"


def save(outdir, folder: str, day: int, seed: int, prompt: str = "a cat", model: str = "tiny"):
    path = save_image(Image.new("RGB", (8, 8), (seed % 256, 0, 0)), outdir, folder, seed=seed,
                      infotext=info(prompt, seed, model), now=datetime(2026, 12, day, 12))
    stamp = time.time() - 1000 + day * 10 + seed % 10  # later days and seeds: newer files
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def outdir(tmp_path):
    save(tmp_path, "txt2img-images", 1, 11, "a red cat", "tiny")
    save(tmp_path, "txt2img-images", 2, 21, "a blue dog", "tiny")
    save(tmp_path, "img2img-images", 2, 22, "a red house", "other_model")
    save(tmp_path, "extras-images", 3, 33, "a green tree", "tiny")
    return tmp_path


def names(files):
    return [f.name.split("/", 2)[2] for f in files]


def test_lists_folders_and_dates_newest_first(outdir):
    index = OutputIndex(outdir)
    assert index.folders() == ["txt2img-images", "img2img-images", "extras-images"]
    assert index.dates() == ["2026-12-03", "2026-12-02", "2026-12-01"]
    assert index.dates("txt2img-images") == ["2026-12-02", "2026-12-01"]
    assert names(index.files()) == ["00000-33.png", "00000-22.png", "00000-21.png", "00000-11.png"]
    assert names(index.files("txt2img-images")) == ["00000-21.png", "00000-11.png"]
    assert names(index.files(None, "2026-12-02")) == ["00000-22.png", "00000-21.png"]


def test_a_new_image_shows_up_and_hidden_temp_files_do_not(outdir):
    index = OutputIndex(outdir)
    assert len(index.files()) == 4
    folder = outdir / "txt2img-images" / "2026-12-02"
    (folder / ".00005.png.tmp").write_bytes(b"half")
    newest = save(outdir, "txt2img-images", 2, 29)
    os.utime(newest)  # now: the newest of all
    assert index.files()[0].name == str(newest.relative_to(outdir))
    assert len(index.files()) == 5 and not any(".tmp" in f.name for f in index.files())


def test_pages_of_a_long_listing(tmp_path):
    folder = tmp_path / "txt2img-images" / "2026-12-01"
    folder.mkdir(parents=True)
    for n in range(80):
        path = folder / f"{n:05}-{n}.png"
        path.write_bytes(b"png")
        os.utime(path, (1_000_000 + n, 1_000_000 + n))
    index = OutputIndex(tmp_path)
    files = index.files()
    first, last = index.page(files, 1, 36), index.page(files, 99, 36)
    assert (first.total, first.pages, len(first.files)) == (80, 3, 36)
    assert first.files[0].name.endswith("00079-79.png")
    assert (last.page, len(last.files)) == (3, 8) and last.files[-1].name.endswith("00000-0.png")
    assert index.page([], 1).pages == 1


def test_search_by_prompt_seed_and_model(outdir):
    index = OutputIndex(outdir)
    assert names(index.search("red")) == ["00000-22.png", "00000-11.png"]
    assert names(index.search("RED cat")) == ["00000-11.png"]
    assert names(index.search("21")) == ["00000-21.png"]
    assert names(index.search("other_model")) == ["00000-22.png"]
    assert names(index.search("red", folder="txt2img-images")) == ["00000-11.png"]
    assert index.search("zebra") == []
    assert len(index.search("  ")) == 4


def test_search_reads_each_image_once_and_keeps_what_it_read_on_disk(outdir, tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("data") / "output_index.json"
    OutputIndex(outdir, cache).search("cat")
    assert cache.is_file()
    from pipelines.core import output_index

    def no_reading(path):
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(output_index, "read_image_metadata", no_reading)
    assert names(OutputIndex(outdir, cache).search("dog")) == ["00000-21.png"]


def test_a_changed_image_is_read_again(outdir):
    index = OutputIndex(outdir)
    assert names(index.search("dog")) == ["00000-21.png"]
    path = outdir / "txt2img-images" / "2026-12-02" / "00000-21.png"
    save_image(Image.new("RGB", (8, 8)), outdir, "txt2img-images", seed=5, infotext=info("a horse", 21),
               now=datetime(2026, 12, 2, 12)).replace(path)
    assert index.search("dog") == [] and names(index.search("horse")) == ["00000-21.png"]


def test_delete_moves_into_trash_and_empty_trash_removes_it(outdir):
    index = OutputIndex(outdir)
    name = "txt2img-images/2026-12-01/00000-11.png"
    moved = index.delete(name)
    assert moved == outdir / "trash" / "txt2img-images" / "2026-12-01" / "00000-11.png" and moved.is_file()
    assert name not in [f.name for f in index.files()] and index.trash_count() == 1
    save(outdir, "txt2img-images", 1, 11)  # the same name again: both kept in the trash
    assert index.delete(name).name == "00000-11 (1).png" and index.trash_count() == 2
    assert index.empty_trash() == 2 and index.trash_count() == 0 and not (outdir / "trash").exists()
    assert len(index.files()) == 3


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", "trash/txt2img-images/x.png",
                                  "txt2img-images/../../secret.png", "txt2img-images/2026-12-01/missing.png",
                                  "txt2img-images/2026-12-01", ""])
def test_never_reads_or_moves_outside_the_saved_outputs(outdir, name):
    (outdir.parent / "secret.png").write_bytes(b"x")
    with pytest.raises(RequestError) as error:
        OutputIndex(outdir).delete(name)
    assert error.value.field == "image"
    assert (outdir.parent / "secret.png").exists()


def test_a_link_out_of_outdir_is_refused(outdir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "x.png"
    outside.write_bytes(b"x")
    (outdir / "txt2img-images" / "2026-12-01" / "link.png").symlink_to(outside)
    index = OutputIndex(outdir)
    assert "link.png" not in names(index.files())
    with pytest.raises(RequestError):
        index.delete("txt2img-images/2026-12-01/link.png")
    assert outside.exists()


def test_unknown_folder_is_named(outdir):
    with pytest.raises(RequestError) as error:
        OutputIndex(outdir).files("secrets")
    assert error.value.field == "folder" and "txt2img-images" in error.value.message


def test_ten_thousand_images_list_fast(tmp_path):
    for day in range(1, 11):
        folder = tmp_path / "txt2img-images" / f"2026-11-{day:02}"
        folder.mkdir(parents=True)
        for n in range(1000):
            (folder / f"{n:05}-{n}.png").write_bytes(b"")
    index = OutputIndex(tmp_path)
    started = time.perf_counter()
    first = index.page(index.files(), 1)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    index.page(index.files(), 2)
    warm = time.perf_counter() - started
    assert first.total == 10_000 and len(first.files) == 36
    assert cold < 3 and warm < 0.5, (cold, warm)
