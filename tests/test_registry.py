"""The registry's name rules: every name A1111 clients use finds a listed checkpoint (file
name with or without folder, stem, title, model_name, the hashes once known), and nothing
but a listed file is ever found."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipelines.core.fileio import sha256_file
from pipelines.core.settings import MODEL_KINDS
from pipelines.models.registry import ModelRegistry
from pipelines.models.stores import HashCache

MiB = 1 << 20


def make_registry(tmp_path: Path) -> ModelRegistry:
    models = tmp_path / "models"
    folders = {kind: models / MODEL_KINDS[kind].folder for kind in MODEL_KINDS}
    return ModelRegistry(folders, HashCache(tmp_path / "data" / "hashes.json"))


@pytest.fixture
def listed(tmp_path):
    """A registry over models/ with a checkpoint in a subfolder (2 MiB of fixed bytes: past the
    legacy hash's 1 MiB offset), a second checkpoint and a VAE; (registry, the file's bytes)."""
    data = bytes(range(256)) * (2 * MiB // 256)
    checkpoints = tmp_path / "models" / "Stable-diffusion"
    (checkpoints / "sub").mkdir(parents=True)
    (checkpoints / "sub" / "My Model.safetensors").write_bytes(data)
    (checkpoints / "other.ckpt").write_bytes(b"\x80" + bytes(100))
    (tmp_path / "models" / "VAE").mkdir(parents=True)
    (tmp_path / "models" / "VAE" / "Clear.safetensors").write_bytes(b"vae")
    return make_registry(tmp_path), data


@pytest.mark.parametrize("name", [
    "sub/My Model.safetensors",  # the listing name
    "My Model.safetensors",  # without its folder
    "My Model",  # the stem
    "sub/My Model",  # without the extension
    "sub_My Model",  # A1111's model_name
    "sub\\My Model.safetensors",  # a Windows client's title
    "sub/My Model.safetensors [0123456789]",  # a title (the hash part is not checked)
    "  my model.SAFETENSORS ",  # any case, spaces around
])
def test_a_checkpoint_answers_to_every_a1111_name(listed, name):
    registry, _ = listed
    found = registry.find("checkpoints", name)
    assert found is not None and found.name == "sub/My Model.safetensors"


def test_hashes_find_a_checkpoint_once_it_was_hashed(listed):
    registry, data = listed
    sha = hashlib.sha256(data).hexdigest()
    legacy = hashlib.sha256(data[MiB:MiB + (64 << 10)]).hexdigest()[:8]
    assert registry.find("checkpoints", sha[:10]) is None  # a listing never hashes
    file = registry.find("checkpoints", "My Model")
    assert registry.ensure_hash(file) == sha
    assert (file.short_hash, file.legacy_hash) == (sha[:10], legacy)
    assert file.title == f"sub/My Model.safetensors [{sha[:10]}]" and file.model_name == "sub_My Model"
    for name in (sha[:10], sha[:10].upper(), sha, sha[:12], legacy):
        found = registry.find("checkpoints", name)
        assert found is not None and found.name == "sub/My Model.safetensors", name
    assert registry.find("checkpoints", sha[:7]) is None  # too short to be a hash
    # known to a new registry over the same data dir (the hash cache is a file)
    again = make_registry(Path(registry.hashes.path).parent.parent)
    assert again.find("checkpoints", legacy).sha256 == sha


def test_only_listed_files_are_found(listed, tmp_path):
    registry, _ = listed
    path = tmp_path / "models" / "Stable-diffusion" / "sub" / "My Model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    for name in (str(path), str(outside), "../elsewhere.safetensors", "elsewhere", "", "   "):
        assert registry.find("checkpoints", name) is None, name
    assert registry.find("checkpoints", "other").name == "other.ckpt"


def test_other_kinds_keep_exact_names(listed):
    registry, _ = listed
    assert registry.find("vae", "Clear").name == "Clear.safetensors"
    assert registry.find("vae", "Clear.safetensors [abc]").name == "Clear.safetensors"
    assert registry.find("vae", "clear") is None  # case and hashes are checkpoint rules


def test_a_file_added_after_the_listing_is_found(listed, tmp_path):
    registry, _ = listed
    assert registry.find("checkpoints", "late") is None
    folder = tmp_path / "models" / "Stable-diffusion" / "sub"
    before = folder.stat()
    (folder / "late.safetensors").write_bytes(b"x")
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))  # the cached listing looks current
    assert registry.find("checkpoints", "late").name == "sub/late.safetensors"


def test_sha256_file_covers_ranges_folders_and_progress(tmp_path):
    data = os.urandom(3 * MiB)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    seen = []
    assert sha256_file(path, seen.append) == hashlib.sha256(data).hexdigest()
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert sha256_file(path, start=MiB, size=1000) == hashlib.sha256(data[MiB:MiB + 1000]).hexdigest()
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_bytes(b"{}")
    (folder / "unet" / "w.bin").write_bytes(b"abc")
    expected = hashlib.sha256(b"model_index.json\0{}unet/w.bin\0abc").hexdigest()
    assert sha256_file(folder) == expected


def test_slow_descriptions_are_remembered_across_starts_until_the_file_changes(tmp_path):
    """An upscaler's description (spandrel builds its network) is read once per file version, not at
    every start; a file that could not be described is tried again at the next start."""
    upscalers = tmp_path / "models" / "ESRGAN"
    upscalers.mkdir(parents=True)
    (upscalers / "4x.pth").write_bytes(b"weights")
    (upscalers / "broken.pth").write_bytes(b"junk")
    calls: list[str] = []

    def describe(path: Path) -> dict:
        calls.append(path.name)
        if path.name == "broken.pth":
            raise ValueError("not readable")
        return {"architecture": "ESRGAN", "scale": 4}

    def start() -> dict:
        folders = {kind: tmp_path / "models" / MODEL_KINDS[kind].folder for kind in MODEL_KINDS}
        registry = ModelRegistry(folders, HashCache(tmp_path / "data" / "hashes.json"),
                                 describers={"esrgan": describe}, remembered_kinds=("esrgan",))
        return {f.name: f.details for f in registry.list("esrgan")}

    first = start()
    assert first == {"4x.pth": {"architecture": "ESRGAN", "scale": 4}, "broken.pth": {"error": "not readable"}}
    assert sorted(calls) == ["4x.pth", "broken.pth"]
    assert start() == first and sorted(calls) == ["4x.pth", "broken.pth", "broken.pth"]
    stat = (upscalers / "4x.pth").stat()
    os.utime(upscalers / "4x.pth", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # replaced
    start()
    assert sorted(calls) == ["4x.pth", "4x.pth", "broken.pth", "broken.pth", "broken.pth"]
