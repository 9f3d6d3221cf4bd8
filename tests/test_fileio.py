"""Atomic writes: the old file or the whole new one, never half of one."""

from __future__ import annotations

import os

import pytest

from pipelines.core.fileio import atomic_path, write_bytes_atomic, write_json_atomic


def test_replaces_whole_and_keeps_nothing_else(tmp_path):
    target = tmp_path / "sub" / "cache.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert target.read_text() == '{"a": 2}'
    assert [p.name for p in target.parent.iterdir()] == ["cache.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "styles.csv"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["styles.csv"]


def test_keep_mode_preserves_permissions(tmp_path):
    target = tmp_path / "styles.csv"
    target.write_bytes(b"old")
    target.chmod(0o600)
    write_bytes_atomic(target, b"new", keep_mode=True)
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600


def test_new_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    # a saved image must be readable by whatever serves or syncs the outputs folder
    target = tmp_path / "00001-1.png"
    write_bytes_atomic(target, b"png")
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
