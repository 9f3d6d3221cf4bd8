"""Command line of `launch.py`: A1111 flag names -> Paths / EngineSettings / Gradio launch()
(the flags themselves: `cli_flags`).

Importing this module does nothing heavy. Start-up order (`main()`): with --ray, the Ray cluster
is joined and the workers started first (the engine then sends its jobs there); torch and the engine are
imported in a thread while Gradio is imported here (imports hold the interpreter lock, so the two
overlap only where they wait on the disk; the engine imports only what building it and the page
need), the default checkpoint is listed as loading, the UI is built and served (with `--api`, the
REST API is mounted before the server accepts a connection), then the checkpoint is read in the
background: the page says "Loading model…" from the start and a job submitted meanwhile waits for
that load. The cyclic garbage collector is off until the page is built, and
SDUI_STARTUP_TIMES=1 prints when each step ends (`startup_mark`; bench/startup.py --timeline).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Sequence

from starlette.middleware import Middleware

from extensions.manager import SHIPPED_DIR
from pipelines.core.engine_api import EngineAPI
from pipelines.core.hosted_limits import ZERO_GPU_NOTE
from pipelines.core.settings import REPO_ROOT, EngineSettings, Paths
from pipelines.hosting.hub import HubError, fetch_checkpoint
from pipelines.hosting.space import running_on_space, space_id, space_paths
from pipelines.hosting.zerogpu import import_spaces

from .cli_flags import build_parser, check_flag_values, parse_auth
from .guards import NoUrlFetch

# SDUI_STARTUP_TIMES=1 prints when each start-up step ends, in seconds since this module was
# imported; a number (time.time() of the launch, as bench/startup.py gives) counts from there.
STARTUP_TIMES_ENV = "SDUI_STARTUP_TIMES"
_IMPORTED_AT = time.time()


def startup_mark(step: str) -> None:
    """One line of the start-up timeline on stderr, only with SDUI_STARTUP_TIMES set."""
    setting = os.environ.get(STARTUP_TIMES_ENV, "")
    if not setting or setting == "0":
        return
    try:
        origin = float(setting) if setting != "1" else _IMPORTED_AT
    except ValueError:
        origin = _IMPORTED_AT
    print(f"[startup] {time.time() - origin:6.2f} s  {step}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flag_values(parser, args)
    try:
        ray_options_from_args(args)  # a bad --ray-* value is said now, before anything starts
    except ValueError as exc:
        parser.error(str(exc))
    except ImportError as exc:  # no [ray] extra
        parser.error(f"--ray: needs Ray Serve (pip install -e \".[ray]\"): {exc}")
    return args


def ray_options_from_args(args: argparse.Namespace):
    """--ray and its --ray-* flags -> ray_serve.RayOptions (a flag not given keeps RayOptions'
    default); None without --ray, and then nothing of Ray is imported. Raises ValueError naming
    the flag, ImportError without Ray. Starts no cluster."""
    if args.ray is None:
        return None
    if importlib.util.find_spec("ray") is None:
        raise ImportError("the ray package is not installed")
    from pipelines.hosting import ray_serve  # optional (the [ray] extra): only with --ray

    given = {"replicas": args.ray_replicas, "cpus": args.ray_cpus_per_replica}
    return ray_serve.RayOptions.from_flags(args.ray, gpus=ray_gpus_per_replica(args),
                                           **{name: value for name, value in given.items() if value is not None})


def ray_gpus_per_replica(args: argparse.Namespace) -> float:
    """--ray-gpus-per-replica, or its default: 1, or 0 where the device flags keep the work on
    the CPU (the replicas get the same settings, so a reserved GPU would sit idle)."""
    if args.ray_gpus_per_replica is not None:
        return args.ray_gpus_per_replica
    return 0.0 if settings_from_args(args).device == "cpu" else 1.0


def is_space(args: argparse.Namespace, environ=None) -> bool:
    """Hosted-demo mode: --space, or a Hugging Face Space's environment (SPACE_ID, SYSTEM=spaces)."""
    return bool(getattr(args, "space", False)) or running_on_space(os.environ if environ is None else environ)


def paths_from_args(args: argparse.Namespace, space: bool = False) -> Paths:
    models_dir = args.models_dir or REPO_ROOT / "models"
    data_dir, outdir = args.data_dir or REPO_ROOT / "data", args.outdir or REPO_ROOT / "outputs"
    if space:
        outdir, data_dir = space_paths(args)  # /data (persistent storage) when mounted
    return Paths(
        models_dir=Path(models_dir),
        ckpt_dir=args.ckpt_dir,
        vae_dir=args.vae_dir,
        lora_dir=args.lora_dir,
        esrgan_dir=args.esrgan_models_path,
        embeddings_dir=args.embeddings_dir,
        gfpgan_dir=args.gfpgan_models_path,
        codeformer_dir=args.codeformer_models_path,
        controlnet_dir=args.controlnet_dir,
        annotators_dir=args.controlnet_annotator_models_path,
        unet_dirs=tuple(args.unet_dir),
        data_dir=data_dir,
        outdir=outdir,
    )


def settings_from_args(args: argparse.Namespace, space: bool = False) -> EngineSettings:
    device = args.device
    if any(name in ("all", "sd") for name in args.use_cpu):
        device = "cpu"
    precision = "full" if args.no_half else args.precision
    attention = args.attention
    if args.xformers:
        attention = "xformers"
    elif args.opt_sdp_attention:
        attention = "sdpa"
    offload = "lowvram" if args.lowvram else "medvram" if args.medvram else "none"
    return EngineSettings(
        device=device,
        precision=precision,
        no_half_vae=args.no_half_vae,
        attention=attention,
        offload=offload,
        compile=args.compile,
        gguf_dequantize_once=args.gguf_dequantize_once,
        default_checkpoint=args.ckpt,
        hosted=space,
        max_queue_size=args.max_queue_size,
        controlnet_max_units=args.controlnet_max_units,
        max_upload_mb=args.max_upload_mb,
        max_upload_megapixels=args.max_upload_megapixels,
    )


def launch_kwargs(args: argparse.Namespace, paths: Paths, space: bool = False) -> dict[str, Any]:
    """Arguments for gr.Blocks.launch(). A Space: 0.0.0.0 (its proxy forwards to port 7860),
    no share link, and no files served but the outputs (--allowed-paths is ignored)."""
    allowed = [str(Path(paths.outdir).resolve())]
    if not space:
        allowed += [str(Path(p).resolve()) for p in args.allowed_paths]
    kwargs: dict[str, Any] = {
        "server_name": "0.0.0.0" if (args.listen or space) else "127.0.0.1",
        "server_port": args.port,
        "share": bool(args.share) and not space,
        "allowed_paths": allowed,
        "ssr_mode": False,
        "show_error": True,
        # Gradio refuses bigger uploads itself (the page says so before sending them)
        "max_file_size": int(args.max_upload_mb * (1 << 20)),
        "app_kwargs": {"middleware": [Middleware(NoUrlFetch)]},  # see webui.guards
    }
    if args.gradio_auth:
        kwargs["auth"] = parse_auth(args.gradio_auth)
    return kwargs


def api_credentials(args: argparse.Namespace, space: bool = False) -> list[tuple[str, str]] | None:
    """--api-auth; with only --gradio-auth, the UI's credentials guard the API too, so no route
    is open when a password was asked for. That holds without --listen as well: a server on
    127.0.0.1 behind a reverse proxy is as reachable as one on 0.0.0.0."""
    if args.api_auth:
        return parse_auth(args.api_auth)
    if args.gradio_auth:
        return parse_auth(args.gradio_auth)
    return None


def notices(args: argparse.Namespace, space: bool = False) -> list[str]:
    """What the user should know about the flags given, said plainly."""
    lines = []
    if args.api_auth and not (args.api or args.nowebui):
        lines.append("--api-auth: the REST API is off; add --api to serve it.")
    if space:
        lines.append("Hosted demo mode (Hugging Face Space or --space): listening on 0.0.0.0, limits on "
                     "steps, size and batch, a bounded queue; public unless --gradio-auth is given.")
        if args.share:
            lines.append("--share is ignored in hosted demo mode (a Space is already public).")
        if args.allowed_paths:
            lines.append("--allowed-paths is ignored in hosted demo mode: only the outputs are served.")
        return lines
    if args.listen or args.share:
        if not (args.gradio_auth or (args.nowebui and args.api_auth)):
            lines.append("WARNING: the server is reachable from other machines WITHOUT a password; "
                         "anyone on the network can use it. Use --gradio-auth user:password.")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    gc.disable()  # until the page is built: see freeze_startup_objects
    args = parse_args(argv)
    space = is_space(args)
    for line in notices(args, space):
        print(line, file=sys.stderr)
    if args.hf_checkpoint:
        fetch_hf_checkpoint(args)
    paths = paths_from_args(args, space)
    settings = settings_from_args(args, space)

    import_spaces()  # on ZeroGPU `spaces` must patch torch before diffusers & co. look at CUDA
    remote = connect_workers(ray_options_from_args(args), paths, settings)
    close_on_exit(remote)
    engine_future = start_engine(paths, settings, remote)
    if not args.nowebui:
        from . import app  # noqa: F401 - heavy (Gradio), imported while the engine thread imports torch
        startup_mark("Gradio and the page's modules imported")
    engine: EngineAPI = engine_future.result()
    try:
        return serve(engine, args, paths, space)
    finally:
        if remote is not None:
            remote.close()


def serve(engine: EngineAPI, args: argparse.Namespace, paths: Paths, space: bool = False) -> int:
    """Extensions, start-up notices, then the page (and the API) or the API alone, until stopped."""
    for line in discover_extensions(engine, args, space):
        print(line, file=sys.stderr)
    startup_mark("extensions discovered")
    limits = engine.hosted_limits  # the engine holds every job to them (settings.hosted)
    if limits is not None:
        if engine.on_zero_gpu:
            print(ZERO_GPU_NOTE, file=sys.stderr)
        print(f"Hosted demo limits ({limits.hardware}): {limits.summary()}", file=sys.stderr)
    if not engine.list_checkpoints():
        from .space import no_checkpoint_text  # heavy: webui.space imports Gradio

        print(no_checkpoint_text(paths, space).replace("**", "").replace("`", ""), file=sys.stderr)
    if args.nowebui:
        freeze_startup_objects()
        return serve_api_only(engine, args, space, on_serving=lambda: preload(engine))

    from .app import UIOptions, build_ui  # heavy: Gradio (already imported above, while torch loaded)
    from .space import apply_space_ui, notice_text  # heavy: Gradio

    # The load is listed before the page is built, so the header says "Loading model…" from the first
    # page on; its work (diffusers, transformers: seconds of imports) starts once the page is served.
    serving = threading.Event()
    preload(engine, start=serving)
    # the job queue's bound is set in build_ui (see WebUI.build)
    blocks = build_ui(engine, UIOptions(), notice=lambda: notice_text(engine, space, limits, space_id()))
    startup_mark("page built")
    if limits is not None:
        apply_space_ui(blocks, limits)
    freeze_startup_objects()
    kwargs = {**launch_kwargs(args, paths, space), **blocks.webui.launch_kwargs()}
    if args.api:
        kwargs["app_kwargs"] = {**kwargs["app_kwargs"], "lifespan": api_lifespan(engine, args, space)}
    # quiet: Gradio's own lines would suggest `share=True` in code; these say the flag
    blocks.launch(**kwargs, prevent_thread_lock=True, quiet=True)
    serving.set()
    startup_mark("serving the page")
    for line in serving_lines(blocks, args, space):
        print(line, flush=True)
    blocks.block_thread()
    return 0


def api_lifespan(engine: EngineAPI, args: argparse.Namespace, space: bool = False):
    """A FastAPI lifespan that mounts the REST API on Gradio's app as the server starts, before
    it accepts a connection: /sdapi/v1 answers as soon as / does."""
    from .api import mount_api  # heavy: FastAPI routes, only when serving the API

    @contextlib.asynccontextmanager
    async def mount(app):
        mount_api(app, engine, auth=api_credentials(args, space), options=api_options(space), cmd_flags=vars(args))
        yield

    return mount


def serving_lines(blocks: Any, args: argparse.Namespace, space: bool = False) -> list[str]:
    """What the console says once the page is served (in place of Gradio's own lines)."""
    lines = [f"* Running on local URL:  {blocks.protocol}://{blocks.server_name}:{blocks.server_port}"]
    if getattr(blocks, "share_url", None):
        lines.append(f"* Running on public URL: {blocks.share_url}")
    elif not space:
        lines.append("* To create a public link, start with --share.")
    if args.api:
        lines.append("REST API: /sdapi/v1/ (docs at /docs)")
    return lines


def freeze_startup_objects() -> None:
    """Everything alive once the server is built (torch, diffusers, transformers and Gradio:
    a million objects) lives as long as the process. Moving it out of the cyclic collector's
    sight keeps every later full collection, which can fall in the middle of a model load or a
    generation, from walking it again (0.12 s each here, 5 us after). The collector is off while
    they are made (main() turns it off): its full collections would walk them over and over, a
    fifth of the start-up (2 s of 10 on a busy 2-core machine). The few cycles start-up leaves
    behind (30 thousand objects, no memory one can measure) are frozen with the rest."""
    gc.freeze()
    gc.enable()


def start_engine(paths: Paths, settings: EngineSettings, remote=None) -> Future:
    """Import the engine (torch) and build it in a thread; the Future holds the Engine. With
    `remote` (--ray: the RayWorkers) its jobs run on the cluster's replicas."""
    future: Future = Future()

    def build() -> None:
        try:
            from pipelines.engine import Engine  # heavy (torch): only when actually launching

            startup_mark("engine modules imported (torch)")
            future.set_result(Engine(paths, settings, remote=remote))
            startup_mark("engine built")
        except BaseException as exc:  # noqa: BLE001 - re-raised in main() by result()
            future.set_exception(exc)

    threading.Thread(target=build, name="sdui-engine-start", daemon=True).start()
    return future


def connect_workers(options, paths: Paths, settings: EngineSettings):
    """--ray: join the cluster (`local`: start one) and start or find the workers there; None
    without --ray. Call it on the main thread: Ray ties the processes of a cluster it starts to
    the thread that starts them (they are killed when it ends), and a start-up thread ends."""
    if options is None:
        return None
    from pipelines.hosting import ray_serve  # optional (Ray): only with --ray

    print(f"Connecting to the Ray cluster ({options.address}) and starting the workers ...", file=sys.stderr,
          flush=True)
    return ray_serve.connect(options, paths, settings)


def close_on_exit(remote) -> None:
    """--ray: SIGTERM ends the process through Python (SystemExit), so that main()'s `finally`
    closes the connection to the cluster and Ray's own exit handlers run (a `local` cluster is
    shut down); the default action would skip both."""
    def exit_now(signum, frame) -> None:
        raise SystemExit(0)

    if remote is not None and threading.current_thread() is threading.main_thread():  # signal.signal's rule
        signal.signal(signal.SIGTERM, exit_now)


def preload(engine: EngineAPI, start: threading.Event | None = None) -> threading.Thread | None:
    """Load the default checkpoint in the background (the server starts meanwhile; with `start`, the
    load's work waits for it: see Engine.preload); say when it is ready."""
    def done(name: str, seconds: float, error: BaseException | None) -> None:
        if error is None:
            startup_mark("default checkpoint loaded")
            print(f"Model loaded: {name} in {seconds:.1f}s", flush=True)
        else:
            print(f"Model {name} could not be loaded: {error}", file=sys.stderr, flush=True)

    thread = engine.preload(on_done=done, start=start)
    if thread is not None:
        startup_mark("default checkpoint's load started" if start is None else "default checkpoint listed as loading")
        print("Loading the default checkpoint in the background; the UI starts meanwhile.", flush=True)
    return thread


def discover_extensions(engine: EngineAPI, args: argparse.Namespace, space: bool = False) -> list[str]:
    """Load the extensions in extensions/ at start-up. Failures are printed here and shown in
    the UI, never fatal. Installing from a URL is only offered on a server nobody else reaches."""
    manager = engine.extensions
    manager.allow_install = not (args.listen or args.share or space)
    if args.disable_all_extensions:
        return ["--disable-all-extensions: no extension is loaded."]
    manager.discover(SHIPPED_DIR)
    return manager.failures()


def fetch_hf_checkpoint(args: argparse.Namespace) -> Path | None:
    """--hf-checkpoint: download into the user's checkpoint folder and make it the default
    (unless --ckpt names another). A failure is said and the app starts without it."""
    folder = Path(args.ckpt_dir or Path(args.models_dir or REPO_ROOT / "models") / "Stable-diffusion")
    print(f"Fetching {args.hf_checkpoint} into {folder} ...", file=sys.stderr, flush=True)
    try:
        path = fetch_checkpoint(args.hf_checkpoint, folder)
    except HubError as exc:
        print(f"{exc}. Starting without it.", file=sys.stderr, flush=True)
        return None
    print(f"Checkpoint ready: {path}", file=sys.stderr, flush=True)
    if args.ckpt is None:
        args.ckpt = path.relative_to(folder).as_posix()
    return path


def api_options(space: bool):
    """The API's server defaults; read-only on a hosted demo."""
    if not space:
        return None
    from .space import ReadOnlyApiOptions  # heavy: webui.space imports Gradio

    return ReadOnlyApiOptions()


def serve_api_only(engine: EngineAPI, args: argparse.Namespace, space: bool = False, on_serving=None) -> int:
    """--nowebui: the REST API alone, on the same port and with the same URL line."""
    import uvicorn  # heavy: only when serving the API alone

    from .api import create_app  # heavy: FastAPI routes, only when serving the API

    host = "0.0.0.0" if (args.listen or space) else "127.0.0.1"
    app = create_app(engine, auth=api_credentials(args, space), options=api_options(space), cmd_flags=vars(args))
    # Listen before saying so: a client that reads the URL line can connect at once.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, args.port))
    sock.listen(128)
    print(f"Running on local URL:  http://127.0.0.1:{args.port}  (REST API only, docs at /docs)", flush=True)
    if on_serving is not None:
        on_serving()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0
