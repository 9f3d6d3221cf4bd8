"""`python launch.py` with the API flags: served, guarded, and answering bad input clearly."""

from __future__ import annotations

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
