"""Against the real `launch.py`: auth covers every route, and no file outside Gradio's cache,
the outputs folder and --allowed-paths is served, however the path is spelled."""

from __future__ import annotations

import http.client
import os
import urllib.parse

import httpx
import pytest
from serving import launched

SECRET = "top-secret-marker-5d41402a"
USER, PASSWORD = "ann", "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """--api --listen --gradio-auth, an outputs folder holding a PNG and symlinks that lead out
    of it, an --allowed-paths folder, and a secret file next to (not inside) all of them."""
    from tiny import write_tiny_sd1_checkpoint

    root = tmp_path_factory.mktemp("guards")
    write_tiny_sd1_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors")
    outputs, allowed = root / "outputs", root / "allowed"
    (outputs / "txt2img-images").mkdir(parents=True)
    allowed.mkdir()
    secret = root / "secret.txt"
    secret.write_text(SECRET)
    (outputs / "txt2img-images" / "00000-1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"image")
    (outputs / "link.txt").symlink_to(secret)
    (outputs / "linkdir").symlink_to(root, target_is_directory=True)
    (allowed / "shared.txt").write_text("shared on purpose")
    args = ["--models-dir", str(root / "models"), "--outdir", str(outputs), "--data-dir", str(root / "data"),
            "--api", "--listen", "--gradio-auth", f"{USER}:{PASSWORD}", "--allowed-paths", str(allowed),
            "--max-upload-mb", "1"]
    with launched(args, root / "server.log") as url:
        yield url, root


def raw_get(url: str, path: str, headers: dict | None = None) -> tuple[int, str]:
    """GET with the path sent exactly as written: no client normalises `..` or decodes `%2e`."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", errors="replace")
    finally:
        connection.close()


def logged_in_headers(url: str) -> dict:
    response = httpx.post(f"{url}/login", data={"username": USER, "password": PASSWORD}, timeout=30)
    assert response.status_code == 200, response.text
    cookie = "; ".join(f"{name}={value}" for name, value in response.cookies.items())
    assert cookie, "the login set no cookie"
    return {"Cookie": cookie}


def test_every_route_needs_the_password(server):
    url, root = server
    protected = [
        ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/txt2img"),
        ("POST", "/sdapi/v1/interrupt"), ("GET", "/docs"), ("GET", "/openapi.json"),
        ("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join"),
        ("GET", "/gradio_api/queue/data?session_hash=x"), ("POST", "/gradio_api/call/txt2img"),
        ("POST", "/gradio_api/run/txt2img"), ("POST", "/gradio_api/upload"),
        ("GET", f"/gradio_api/file={root / 'outputs' / 'txt2img-images' / '00000-1.png'}"),
        ("GET", f"/gradio_api/file={root / 'allowed' / 'shared.txt'}"),
    ]
    for method, route in protected:
        response = httpx.request(method, url + route, json={} if method == "POST" else None, timeout=30)
        assert response.status_code in (401, 403), (method, route, response.status_code)
        assert SECRET not in response.text and "shared on purpose" not in response.text
    # a wrong password is no better than none
    assert httpx.get(url + "/sdapi/v1/sd-models", auth=(USER, "wrong"), timeout=30).status_code == 401
    assert httpx.post(f"{url}/login", data={"username": USER, "password": "wrong"}, timeout=30).status_code != 200
    # and the right one opens them
    headers = logged_in_headers(url)
    assert httpx.get(url + "/config", headers=headers, timeout=30).status_code == 200
    assert httpx.get(url + "/docs", auth=(USER, PASSWORD), timeout=30).status_code == 200
    assert httpx.get(url + "/sdapi/v1/progress", auth=(USER, PASSWORD), timeout=30).json()["jobs_ahead"] is None


def test_no_file_outside_the_outputs_allowed_paths_and_cache(server):
    url, root = server
    headers = logged_in_headers(url)
    outputs, secret = root / "outputs", root / "secret.txt"
    # what may be served is served (the checks below are not passing for want of a login)
    for path in (outputs / "txt2img-images" / "00000-1.png", root / "allowed" / "shared.txt"):
        status, _ = raw_get(url, f"/gradio_api/file={path}", headers)
        assert status == 200, path
    quoted = urllib.parse.quote
    attempts = [
        str(secret),  # absolute
        "/etc/passwd",
        f"{outputs}/../secret.txt",  # ../ out of the outputs
        f"{outputs}/txt2img-images/../../secret.txt",
        f"{outputs}/%2e%2e/secret.txt",  # URL-encoded dots
        f"{outputs}/%2E%2E%2Fsecret.txt",  # and slash
        f"{outputs}/%252e%252e/secret.txt",  # double-encoded
        quoted(f"{outputs}/../secret.txt", safe=""),  # everything encoded
        f"{outputs}/link.txt",  # a symlink inside the outputs pointing at the secret
        f"{outputs}/linkdir/secret.txt",  # a symlinked folder leading out
        f"{root / 'allowed'}/../secret.txt",
        "../" * 12 + str(secret).lstrip("/"),  # relative to wherever the server runs
        os.path.relpath(secret, "/"),
        f"{outputs}\\..\\secret.txt",
        "http://127.0.0.1:1/secret.txt",  # not fetched from the server's own network either
    ]
    for attempt in attempts:
        # /file= is Gradio 3/4's route (404 here), /gradio_api/file/ its deprecated spelling
        for prefix in ("/gradio_api/file=", "/file=", "/gradio_api/file/"):
            status, body = raw_get(url, prefix + attempt, headers)
            assert SECRET not in body, f"{prefix}{attempt} served the secret"
            assert status in (403, 404), (prefix + attempt, status)
    # nor does the file route fetch a URL for anyone (Gradio would, for public addresses)
    for target in ("https://example.com/cat.png", "HTTP://example.com/x", "http%3A%2F%2Fexample.com%2Fx",
                   "//example.com/x"):
        for prefix in ("/gradio_api/file=", "/gradio_api/file/"):
            status, body = raw_get(url, prefix + target, headers)
            assert status == 403 and "does not fetch URLs" in body, (prefix + target, status, body)
    # the server is still fine
    assert httpx.get(url + "/sdapi/v1/sd-models", auth=(USER, PASSWORD), timeout=30).status_code == 200


def test_uploads_over_the_size_limit_are_refused_by_the_page_routes(server):
    url, _ = server
    headers = logged_in_headers(url)
    big = httpx.post(f"{url}/gradio_api/upload", headers=headers, timeout=60,
                     files={"files": ("big.png", b"\x89PNG" + b"\0" * (2 << 20), "image/png")})
    assert big.status_code == 413, big.text
    small = httpx.post(f"{url}/gradio_api/upload", headers=headers, timeout=60,
                       files={"files": ("small.png", b"\x89PNG" + b"\0" * 1000, "image/png")})
    assert small.status_code == 200
    config = httpx.get(f"{url}/config", headers=headers, timeout=30).json()
    assert config["max_file_size"] == 1 << 20  # the page checks before sending, too
