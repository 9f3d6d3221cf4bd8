"""Discovery, loading, state and isolation of extensions (the host side of `extensions.api`).

`ExtensionManager` finds extension folders (each with a manifest), refuses those written for
another API version, imports the rest under their own module names, and calls their hooks
for the engine. Every call into extension code is guarded: an exception is logged,
the extension is disabled for the rest of this run with its error as status, and a notice is
added to the job's warnings; the job goes on without it. Enabled/disabled choices persist in
`<data dir>/extensions.json`.

The engine takes a per-job view, `manager.job(request)` -> `extensions.hooks.JobHooks`, which
holds the extensions active when the job began and collects the job's notices.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import api
from .hooks import JobHooks

try:
    import tomllib
except ImportError:  # Python 3.10: extension.json manifests only
    tomllib = None

log = logging.getLogger(__name__)

MANIFESTS = ("extension.toml", "extension.json")
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SHIPPED_DIR = Path(__file__).resolve().parent

# statuses
ENABLED, DISABLED, FAILED, INCOMPATIBLE, INVALID = "enabled", "disabled", "failed", "incompatible", "invalid"


@dataclass
class Extension:
    id: str
    folder: Path
    name: str = ""
    version: str = ""
    api: str = ""
    description: str = ""
    requirements: list[str] = field(default_factory=list)
    entry: str = "main.py"
    status: str = DISABLED
    error: str = ""
    registered: api.Registrations | None = None
    module: Any = None

    @property
    def active(self) -> bool:
        return self.status == ENABLED and self.registered is not None

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name or self.id, "version": self.version, "api": self.api,
                "status": self.status, "error": self.error, "folder": str(self.folder),
                "description": self.description, "requirements": list(self.requirements)}


def read_manifest(folder: Path) -> dict:
    for name in MANIFESTS:
        path = folder / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if name.endswith(".toml"):
                if tomllib is None:
                    raise ModuleNotFoundError("No module named 'tomllib' (Python 3.11 reads TOML; use extension.json)")
                return tomllib.loads(text)
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"{name}: expected an object")
            return data
    raise FileNotFoundError(f"no manifest ({' or '.join(MANIFESTS)})")


class ExtensionManager:
    def __init__(self, state_file: Path | None = None):
        self.state_file = Path(state_file) if state_file else None
        self.extensions: dict[str, Extension] = {}
        self.folders: list[Path] = []
        # install from a URL: off unless the launcher allows it (never with --listen/--share)
        self.allow_install = False
        self._lock = threading.RLock()

    # --- state ------------------------------------------------------------------------------------
    def _disabled_ids(self) -> set[str]:
        if not self.state_file or not self.state_file.is_file():
            return set()
        try:
            return set(json.loads(self.state_file.read_text(encoding="utf-8")).get("disabled", []))
        except (OSError, ValueError, AttributeError):
            log.warning("could not read %s; every extension starts enabled", self.state_file)
            return set()

    def _save_disabled(self, disabled: set[str]) -> None:
        if not self.state_file:
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"disabled": sorted(disabled)}, indent=1), encoding="utf-8")
        tmp.replace(self.state_file)

    # --- discovery --------------------------------------------------------------------------------
    def discover(self, *folders: Path) -> list[Extension]:
        """Scan `folders` (each holding one sub-folder per extension) and load what is enabled.
        Replaces what was loaded before (Reload)."""
        with self._lock:
            self.folders = [Path(f) for f in folders] or self.folders
            for ext in self.extensions.values():
                self._forget_modules(ext)
            self.extensions = {}
            disabled = self._disabled_ids()
            for root in self.folders:
                if not root.is_dir():
                    continue
                for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
                    if not any((folder / m).is_file() for m in MANIFESTS):
                        continue
                    ext = self._read(folder)
                    if ext.id in self.extensions:
                        other = self.extensions[ext.id].folder
                        ext.status, ext.error = INVALID, f"duplicate id {ext.id!r} (also in {other})"
                        ext.id = f"{ext.id}@{folder.name}"
                    self.extensions[ext.id] = ext
                    if ext.status == INVALID or ext.status == INCOMPATIBLE:
                        log.error("extension %s: %s", ext.id, ext.error)
                        continue
                    if ext.id in disabled:
                        ext.status = DISABLED
                        continue
                    self._load(ext)
            return list(self.extensions.values())

    def reload(self) -> list[Extension]:
        return self.discover()

    def _read(self, folder: Path) -> Extension:
        ext = Extension(id=folder.name.lower(), folder=folder)
        try:
            data = read_manifest(folder)
        except Exception as exc:
            ext.status, ext.error = INVALID, f"manifest unreadable: {exc}"
            return ext
        ext.id = str(data.get("id") or folder.name).strip()
        ext.name = str(data.get("name") or ext.id)
        ext.version = str(data.get("version", ""))
        ext.api = str(data.get("api", ""))
        ext.description = str(data.get("description", ""))
        reqs = data.get("requirements", [])
        ext.requirements = [str(r) for r in reqs] if isinstance(reqs, list) else [str(reqs)]
        ext.entry = str(data.get("entry") or ("main.py" if (folder / "main.py").is_file() else "__init__.py"))
        if not ID_PATTERN.match(ext.id):
            ext.status, ext.error = INVALID, f"id {ext.id!r}: use lowercase letters, digits, '-' and '_'"
            return ext
        if not ext.api:
            ext.status, ext.error = INCOMPATIBLE, ("the manifest does not say which extension API it needs "
                                                   f"(api = \"{api.API_VERSION}\")")
            return ext
        try:
            compatible = api.is_compatible(ext.api)
        except ValueError as exc:
            ext.status, ext.error = INVALID, f"api: {exc}"
            return ext
        if not compatible:
            ext.status, ext.error = INCOMPATIBLE, (f"needs extension API {ext.api}; this app provides "
                                                   f"{api.API_VERSION} (update the extension or the app)")
            return ext
        entry = (folder / ext.entry).resolve()
        if not entry.is_file() or folder.resolve() not in entry.parents:
            ext.status, ext.error = INVALID, f"entry {ext.entry!r} is not a file in the extension's folder"
        return ext

    def _package_name(self, ext: Extension) -> str:
        return "sdui_extension_" + re.sub(r"\W", "_", ext.id)

    def _forget_modules(self, ext: Extension) -> None:
        package = self._package_name(ext)
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]

    def _load(self, ext: Extension) -> None:
        """Import the entry module (as part of a package made of the folder) and call setup()."""
        package = self._package_name(ext)
        self._forget_modules(ext)
        try:
            init = ext.folder / "__init__.py"
            if ext.entry == "__init__.py":
                spec = importlib.util.spec_from_file_location(package, init,
                                                              submodule_search_locations=[str(ext.folder)])
                module = importlib.util.module_from_spec(spec)
                sys.modules[package] = module
                spec.loader.exec_module(module)
            else:
                parent = types.ModuleType(package)
                parent.__path__ = [str(ext.folder)]  # relative imports inside the folder work
                sys.modules[package] = parent
                name = ext.entry[:-3] if ext.entry.endswith(".py") else ext.entry
                module = importlib.import_module(f"{package}.{name.replace('/', '.')}")
            setup = getattr(module, "setup", None)
            if not callable(setup):
                raise AttributeError(f"{ext.entry} defines no setup(ext) function")
            registrar = api.Setup(ext.id, ext.name)
            setup(registrar)
        except BaseException as exc:  # noqa: BLE001 - nothing an extension does may stop the app
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._forget_modules(ext)
            ext.status, ext.error, ext.registered = FAILED, f"failed to load: {_describe(exc)}", None
            log.error("extension %s failed to load; it is disabled", ext.id, exc_info=True)
            return
        ext.module, ext.registered, ext.status, ext.error = module, registrar.registered, ENABLED, ""
        log.info("extension %s %s loaded", ext.id, ext.version)

    def install(self, url: str, timeout: float = 300) -> Extension:
        """git clone `url` into the first extensions folder and load it (only when
        `allow_install`: never on a server others can reach). Its requirements are not installed."""
        if not self.allow_install:
            raise RuntimeError("installing extensions is off on this server")
        url = url.strip()
        if not re.match(r"^https://[\w.-]+/[\w./~-]+$", url):
            raise ValueError(f"not an https git URL: {url!r}")
        if not self.folders:
            raise RuntimeError("no extensions folder")
        name = re.sub(r"[^\w-]", "_", url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git"))
        target = self.folders[0] / name
        if not name or target.exists():
            raise ValueError(f"{target} already exists")
        try:
            subprocess.run(["git", "clone", "--depth", "1", "--", url, str(target)], check=True, timeout=timeout,
                           capture_output=True, text=True)
        except (OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            detail = getattr(exc, "stderr", "") or str(exc)
            raise RuntimeError(f"git clone failed: {detail.strip()[-500:]}") from None
        if not any((target / m).is_file() for m in MANIFESTS):
            shutil.rmtree(target, ignore_errors=True)
            raise ValueError(f"{url} has no {' or '.join(MANIFESTS)}: not an extension for this app")
        self.discover()
        found = next((e for e in self.extensions.values() if e.folder == target), None)
        if found is None:
            raise RuntimeError(f"{target} was not found after installing")
        return found

    # --- the user's choices -----------------------------------------------------------------------
    def set_enabled(self, ext_id: str, enabled: bool) -> Extension:
        with self._lock:
            ext = self.extensions.get(ext_id)
            if ext is None:
                raise KeyError(f"no extension {ext_id!r}")
            disabled = self._disabled_ids()
            (disabled.discard if enabled else disabled.add)(ext_id)
            self._save_disabled(disabled)
            if ext.status in (INVALID, INCOMPATIBLE):
                return ext
            if not enabled:
                ext.status, ext.error = DISABLED, ""
            elif not ext.active:
                self._load(ext)  # a failed extension gets another try
            return ext

    def get(self, ext_id: str) -> Extension | None:
        return self.extensions.get(ext_id)

    def find(self, name: str) -> Extension | None:
        """By id, or by name or script title, case-insensitively (A1111 clients send titles)."""
        if name in self.extensions:
            return self.extensions[name]
        wanted = str(name).strip().lower()
        for ext in self.extensions.values():
            titles = {ext.id.lower(), ext.name.lower()}
            if ext.registered:
                titles |= {s["title"].lower() for s in ext.registered.scripts}
            if wanted in titles:
                return ext
        return None

    def list(self) -> list[dict]:
        return [ext.describe() for ext in self.extensions.values()]

    def active(self) -> list[Extension]:
        return [ext for ext in list(self.extensions.values()) if ext.active]

    def failures(self) -> list[str]:
        return [f"Extension {e.id}: {e.status}: {e.error}" for e in self.extensions.values()
                if e.status in (FAILED, INCOMPATIBLE, INVALID)]

    def fail(self, ext: Extension, where: str, exc: BaseException) -> str:
        """Disable `ext` for this run after an exception in `where`; returns the notice."""
        with self._lock:
            ext.status, ext.error = FAILED, f"raised in {where}: {_describe(exc)}"
        message = f"Extension {ext.id} failed in {where} ({_describe(exc)}); it is disabled, the job went on without it"
        log.error(message, exc_info=exc)
        return message

    # --- per job --------------------------------------------------------------------------------------
    def job(self, request: Any = None) -> JobHooks:
        return JobHooks(self, self.active())

    # --- UI and API registrations (only of extensions active at build time) --------------------
    def ui_sections(self, tab: str) -> list[tuple[Extension, dict]]:
        return [(e, s) for e in self.active() for s in e.registered.ui_sections if tab in s["tabs"]]

    def ui_tabs(self) -> list[tuple[Extension, dict]]:
        return [(e, t) for e in self.active() for t in e.registered.ui_tabs]

    def api_routes(self) -> list[tuple[Extension, Callable]]:
        return [(e, add) for e in self.active() for add in e.registered.api_routes]

    def scripts(self) -> list[tuple[Extension, dict]]:
        return [(e, s) for e in self.active() for s in e.registered.scripts]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
