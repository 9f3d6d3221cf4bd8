"""`python launch.py` with the API flags: served, guarded, and answering bad input clearly."""

from __future__ import annotations

import time

import httpx
import pytest
from serving import launched


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny import write_tiny_sd1_checkpoint

    root = tmp_path_factory.mktemp("launch")
    write_tiny_sd1_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors")
    return ["--models-dir", str(root / "models"), "--outdir", str(root / "outputs"),
            "--data-dir", str(root / "data")], root


def test_nowebui_serves_the_api_alone(folders, tmp_path):
    args, root = folders
    with launched([*args, "--nowebui"], tmp_path / "server.log") as url:
        models = httpx.get(f"{url}/sdapi/v1/sd-models", timeout=30).json()
        assert [m["model_name"] for m in models] == ["tiny"]
        bad = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 65}, timeout=30)
        assert bad.status_code == 422 and bad.json()["field"] == "width"
        ok = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64},
                        timeout=60)
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_listen_with_auth_guards_every_route(folders, tmp_path):
    args, root = folders
    with launched([*args, "--api", "--listen", "--gradio-auth", "ann:secret"], tmp_path / "server.log") as url:
        for route in ("/sdapi/v1/sd-models", "/docs", "/openapi.json"):
            assert httpx.get(url + route, timeout=30).status_code == 401, route
            assert httpx.get(url + route, auth=("ann", "secret"), timeout=30).status_code == 200, route
            assert httpx.get(url + route, auth=("ann", "wrong"), timeout=30).status_code == 401, route
        # the Gradio side: config and files need the login too
        assert httpx.get(url + "/config", timeout=30).status_code == 401
        assert httpx.get(url + "/gradio_api/file=/etc/passwd", timeout=30).status_code in (401, 403)
    assert "WITHOUT a password" not in (tmp_path / "server.log").read_text()


def test_listen_without_auth_warns_loudly(folders, tmp_path):
    from webui.cli import notices, parse_args

    assert any("WITHOUT a password" in line for line in notices(parse_args(["--listen"])))
    assert not notices(parse_args(["--listen", "--gradio-auth", "a:b"]))


def test_ui_answers_while_the_model_loads_and_a_job_waits_for_the_load(tmp_path, monkeypatch):
    """Start-up order: the page is served first, the default checkpoint loads in the background
    (the header says so), and a job submitted meanwhile completes after that one load."""
    import threading

    from conftest import make_engine
    from serving import free_port
    from tiny import write_tiny_sd1_checkpoint

    import pipelines.models.manager
    from webui.api import mount_api
    from webui.app import UIOptions, build_ui
    from webui.cli import preload

    write_tiny_sd1_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors")
    release, loads = threading.Event(), []
    real_load = pipelines.models.manager.load_checkpoint_components

    def slow_load(*args, **kwargs):
        loads.append(args[0])
        assert release.wait(60), "the test never released the load"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipelines.models.manager, "load_checkpoint_components", slow_load)
    engine = make_engine(tmp_path / "models", tmp_path)
    blocks = build_ui(engine, UIOptions())
    blocks.queue(default_concurrency_limit=1)
    port = free_port()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        mount_api(blocks.app, engine)
        url = f"http://127.0.0.1:{port}"
        loader = preload(engine)
        assert loader is not None
        deadline = time.monotonic() + 30
        while not loads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loads, "the background load did not start"

        assert httpx.get(url + "/", timeout=30).status_code == 200  # served while the model loads
        assert "Loading model…" in blocks.webui.on_page_load()[blocks.webui.components["loaded"]]
        answer = {}
        job = threading.Thread(target=lambda: answer.setdefault("r", httpx.post(
            f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64}, timeout=120)))
        job.start()
        job.join(2)
        assert job.is_alive() and not answer, "the job should wait for the load in progress"

        release.set()
        job.join(120)
        assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
        loader.join(30)
        assert len(loads) == 1  # loaded once, by the background load; the job reused it
        assert engine.loaded_checkpoints() == ["tiny.safetensors"]
        assert "Loading" not in blocks.webui.on_page_load()[blocks.webui.components["loaded"]]
    finally:
        release.set()
        blocks.close()


def test_queue_and_upload_flags_reach_the_engine_and_gradio(tmp_path):
    from pipelines.core.uploads import UploadLimits
    from webui.cli import launch_kwargs, parse_args, paths_from_args, settings_from_args

    args = parse_args(["--max-queue-size", "5", "--max-upload-mb", "2", "--max-upload-megapixels", "16",
                       "--outdir", str(tmp_path)])
    settings = settings_from_args(args)
    assert settings.max_queue_size == 5
    assert UploadLimits.of(settings) == UploadLimits(max_bytes=2 << 20, max_pixels=16_000_000)
    assert launch_kwargs(args, paths_from_args(args))["max_file_size"] == 2 << 20  # Gradio's upload route
    defaults = settings_from_args(parse_args([]))
    assert (defaults.max_queue_size, defaults.max_upload_mb, defaults.max_upload_megapixels) == (64, 50, 64)
    for bad in (["--max-queue-size", "0"], ["--max-upload-mb", "-1"], ["--max-upload-megapixels", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_the_ui_password_guards_the_api_even_without_listen():
    from webui.cli import api_credentials, parse_args

    assert api_credentials(parse_args(["--api", "--gradio-auth", "ann:pw"])) == [("ann", "pw")]
    assert api_credentials(parse_args(["--api", "--gradio-auth", "ann:pw", "--api-auth", "bot:key"])) == [
        ("bot", "key")]  # the API's own credentials when given
    assert api_credentials(parse_args(["--api"])) is None


def test_a_picked_checkpoint_loads_at_once_when_the_server_is_idle_but_not_beside_a_job(tmp_path):
    import shutil

    from conftest import make_engine
    from tiny import write_tiny_sd1_checkpoint

    from webui.app import UIOptions, build_ui

    folder = tmp_path / "models" / "Stable-diffusion"
    write_tiny_sd1_checkpoint(folder / "a.safetensors")
    for name in ("b.safetensors", "c.safetensors"):
        shutil.copy(folder / "a.safetensors", folder / name)
    engine = make_engine(tmp_path / "models", tmp_path)
    ui = build_ui(engine, UIOptions()).webui
    loaded_line = ui.components["loaded"]
    engine.load_checkpoint("a.safetensors")

    updates = ui.on_checkpoint_pick("b.safetensors", "txt2img")
    assert "Loading model…** b.safetensors" in updates[loaded_line]  # said at once, the timer follows it
    deadline = time.monotonic() + 60
    while "b.safetensors" not in engine.loaded_checkpoints() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(engine.loaded_checkpoints()) == {"a.safetensors", "b.safetensors"}
    assert loaded_line not in ui.on_checkpoint_pick("a.safetensors", "txt2img")  # loaded already: nothing to do

    queue = engine.queue
    with queue.run(queue.new_job("txt2img")):  # a job runs: the pick waits for its own first job
        assert loaded_line not in ui.on_checkpoint_pick("c.safetensors", "txt2img")
    assert engine.loading_checkpoints() == [] and "c.safetensors" not in engine.loaded_checkpoints()
