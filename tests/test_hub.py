"""`--hf-checkpoint`: a checkpoint fetched from a (local, fake) Hugging Face Hub at start-up."""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from pipelines.hosting.hub import HubError, HubFile, fetch_checkpoint
from webui import cli


class FakeHub:
    """Answers `/{owner}/{repo}/resolve/{revision}/{file}` the way the Hub does for an LFS file
    (X-Repo-Commit, sha256 ETag, X-Linked-Size), on a loopback port."""

    def __init__(self, files: dict[str, bytes], etags: dict[str, str] | None = None):
        self.files = files
        self.etags = etags or {}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                key = "/".join(parts[:2] + parts[4:]) if len(parts) > 4 and parts[2] == "resolve" else None
                data = hub.files.get(key) if key else None
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = hub.etags.get(key) or hashlib.sha256(data).hexdigest()
                self.send_response(200)
                self.send_header("X-Repo-Commit", "0123456789" * 4)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> int:
        return sum(1 for method, _ in self.requests if method == "GET")


def _unused_endpoint() -> str:
    from serving import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: "offline"


def test_specs_parse_or_say_what_is_wrong():
    assert HubFile.parse("me/repo/sub/model.safetensors@v1") == HubFile("me/repo", "sub/model.safetensors", "v1")
    assert HubFile.parse("me/repo/model.ckpt") == HubFile("me/repo", "model.ckpt", None)
    for bad in ("me/model.safetensors", "me/repo/readme.md", "me/repo/../x.safetensors"):
        with pytest.raises(HubError):
            HubFile.parse(bad)


def test_fetch_downloads_verifies_and_keeps_the_file(tmp_path):
    data = b"checkpoint bytes " * 1000
    with FakeHub({"me/repo/sub/model.safetensors": data}) as hub:
        path = fetch_checkpoint("me/repo/sub/model.safetensors", tmp_path / "ckpts", endpoint=hub.url)
        assert path == tmp_path / "ckpts" / "sub" / "model.safetensors" and path.read_bytes() == data
        assert hub.downloads() == 1
        assert fetch_checkpoint("me/repo/sub/model.safetensors", tmp_path / "ckpts", endpoint=hub.url) == path
        assert hub.downloads() == 1  # the second start downloads nothing


def test_a_file_that_does_not_match_the_hub_hash_is_deleted(tmp_path):
    with FakeHub({"me/repo/model.safetensors": b"tampered"}, etags={"me/repo/model.safetensors": "ab" * 32}) as hub:
        with pytest.raises(HubError, match="sha256"):
            fetch_checkpoint("me/repo/model.safetensors", tmp_path, endpoint=hub.url)
    assert not (tmp_path / "model.safetensors").exists()


def test_offline_or_missing_is_a_clear_error(tmp_path):
    with pytest.raises(HubError, match="could not download"):
        fetch_checkpoint("me/repo/model.safetensors", tmp_path, endpoint=_unused_endpoint(), timeout=2)
    with FakeHub({}) as hub:
        with pytest.raises(HubError, match="could not download"):
            fetch_checkpoint("me/repo/model.safetensors", tmp_path, endpoint=hub.url)


def test_cli_offline_goes_on_without_the_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", _unused_endpoint())
    args = cli.parse_args(["--models-dir", str(tmp_path), "--hf-checkpoint", "me/repo/model.safetensors"])
    assert cli.fetch_hf_checkpoint(args) is None
    assert args.ckpt is None
    assert "Starting without it" in capsys.readouterr().err


def test_env_variable_sets_the_flag(monkeypatch):
    monkeypatch.setenv("SDUI_HF_CHECKPOINT", "me/repo/model.safetensors")
    assert cli.parse_args([]).hf_checkpoint == "me/repo/model.safetensors"
    assert cli.parse_args(["--hf-checkpoint", "a/b/c.safetensors"]).hf_checkpoint == "a/b/c.safetensors"


def test_space_start_fetches_the_checkpoint_and_generates_with_it(tmp_path, monkeypatch):
    from serving import launched
    from tiny import write_tiny_sd1_checkpoint

    source = tmp_path / "hub" / "tiny-hub.safetensors"
    write_tiny_sd1_checkpoint(source)
    models = tmp_path / "models"
    with FakeHub({"someone/tiny/tiny-hub.safetensors": source.read_bytes()}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("SPACE_ID", "someone/sdui")
        monkeypatch.setenv("SDUI_HF_CHECKPOINT", "someone/tiny/tiny-hub.safetensors")
        args = ["--models-dir", str(models), "--outdir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
                "--api"]
        with launched(args, tmp_path / "server.log") as url:
            _wait_for_api(tmp_path / "server.log")
            answer = httpx.get(f"{url}/sdapi/v1/sd-models", timeout=30)
            assert answer.status_code == 200, answer.text
            assert [m["model_name"] for m in answer.json()] == ["tiny-hub"]
            options = httpx.get(f"{url}/sdapi/v1/options", timeout=30).json()
            assert options["sd_model_checkpoint"].startswith("tiny-hub")
            ok = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64},
                            timeout=120)
            assert ok.status_code == 200 and len(ok.json()["images"]) == 1
    assert (models / "Stable-diffusion" / "tiny-hub.safetensors").read_bytes() == source.read_bytes()
    assert "Checkpoint ready" in (tmp_path / "server.log").read_text()


def _wait_for_api(log: Path, timeout: float = 60) -> None:
    """--api is mounted just after Gradio prints its URL: wait for the launcher's API line."""
    deadline = time.monotonic() + timeout
    while "REST API: /sdapi/v1/" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
