"""Start-up time: `python launch.py` until the first HTTP 200 on `/`, and until the model is ready.

    python bench/startup.py                  # 3 starts (the first is "cold": imports not in page cache)
    python bench/startup.py --runs 5 --port 7931 --api
    python bench/startup.py --importtime     # also: the slowest imports of the start-up path
    python bench/startup.py --timeline       # also: when each start-up step ended, per run
    python bench/startup.py --runs 6 --compare /path/to/other/checkout   # A/B, interleaved

Each run starts the real launcher in a fresh process with a tiny SD 1.x checkpoint (tests/tiny.py)
in a temporary models folder, polls `/` every 50 ms and reads the server's output for the
"Model loaded:" line the launcher prints when the background load of the default checkpoint
is done. The server is stopped after each run. Nothing is asserted; targets (issue 21): first
200 within 3 s on a warm start, the model ready within 5 s. With --compare, the runs alternate
between this checkout and another one (the same tiny checkpoint, the same flags), so that both
sides see the same load on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "Model loaded:"
TIMELINE_ENV = "SDUI_STARTUP_TIMES"  # webui.cli.startup_mark: seconds since the time.time() given
TIMELINE_MARK = "[startup]"


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


def one_start(folder: Path, port: int, extra: list[str], timeout: float, root: Path = ROOT) -> dict:
    log = folder / f"server-{time.monotonic_ns()}.log"
    cmd = [sys.executable, str(root / "launch.py"), "--port", str(port), "--models-dir", str(folder / "models"),
           "--data-dir", str(folder / "data"), "--outdir", str(folder / "outputs"), *extra]
    started = time.perf_counter()
    env = {**os.environ, TIMELINE_ENV: repr(time.time())}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
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
    text = log.read_text(errors="replace")
    if first_200 is None:
        return {"first_200": None, "ready": ready, "error": text[-1500:]}
    return {"first_200": first_200, "ready": ready, "timeline": timeline(text)}


def timeline(server_output: str) -> list[str]:
    """The launcher's start-up marks ("  4.12 s  page built"), in the order they were printed."""
    return [line.split(TIMELINE_MARK, 1)[1].strip() for line in server_output.splitlines() if TIMELINE_MARK in line]


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
    parser.add_argument("--runs", type=int, default=3, help="starts (of each side, with --compare)")
    parser.add_argument("--port", type=int, default=0, help="port to start on (default: a free one)")
    parser.add_argument("--api", action="store_true", help="start with --api as well")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--importtime", action="store_true", help="list the slowest top-level imports too")
    parser.add_argument("--timeline", action="store_true", help="print the launcher's start-up steps per run")
    parser.add_argument("--compare", type=Path, help="another checkout: its launch.py and this one take turns")
    parser.add_argument("--note", default="", help="printed with the machine line (e.g. what else was running)")
    args = parser.parse_args()
    if args.compare is not None and not (args.compare / "launch.py").is_file():
        parser.error(f"--compare: no launch.py in {args.compare}")
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from tiny import write_tiny_sd1_checkpoint

    print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the run, python "
          f"{sys.version.split()[0]}{'; ' + args.note if args.note else ''}", flush=True)
    sides = {"this": ROOT} if args.compare is None else {"this": ROOT, "other": args.compare.resolve()}
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="sdui-startup-") as tmp:
        folder = Path(tmp)
        write_tiny_sd1_checkpoint(folder / "models" / "Stable-diffusion" / "tiny.safetensors")
        for run in range(args.runs):
            order = list(sides) if run % 2 == 0 else list(reversed(sides))  # neither side always goes first
            for side in order:
                port = args.port or free_port()
                result = one_start(folder, port, ["--api"] if args.api else [], args.timeout, sides[side])
                results[side].append(result)
                name = f"{side} " if len(sides) > 1 else ""
                print_run(f"{name}run {run + 1} ({'cold' if run == 0 else 'warm'})", result, args.timeline)
    for side, runs in results.items():
        print_summary(f"{side} ({sides[side]})" if len(sides) > 1 else "", runs[1:])
    if args.importtime:
        print("slowest imports of the start-up path (cumulative s, measured alone, in one thread):")
        for seconds, name in slowest_imports():
            print(f"  {seconds:6.2f}  {name}")


def print_run(label: str, result: dict, with_timeline: bool) -> None:
    if "error" in result:
        print(f"{label}: FAILED (first 200: {result['first_200']}, ready: {result['ready']})\n"
              f"{result['error']}", flush=True)
        return
    ready = f"{result['ready']:5.2f} s" if result["ready"] is not None else "not reported"
    print(f"{label}: first HTTP 200 on / after {result['first_200']:5.2f} s, model ready after {ready}", flush=True)
    if with_timeline:
        for line in result["timeline"] or ["(no timeline: this launcher prints no start-up marks)"]:
            print(f"    {line}")


def print_summary(side: str, warm: list[dict]) -> None:
    """The best and the median warm start (the median says more on a busy machine)."""
    warm = [r for r in warm if "error" not in r]
    if not warm:
        return
    first = sorted(r["first_200"] for r in warm)
    ready = sorted(r["ready"] for r in warm if r["ready"] is not None)
    ready_text = f"{ready[0]:.2f} s best, {statistics.median(ready):.2f} s median" if ready else "not reported"
    print(f"{side + ': ' if side else ''}warm: first 200 in {first[0]:.2f} s best, {statistics.median(first):.2f} s "
          f"median (target <= 3 s); model ready in {ready_text} (target <= 5 s)", flush=True)


if __name__ == "__main__":
    main()
