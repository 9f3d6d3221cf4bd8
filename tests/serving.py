"""Start the real `launch.py` in a subprocess for end-to-end tests (a helper, not a test file)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
URL_LINE = re.compile(r"Running on local URL:\s+(http://[0-9.]+:\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched(args: Sequence[str], log: Path, timeout: float = 90) -> Iterator[str]:
    """`python launch.py --port <free> *args`; yields its URL (on 127.0.0.1), stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, str(REPO / "launch.py"), "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_url(proc, log, timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def one_slot_server(tmp_path: Path) -> Iterator[str]:
    """launch.py on a tiny SD 1.x checkpoint with the REST API and room for one waiting job
    (`--max-queue-size 1`); yields its URL once /sdapi/v1 answers (it is mounted after the
    URL line is printed)."""
    from tiny import write_tiny_sd1_checkpoint

    write_tiny_sd1_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors")
    args = ["--models-dir", str(tmp_path / "models"), "--outdir", str(tmp_path / "outputs"),
            "--data-dir", str(tmp_path / "data"), "--api", "--max-queue-size", "1"]
    with launched(args, tmp_path / "server.log") as url:
        while httpx.get(f"{url}/sdapi/v1/progress", timeout=30).status_code != 200:
            time.sleep(0.2)
        yield url


def wait_for_url(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        match = URL_LINE.search(text)
        if match:
            return match.group(1)
        if proc.poll() is not None:
            pytest.fail(f"launch.py exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"launch.py printed no URL within {timeout:.0f}s:\n{log.read_text(errors='replace')[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the server and nothing else
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
