"""Discovery, loading, state and isolation of extensions (the host side of `extensions.api`).

`ExtensionManager` finds extension folders (each with a manifest), refuses those written for
another API version, imports the rest under their own module names, and calls their hooks
for the engine. Every call into extension code goes through `_guard`: an exception is logged,
the extension is disabled for the rest of this run with its error as status, and a notice is
added to the job's warnings; the job goes on without it. Enabled/disabled choices persist in
`<data dir>/extensions.json`.

The engine takes a per-job view, `manager.job(request)` -> `JobHooks`, which holds the
extensions active when the job began and collects the job's notices.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import api

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
                import tomllib

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
        self.allow_install = False  # install from a URL: off unless the launcher allows it (never with --listen/--share)
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
                        ext.status, ext.error = INVALID, f"duplicate id {ext.id!r} (also in {self.extensions[ext.id].folder})"
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
            ext.status, ext.error = INCOMPATIBLE, f"the manifest does not say which extension API it needs (api = \"{api.API_VERSION}\")"
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
                spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(ext.folder)])
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
        import shutil
        import subprocess

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
    def job(self, request: Any = None) -> "JobHooks":
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


class JobHooks:
    """The hooks of one job: the extensions active when it started, and its notices."""

    def __init__(self, manager: ExtensionManager, extensions: list[Extension]):
        self.manager = manager
        self.extensions = extensions
        self.warnings: list[str] = []

    def _call(self, ext: Extension, where: str, fn: Callable, ctx: Any) -> tuple[bool, Any]:
        if not ext.active:  # failed earlier in this job, or disabled meanwhile
            return False, None
        try:
            return True, fn(ctx)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            message = self.manager.fail(ext, where, exc)
            if message not in self.warnings:
                self.warnings.append(message)
            return False, None

    def _bad_return(self, ext: Extension, where: str, value: Any, expected: str) -> None:
        self.warnings.append(self.manager.fail(ext, where, TypeError(f"returned {type(value).__name__}, "
                                                                     f"expected {expected}")))

    @staticmethod
    def _args(request: Any, ext: Extension) -> Any:
        return (getattr(request, "extension_args", None) or {}).get(ext.id)

    def before_request(self, request: api.GenerationRequest) -> api.GenerationRequest:
        for ext in self.extensions:
            for fn in ext.registered.before_request if ext.registered else ():
                ok, changed = self._call(ext, "before_request", fn,
                                         api.RequestContext(request=request, args=self._args(request, ext),
                                                            extension_id=ext.id))
                if not ok or changed is None:
                    continue
                if isinstance(changed, api.GenerationRequest):
                    request = changed
                else:
                    self._bad_return(ext, "before_request", changed, "a GenerationRequest or None")
        return request

    def step_hook(self, request: api.GenerationRequest) -> Callable[..., float] | None:
        """The runner's `on_step(step=, steps=, timestep=, sigma=, latents=, guidance_scale=)`
        -> guidance scale, or None when no extension has a step hook."""
        hooked = [(e, fn) for e in self.extensions for fn in (e.registered.on_step if e.registered else ())]
        if not hooked:
            return None

        def on_step(*, step: int, steps: int, timestep: Any, sigma: float | None, latents: Any,
                    guidance_scale: float) -> float:
            for ext, fn in hooked:
                ok, change = self._call(ext, "on_step", fn, api.StepContext(
                    request=request, args=self._args(request, ext), extension_id=ext.id, step=step, steps=steps,
                    timestep=timestep, sigma=sigma, latents=latents, guidance_scale=guidance_scale))
                if not ok or change is None:
                    continue
                if isinstance(change, api.StepChange):
                    if change.guidance_scale is not None:
                        guidance_scale = float(change.guidance_scale)
                else:
                    self._bad_return(ext, "on_step", change, "a StepChange or None")
            return guidance_scale

        return on_step

    def after_image(self, image: Any, *, request: api.GenerationRequest, seed: int, subseed: int,
                    index: int) -> tuple[Any, dict]:
        """(the image, extra infotext fields) after every extension's after_image hook."""
        extra: dict = {}
        for ext in self.extensions:
            for fn in ext.registered.after_image if ext.registered else ():
                ok, change = self._call(ext, "after_image", fn, api.ImageContext(
                    request=request, args=self._args(request, ext), extension_id=ext.id, image=image,
                    seed=seed, subseed=subseed, index=index))
                if not ok or change is None:
                    continue
                if not isinstance(change, api.ImageChange):
                    self._bad_return(ext, "after_image", change, "an ImageChange or None")
                    continue
                if change.image is not None:
                    image = change.image
                extra.update({str(k): v for k, v in dict(change.infotext or {}).items()})
        return image, extra

    def script_for(self, request: api.GenerationRequest) -> tuple[Extension, dict] | None:
        """The script that takes over this request: the first active one whose arguments are in
        the request (and not `enabled: false`, or its own is_active says yes)."""
        found = []
        for ext in self.extensions:
            for script in ext.registered.scripts if ext.registered else ():
                args = self._args(request, ext)
                if args is None:
                    continue
                check = script["is_active"] or _default_active
                ok, active = self._call(ext, "script is_active", check, args)
                if ok and active:
                    found.append((ext, script))
        if len(found) > 1:
            self.warnings.append(f"Several scripts were asked for ({', '.join(e.id for e, _ in found)}); "
                                 f"only {found[0][0].id} ran")
        return found[0] if found else None

    def run_script(self, request: api.GenerationRequest, *, generate: Callable, save: Callable,
                   on_progress: Callable | None, control: Any) -> api.GenerationResult | None:
        """Run the request's script, if one is active; None when none is (plain generation)."""
        chosen = self.script_for(request)
        if chosen is None:
            return None
        ext, script = chosen

        def report(done: int, total: int) -> None:
            if on_progress is not None:
                from pipelines.core.progress import Progress

                on_progress(Progress(step=done, steps=max(total, 1), batch_index=0, batch_count=1,
                                     elapsed=0.0, eta=None))

        ctx = api.ScriptContext(request=request, args=self._args(request, ext), extension_id=ext.id,
                                generate=generate, save=save, report_progress=report,
                                is_interrupted=lambda: bool(control is not None and control.interrupted))
        try:
            result = script["run"](ctx)
        except api.RequestError:
            raise  # a bad argument is the user's to fix, not the extension's fault
        except Exception as exc:  # noqa: BLE001
            self.warnings.append(self.manager.fail(ext, "script", exc))
            return api.GenerationResult(request=request, warnings=list(ctx.warnings))
        if not isinstance(result, api.GenerationResult):
            self._bad_return(ext, "script", result, "a GenerationResult")
            return api.GenerationResult(request=request)
        result.warnings.extend(w for w in ctx.warnings if w not in result.warnings)
        return result


def _default_active(args: Any) -> bool:
    if isinstance(args, dict):
        return bool(args) and args.get("enabled", True) is not False
    return bool(args)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
