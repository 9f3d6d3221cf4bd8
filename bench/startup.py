"""Start-up time: `python launch.py` until the first HTTP 200 on `/`, and until the model is ready.

    python bench/startup.py                  # 3 starts (the first is "cold": imports not in page cache)
    python bench/startup.py --runs 5 --port 7931 --api
    python bench/startup.py --importtime     # also: the slowest imports of the start-up path

Each run starts the real launcher in a fresh process with a tiny SD 1.x checkpoint (tests/tiny.py)
in a temporary models folder, polls `/` every 50 ms and reads the server's output for the
"Model loaded:" line the launcher prints when the background load of the default checkpoint
is done. The server is stopped after each run. Nothing is asserted; target (issue 7): first
200 within 5 s on a warm start.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "Model loaded:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def one_start(folder: Path, port: int, extra: list[str], timeout: float) -> dict:
    log = folder / f"server-{time.monotonic_ns()}.log"
    cmd = [sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--models-dir", str(folder / "models"),
           "--data-dir", str(folder / "data"), "--outdir", str(folder / "outputs"), *extra]
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    first_200 = ready = None
    try:
        while time.perf_counter() - started < timeout and proc.poll() is None:
            now = time.perf_counter() - started
            if first_200 is None and answers(f"http://127.0.0.1:{port}/"):
                first_200 = time.perf_counter() - started
            if ready is None and READY_LINE in log.read_text(errors="replace"):
                ready = now
            if first_200 is not None and ready is not None:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if first_200 is None:
        return {"first_200": None, "ready": ready, "error": log.read_text(errors="replace")[-1500:]}
    return {"first_200": first_200, "ready": ready}


def slowest_imports(count: int = 12) -> list[tuple[float, str]]:
    """The start-up path's imports (engine and UI) by cumulative time, from `python -X importtime`."""
    code = "import threading, pipelines.engine, webui.app"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].rstrip()
            depth = (len(name) - len(name.lstrip())) // 2
            if depth <= 1:
                rows.append((int(parts[1]) / 1e6, name.strip()))
    return sorted(rows, reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=0, help="port to start on (default: a free one)")
    parser.add_argument("--api", action="store_true", help="start with --api as well")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--importtime", action="store_true", help="list the slowest top-level imports too")
    parser.add_argument("--note", default="", help="printed with the machine line (e.g. what else was running)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from tiny import write_tiny_sd1_checkpoint

    print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the run, python "
          f"{sys.version.split()[0]}{'; ' + args.note if args.note else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sdui-startup-") as tmp:
        folder = Path(tmp)
        write_tiny_sd1_checkpoint(folder / "models" / "Stable-diffusion" / "tiny.safetensors")
        results = []
        for run in range(args.runs):
            port = args.port or free_port()
            result = one_start(folder, port, ["--api"] if args.api else [], args.timeout)
            results.append(result)
            label = "cold" if run == 0 else "warm"
            if "error" in result:
                print(f"run {run + 1} ({label}): FAILED (first 200: {result['first_200']}, ready: {result['ready']})\n"
                      f"{result['error']}", flush=True)
                continue
            ready = f"{result['ready']:5.2f} s" if result["ready"] is not None else "not reported"
            print(f"run {run + 1} ({label}): first HTTP 200 on / after {result['first_200']:5.2f} s, "
                  f"model ready after {ready}", flush=True)
        warm = [r for r in results[1:] if "error" not in r]
        if warm:
            best = min(warm, key=lambda r: r["first_200"])
            ready = [r["ready"] for r in warm if r["ready"] is not None]
            print(f"warm best: first 200 in {best['first_200']:.2f} s (target <= 5 s), model ready in "
                  f"{f'{min(ready):.2f} s' if ready else 'not reported'}", flush=True)
    if args.importtime:
        print("slowest imports of the start-up path (cumulative s, measured alone, in one thread):")
        for seconds, name in slowest_imports():
            print(f"  {seconds:6.2f}  {name}")


if __name__ == "__main__":
    main()
