"""GET /memory and GET /extensions in A1111's shapes: what the process and the GPU hold, and the
extensions this server found (with their git state, for the ones installed as git clones)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import psutil
from fastapi import APIRouter

from pipelines.core.engine_api import EngineAPI

GIT_TIMEOUT_S = 5


def memory_report(engine: EngineAPI) -> dict[str, Any]:
    """A1111's {"ram": {free, used, total}, "cuda": {...} or {"error": ...}} from the engine's
    own memory report (bytes): `used` is this process's resident memory, `free` what the system
    has available, `total` its RAM; "cuda" holds the device's free/used/total (`system`) and
    torch's current and peak `allocated` / `reserved` memory."""
    report = engine.cache_memory()
    system = psutil.virtual_memory()
    used = report.get("process_rss_bytes")
    ram = {"free": system.available, "used": used if used is not None else psutil.Process().memory_info().rss,
           "total": system.total}
    if report.get("vram_allocated_bytes") is None:
        return {"ram": ram, "cuda": {"error": f"unavailable: the engine runs on {report.get('device', 'the CPU')}"}}
    cuda: dict[str, Any] = {
        "allocated": {"current": report["vram_allocated_bytes"], "peak": report.get("vram_peak_allocated_bytes")},
        "reserved": {"current": report.get("vram_reserved_bytes"), "peak": report.get("vram_peak_reserved_bytes")},
    }
    free, total = report.get("vram_free_bytes"), report.get("vram_total_bytes")
    if free is not None and total is not None:
        cuda["system"] = {"free": free, "used": total - free, "total": total}
    return {"ram": ram, "cuda": cuda}


def git_stamp(folder: Path) -> tuple[int, int] | None:
    """What changes when a clone's checkout does (HEAD and the index); None when not a clone."""
    if not (folder / ".git").exists():
        return None
    stamps = []
    for name in ("HEAD", "index"):
        try:
            stamps.append((folder / ".git" / name).stat().st_mtime_ns)
        except OSError:
            stamps.append(0)
    return stamps[0], stamps[1]


def git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


@functools.lru_cache(maxsize=64)  # one entry per extension clone and checkout state
def git_info(folder: str, stamp: tuple[int, int]) -> dict[str, Any]:
    """remote, branch, commit_hash and commit_date (unix seconds) of a clone's checkout."""
    path = Path(folder)
    date = git(path, "log", "-1", "--format=%ct")
    branch = git(path, "rev-parse", "--abbrev-ref", "HEAD")
    return {"remote": git(path, "config", "--get", "remote.origin.url"),
            "branch": None if branch == "HEAD" else branch,  # "HEAD": a detached checkout
            "commit_hash": git(path, "rev-parse", "HEAD"),
            "commit_date": int(date) if date and date.isdigit() else None}


def extension_items(engine: EngineAPI) -> list[dict[str, Any]]:
    manager = engine.extensions
    items = []
    for ext in (manager.list() if manager is not None else []):
        folder = Path(ext["folder"])
        stamp = git_stamp(folder)
        info = git_info(str(folder), stamp) if stamp is not None else \
            {"remote": None, "branch": None, "commit_hash": None, "commit_date": None}
        version = ext.get("version") or (info["commit_hash"] or "")[:8] or None
        items.append({"name": ext["id"], **info, "version": version, "enabled": ext["status"] == "enabled"})
    return items


def add_system_routes(router: APIRouter, engine: EngineAPI) -> None:
    @router.get("/memory")
    def memory():
        """A1111's shape, in bytes. ram: `used` is this server process's resident memory, `free`
        what the system has available, `total` its RAM. cuda: `system` (the device's free, used,
        total), `allocated` and `reserved` (torch's current and peak); {"error": ...} when the
        engine does not run on CUDA."""
        return memory_report(engine)

    @router.get("/extensions")
    def extensions():
        """Every extension found (A1111's shape): `name` is its id, `enabled` whether it is loaded
        and running (a failed or incompatible one is not), `version` its manifest's version (else
        the short commit hash); remote, branch, commit_hash and commit_date (unix seconds) come
        from git for an extension installed as a clone, null otherwise."""
        return extension_items(engine)
