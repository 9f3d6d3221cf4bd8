"""Ray Serve scale-out: tests/ray_serve_cases.py, run in a fresh interpreter.

In the suite's long-lived process (after a thousand other tests: Gradio servers, uvicorn loops,
other libraries' threads) `ray.init` against a freshly started local cluster hung in its GCS
client until the suite was killed; in a process of their own the same cases pass in about a
minute. A case that fails fails this test, with its output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is the optional `ray` extra (pip install -e '.[ray]')")

CASES = Path(__file__).with_name("ray_serve_cases.py")
LIMIT = 900  # seconds: a hung cluster fails the suite instead of stalling it


def test_ray_serve_cases_pass_in_their_own_interpreter():
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                              cwd=CASES.parent.parent, capture_output=True, text=True, timeout=LIMIT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the Ray Serve cases did not finish in {LIMIT} s:\n{(exc.stdout or b'')[-6000:]!r}")
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]
