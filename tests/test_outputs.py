"""Saving images: A1111 folder layout and numbering, metadata, no half-written files."""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from pipelines.core import outputs
from pipelines.core.outputs import OutputError, read_infotext, save_image

NOW = datetime(2024, 5, 17, 12, 0, 0)
INFO = "a cat, (ears:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 1234, Size: 8x8"


def _image(colour=(10, 20, 30)) -> Image.Image:
    return Image.new("RGB", (8, 8), colour)


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_saves_numbered_files_in_dated_folder_with_parameters(tmp_path):
    first = save_image(_image(), tmp_path, "txt2img-images", seed=1234, infotext=INFO, now=NOW)
    second = save_image(_image(), tmp_path, "txt2img-images", seed=1235, infotext=INFO, now=NOW)
    assert first == tmp_path / "txt2img-images" / "2024-05-17" / "00000-1234.png"
    assert second.name == "00001-1235.png"
    assert read_infotext(first) == INFO
    with Image.open(first) as image:
        assert image.format == "PNG" and image.info["parameters"] == INFO
        assert image.getpixel((0, 0)) == (10, 20, 30)


def test_without_seed_and_without_text(tmp_path):
    path = save_image(_image(), tmp_path, "extras-images", seed=None, infotext=None, now=NOW)
    assert path.name == "00000.png"
    assert read_infotext(path) is None


def test_numbering_continues_after_the_highest_existing_number(tmp_path):
    folder = tmp_path / "img2img-images" / "2024-05-17"
    folder.mkdir(parents=True)
    (folder / "00007-99.png").write_bytes(b"x")
    (folder / "00002-5.png").write_bytes(b"x")
    (folder / "notes.txt").write_text("not numbered")
    path = save_image(_image(), tmp_path, "img2img-images", seed=3, infotext=INFO, now=NOW)
    assert path.name == "00008-3.png"


def test_new_day_starts_a_new_folder(tmp_path):
    save_image(_image(), tmp_path, "txt2img-images", seed=1, infotext=None, now=NOW)
    later = save_image(_image(), tmp_path, "txt2img-images", seed=2, infotext=None,
                       now=datetime(2024, 5, 18, 0, 0, 1))
    assert later.parent.name == "2024-05-18" and later.name == "00000-2.png"


def test_unicode_prompt_survives(tmp_path):
    text = "一只猫 🐱, café\nSteps: 20, Seed: 1, Size: 8x8"
    path = save_image(_image(), tmp_path, "txt2img-images", seed=1, infotext=text, now=NOW)
    assert read_infotext(path) == text


def test_concurrent_saves_get_distinct_numbers(tmp_path):
    paths: list[Path] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            paths.append(save_image(_image((i, i, i)), tmp_path, "txt2img-images", seed=100 + i,
                                    infotext=f"p{i}\nSteps: 1, Seed: {100 + i}, Size: 8x8", now=NOW))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    numbers = sorted(p.name.split("-")[0] for p in paths)
    assert numbers == [f"{i:05}" for i in range(8)]
    assert len(set(paths)) == 8
    for path in paths:  # each file has its own image and text
        seed = int(path.stem.split("-")[1])
        assert read_infotext(path).endswith(f"Seed: {seed}, Size: 8x8")
    assert not [n for n in os.listdir(paths[0].parent) if n.endswith(".tmp")]


def test_failure_at_rename_leaves_nothing_and_raises_output_error(tmp_path, monkeypatch):
    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", disk_full)
    with pytest.raises(OutputError) as info:
        save_image(_image(), tmp_path, "txt2img-images", seed=1, infotext=INFO, now=NOW)
    assert "disk is full" in str(info.value)
    assert _all_files(tmp_path) == []


def test_failure_while_writing_leaves_nothing_and_raises_output_error(tmp_path, monkeypatch):
    real_write = outputs.write_png

    def half_written(image, handle, infotext):
        real_write(image, handle, infotext)  # some bytes reach the temp file...
        raise OSError(errno.EIO, "Input/output error")  # ...then the device fails

    monkeypatch.setattr(outputs, "write_png", half_written)
    with pytest.raises(OutputError):
        save_image(_image(), tmp_path, "txt2img-images", seed=1, infotext=INFO, now=NOW)
    assert _all_files(tmp_path) == []

    # the next save works and reuses the number (nothing was left behind)
    monkeypatch.setattr(outputs, "write_png", real_write)
    path = save_image(_image(), tmp_path, "txt2img-images", seed=1, infotext=INFO, now=NOW)
    assert path.name == "00000-1.png"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions as non-root")
def test_unwritable_folder_raises_output_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError) as info:
            save_image(_image(), tmp_path, "txt2img-images", seed=1, infotext=None, now=NOW)
        assert "permission" in str(info.value)
    finally:
        tmp_path.chmod(0o700)


def test_permission_error_is_reported_clearly(tmp_path, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(OutputError) as info:
        save_image(_image(), tmp_path, "txt2img-images", seed=1, infotext=None, now=NOW)
    assert "permission denied" in str(info.value) and "txt2img-images" in str(info.value)


def test_number_reserved_by_another_writer_is_skipped(tmp_path):
    # another process is mid-write on 00000 (its hidden temp file holds the number)
    folder = tmp_path / "txt2img-images" / "2024-05-17"
    folder.mkdir(parents=True)
    (folder / ".00000.png.tmp").write_bytes(b"partial")
    path = save_image(_image(), tmp_path, "txt2img-images", seed=9, infotext=None, now=NOW)
    assert path.name == "00001-9.png"
    assert (folder / ".00000.png.tmp").read_bytes() == b"partial"  # not ours to touch


def test_temp_files_left_by_a_dead_writer_are_cleared_by_the_next_save(tmp_path):
    folder = tmp_path / "txt2img-images" / "2024-05-17"
    folder.mkdir(parents=True)
    dead, live = folder / ".00003.png.tmp", folder / ".00004.png.tmp"
    dead.write_bytes(b"half a png from a killed process")
    live.write_bytes(b"another process writing right now")
    hours_ago = time.time() - outputs.STALE_TEMP_SECONDS - 60
    os.utime(dead, (hours_ago, hours_ago))
    (folder / "00002-1.png").write_bytes(b"x")
    os.utime(folder / "00002-1.png", (hours_ago, hours_ago))  # an old final file is never touched
    path = save_image(_image(), tmp_path, "txt2img-images", seed=9, infotext=None, now=NOW)
    assert path.name == "00005-9.png"
    assert sorted(os.listdir(folder)) == [".00004.png.tmp", "00002-1.png", "00005-9.png"]


def test_number_finished_by_another_process_during_reservation_is_given_back(tmp_path, monkeypatch):
    # Race: between our folder scan and our exclusive create, another process writes and
    # renames 00000-77.png. Our temp name was free, but the number is not: we must move on.
    real_open = os.open
    raced = []

    def racing_open(path, flags, *args):
        if str(path).endswith(".00000.png.tmp") and not raced:
            raced.append(True)
            Path(path).with_name("00000-77.png").write_bytes(b"other")
        return real_open(path, flags, *args)

    monkeypatch.setattr(outputs.os, "open", racing_open)
    path = save_image(_image(), tmp_path, "txt2img-images", seed=9, infotext=None, now=NOW)
    assert raced and path.name == "00001-9.png"
    assert sorted(os.listdir(path.parent)) == ["00000-77.png", "00001-9.png"]


def test_folder_must_be_a_plain_name(tmp_path):
    for bad in ("../escape", "a/b", ".."):
        with pytest.raises(ValueError):
            save_image(_image(), tmp_path, bad, seed=1, infotext=None, now=NOW)


def test_read_infotext_from_image_object_and_jpeg_exif():
    image = _image()
    image.info["parameters"] = INFO
    assert read_infotext(image) == INFO

    # A1111 stores JPEG/WebP parameters as EXIF UserComment: "UNICODE\0" + UTF-16.
    for encoding in ("utf-16-be", "utf-16-le"):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + INFO.encode(encoding)
        buffer = io.BytesIO()
        _image().save(buffer, format="JPEG", exif=exif)
        buffer.seek(0)
        assert read_infotext(buffer) == INFO, encoding

    buffer = io.BytesIO()
    _image().save(buffer, format="JPEG")
    buffer.seek(0)
    assert read_infotext(buffer) is None


def test_a_job_saves_in_the_format_and_name_its_save_options_say(engine):
    """The Settings tab's / options' format, quality and file-name pattern reach the saved file."""
    from pipelines.core.metadata_read import read_image_metadata
    from pipelines.core.request import GenerationRequest
    from pipelines.core.save_formats import SaveOptions

    options = SaveOptions(format="jpg", quality=90, filename_pattern="[seed]-[prompt_words]")
    result = engine.generate(GenerationRequest(prompt="a red circle", seed=41, steps=2, width=64, height=64,
                                               save_options=options))
    path = Path(result.paths[0])
    assert path.suffix == ".jpg" and path.stem.endswith("-41-a red circle")
    with Image.open(path) as saved:
        assert saved.format == "JPEG"
        assert read_image_metadata(saved).infotext == result.infotexts[0]
