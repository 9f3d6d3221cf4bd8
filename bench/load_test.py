"""Load test: N concurrent REST API clients for M minutes against the real server.

    python bench/load_test.py                       # 4 clients, 1 minute, 64x64, 2 steps
    python bench/load_test.py --clients 8 --minutes 5 --size 128 --steps 4

Starts `launch.py --nowebui` on a free port over a tiny random SD 1.x checkpoint built like
the tests build theirs (tests/tiny.py), then every client posts txt2img requests one after
another (a random seed each) until the time is up. Prints requests served, throughput,
latency p50/p95 (the time a client waits: the queue plus the job), errors (anything but a
200 with one image; must be 0) and the server's RSS after start-up, after the first image
(model loaded) and at the end. Exits 1 on any error. Nothing is asserted on timings.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from serving import launched  # noqa: E402 - the tests' launcher: free port, own process group
from tiny import write_tiny_sd1_checkpoint  # noqa: E402


def server_rss(url: str) -> int:
    """RSS of the process listening on the URL's port (the server, not this script)."""
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid).memory_info().rss
    raise RuntimeError(f"no process listens on port {port}")


def client(url: str, body: dict, deadline: float, latencies: list, errors: list, lock: threading.Lock) -> None:
    rng = random.Random()
    with httpx.Client(timeout=600) as http:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = http.post(f"{url}/sdapi/v1/txt2img", json={**body, "seed": rng.randrange(2**32)})
                ok = response.status_code == 200 and len(response.json().get("images", [])) == 1
                problem = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                problem = f"{type(exc).__name__}: {exc}"
            with lock:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(time.monotonic() - started)


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=64, help="width and height (multiple of 8)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    body = {"prompt": "a red circle on a blue background", "steps": args.steps, "width": args.size,
            "height": args.size, "sampler_name": "Euler", "save_images": True}
    with tempfile.TemporaryDirectory(prefix="sdui-load-") as folder:
        root = Path(folder)
        write_tiny_sd1_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors")
        server_args = ["--nowebui", "--models-dir", str(root / "models"), "--outdir", str(root / "outputs"),
                       "--data-dir", str(root / "data")]
        with launched(server_args, root / "server.log") as url:
            rss_start = server_rss(url)
            first = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)  # loads the model
            if first.status_code != 200:
                print(f"the first request failed: HTTP {first.status_code} {first.text[:500]}")
                return 1
            rss_loaded = server_rss(url)
            latencies: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()
            started = time.monotonic()
            deadline = started + args.minutes * 60
            threads = [threading.Thread(target=client, args=(url, body, deadline, latencies, errors, lock))
                       for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            rss_end = server_rss(url)
            saved = len(list((root / "outputs").rglob("*.png")))

    mb = 1 << 20
    print(f"{args.clients} clients x {args.minutes:g} min, txt2img {args.size}x{args.size}, {args.steps} steps, "
          f"tiny SD 1.x checkpoint, CPU")
    print(f"requests served: {len(latencies)} ({len(latencies) / elapsed:.2f}/s over {elapsed:.0f} s); "
          f"PNGs saved: {saved} (incl. the warm-up)")
    if latencies:
        print(f"latency: p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s, "
              f"max {max(latencies):.2f} s")
    print(f"errors: {len(errors)}")
    for problem in errors[:5]:
        print(f"  {problem}")
    print(f"server RSS: {rss_start / mb:.0f} MiB at start, {rss_loaded / mb:.0f} MiB after the first image, "
          f"{rss_end / mb:.0f} MiB at the end ({(rss_end - rss_loaded) / mb:+.0f} MiB)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
