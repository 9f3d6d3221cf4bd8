"""The hooks of one job: what the engine calls into extensions while a job runs.

`ExtensionManager.job(request)` hands the engine a `JobHooks`: the extensions active when the
job began, each hook called through a guard (an exception, or a return value of the wrong
type, disables that extension for the rest of the run and adds a notice to the job's
warnings; the job goes on without it), and a script (e.g. X/Y/Z plot) run in place of the
plain generation when the request asks for one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from . import api
from .script_progress import ScriptProgress

if TYPE_CHECKING:  # annotations only: the manager imports this module
    from .manager import Extension, ExtensionManager


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

    def _hooked(self, hook: str) -> list[tuple[Extension, Callable]]:
        """(extension, function) for each `hook` ("before_request", ...) of this job's extensions."""
        return [(ext, fn) for ext in self.extensions if ext.registered for fn in getattr(ext.registered, hook)]

    def _change(self, ext: Extension, where: str, fn: Callable, ctx: Any, kind: type, expected: str) -> Any:
        """What a hook returned when it is a `kind`; None when it returned None or failed, or
        returned anything else (which disables the extension like a failure)."""
        ok, change = self._call(ext, where, fn, ctx)
        if not ok or change is None:
            return None
        if not isinstance(change, kind):
            self._bad_return(ext, where, change, expected)
            return None
        return change

    @staticmethod
    def _args(request: Any, ext: Extension) -> Any:
        return (getattr(request, "extension_args", None) or {}).get(ext.id)

    def before_request(self, request: api.GenerationRequest) -> api.GenerationRequest:
        for ext, fn in self._hooked("before_request"):
            context = api.RequestContext(request=request, args=self._args(request, ext), extension_id=ext.id)
            changed = self._change(ext, "before_request", fn, context, api.GenerationRequest,
                                   "a GenerationRequest or None")
            if changed is not None:
                request = changed
        return request

    def step_hook(self, request: api.GenerationRequest) -> Callable[..., float] | None:
        """The runner's `on_step(step=, steps=, timestep=, sigma=, latents=, guidance_scale=)`
        -> guidance scale, or None when no extension has a step hook."""
        hooked = self._hooked("on_step")
        if not hooked:
            return None

        def on_step(*, step: int, steps: int, timestep: Any, sigma: float | None, latents: Any,
                    guidance_scale: float) -> float:
            for ext, fn in hooked:
                context = api.StepContext(request=request, args=self._args(request, ext), extension_id=ext.id,
                                          step=step, steps=steps, timestep=timestep, sigma=sigma, latents=latents,
                                          guidance_scale=guidance_scale)
                change = self._change(ext, "on_step", fn, context, api.StepChange, "a StepChange or None")
                if change is not None and change.guidance_scale is not None:
                    guidance_scale = float(change.guidance_scale)
            return guidance_scale

        return on_step

    def after_image(self, image: Any, *, request: api.GenerationRequest, seed: int, subseed: int,
                    index: int) -> tuple[Any, dict]:
        """(the image, extra infotext fields) after every extension's after_image hook."""
        extra: dict = {}
        for ext, fn in self._hooked("after_image"):
            context = api.ImageContext(request=request, args=self._args(request, ext), extension_id=ext.id,
                                       image=image, seed=seed, subseed=subseed, index=index)
            change = self._change(ext, "after_image", fn, context, api.ImageChange, "an ImageChange or None")
            if change is None:
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
        progress = ScriptProgress(on_progress)  # the cells' steps as one job's: cell i of n, ETA

        def generate_cell(cell: api.GenerationRequest, on_progress: Callable | None = None) -> api.GenerationResult:
            def heard(report: Any) -> None:
                progress.cell_step(report)
                if on_progress is not None:  # the script's own listener, if it passed one
                    on_progress(report)

            return generate(cell, on_progress=heard)

        ctx = api.ScriptContext(request=request, args=self._args(request, ext), extension_id=ext.id,
                                generate=generate_cell, save=save, report_progress=progress.cells,
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
