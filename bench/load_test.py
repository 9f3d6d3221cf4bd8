"""Load test: N concurrent REST API clients for M minutes against the real server.

    python bench/load_test.py                       # 4 clients, 1 minute, 64x64, 2 steps
    python bench/load_test.py --clients 8 --minutes 5 --size 128 --steps 4
    python bench/load_test.py --ray                 # the same, single-process vs 2 Ray Serve replicas

Starts `launch.py --nowebui` on a free port over a tiny random SD 1.x checkpoint built like
the tests build theirs (tests/tiny.py). After a warm-up round (one job per client at once: the
model loads) it runs `--alone` jobs one at a time with fixed seeds (the time of one job with
nothing else running), then every client posts txt2img requests one after another (a random
seed each) until the time is up. Prints requests served, throughput, latency p50/p95 (the time
a client waits: the queue plus the job), errors (anything but a 200 with one image; must be 0)
and the server's RSS after start-up, after the warm-up and at the end.

With --ray a second server runs beside the first: `launch.py --ray local --ray-replicas 2:2`, a
Ray cluster inside the server process with two CPU replicas, the server being the front end only
(its RSS after the warm-up shows that it holds no model). The one-at-a-time jobs take turns
between the two servers (the machine's other load falls on both alike); the load runs on one
server, then on the other. The table puts the two side by side with ratios. Ray's overhead per
job: each one-at-a-time job's time at the client minus its time inside the replica (Serve's
request log line, forwarded to the server's output): HTTP, the API and Ray together, so an upper
bound. Torch threads are the same in both (--threads, OMP_NUM_THREADS). Exits 1 on any error.
Nothing is asserted on timings.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from serving import launched  # noqa: E402 - the tests' launcher: free port, own process group
from tiny import write_tiny_sd1_checkpoint  # noqa: E402

RAY_REPLICAS = 2
SERVE_CALL = re.compile(r"CALL run OK ([0-9.]+)ms")  # a Serve replica's log line per request: its own time
LOG_FORWARD_SECONDS = 3  # Ray forwards the replicas' log lines to the driver's output within this
MB = 1 << 20


@dataclass
class Run:
    """What one server did under the load."""

    label: str
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # concurrent phase, seconds per request
    alone: list[float] = field(default_factory=list)  # one job at a time, seconds each
    errors: list[str] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)  # "start" / "warm" / "end" -> bytes
    saved: int = 0
    replica_alone: list[float] = field(default_factory=list)  # Ray: each alone job's time inside its replica

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


def server_rss(url: str) -> int:
    """RSS of the process listening on the URL's port (the server, not this script)."""
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid).memory_info().rss
    raise RuntimeError(f"no process listens on port {port}")


def post(http: httpx.Client, url: str, body: dict) -> str | None:
    """One txt2img request; None when it gave one image, else what went wrong."""
    try:
        response = http.post(f"{url}/sdapi/v1/txt2img", json=body)
        ok = response.status_code == 200 and len(response.json().get("images", [])) == 1
        return None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
    except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
        return f"{type(exc).__name__}: {exc}"


def client(url: str, body: dict, deadline: float, run: Run, lock: threading.Lock) -> None:
    rng = random.Random()
    with httpx.Client(timeout=600) as http:
        while time.monotonic() < deadline:
            started = time.monotonic()
            problem = post(http, url, {**body, "seed": rng.randrange(2**32)})
            with lock:
                if problem:
                    run.errors.append(problem)
                else:
                    run.latencies.append(time.monotonic() - started)


def at_once(count: int, work) -> None:
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@dataclass
class Server:
    run: Run
    url: str
    root: Path

    def replica_calls(self) -> list[float]:
        """Seconds of each job inside a Ray replica so far, from Serve's request log (which the
        cluster forwards to the server's output); none without Ray."""
        text = (self.root / "server.log").read_text(errors="replace")
        return [float(ms) / 1000 for ms in SERVE_CALL.findall(text)]


def warm_up(server: Server, body: dict, args: argparse.Namespace) -> None:
    """As many jobs at once as there are clients, so that every replica loads the model."""
    run, url = server.run, server.url
    run.rss["start"] = server_rss(url)
    with httpx.Client(timeout=600) as http:
        at_once(args.clients, lambda: run.errors.extend(filter(None, [post(http, url, {**body, "seed": 1})])))
    run.rss["warm"] = server_rss(url)


def time_alone(servers: list[Server], body: dict, args: argparse.Namespace) -> None:
    """One job at a time, the servers taking turns with the same seeds: the machine's other load
    falls on both alike."""
    time.sleep(LOG_FORWARD_SECONDS)
    calls_before = [len(server.replica_calls()) for server in servers]
    with httpx.Client(timeout=600) as http:
        for seed in range(args.alone):
            for server in servers:
                started = time.monotonic()
                server.run.errors.extend(filter(None, [post(http, server.url, {**body, "seed": 1000 + seed})]))
                server.run.alone.append(time.monotonic() - started)
    time.sleep(LOG_FORWARD_SECONDS)
    for server, before in zip(servers, calls_before):
        server.run.replica_alone = server.replica_calls()[before:]


def load(server: Server, body: dict, args: argparse.Namespace) -> None:
    run, lock = server.run, threading.Lock()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    at_once(args.clients, lambda: client(server.url, body, deadline, run, lock))
    run.elapsed = time.monotonic() - started
    run.rss["end"] = server_rss(server.url)
    run.saved = len(list((server.root / "outputs").rglob("*.png")))


def start_server(label: str, extra_args: list[str], stack: contextlib.ExitStack, args: argparse.Namespace) -> Server:
    """launch.py --nowebui over a fresh tiny checkpoint; stopped when the stack closes (its log's
    end is printed when anything fails meanwhile)."""
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdui-load-")))
    write_tiny_sd1_checkpoint(root / "models" / "Stable-diffusion" / "tiny.safetensors")
    # the same device in both runs: the replicas of --ray run on the CPU, so does the single process
    server_args = ["--nowebui", "--use-cpu", "all", "--models-dir", str(root / "models"),
                   "--outdir", str(root / "outputs"), "--data-dir", str(root / "data"), *extra_args]
    print(f"{label}: starting the server ...", file=sys.stderr, flush=True)
    log = root / "server.log"

    def say_log(exc_type, exc, traceback) -> bool:
        if exc_type is not None:
            print(f"{label}: the server's log ends with:\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        return False  # the error goes on

    stack.push(say_log)
    url = stack.enter_context(launched(server_args, log, timeout=args.start_timeout))
    return Server(Run(label), url, root)


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(runs: list[Run], args: argparse.Namespace) -> None:
    print(f"{args.clients} clients x {args.minutes:g} min, txt2img {args.size}x{args.size}, {args.steps} steps, "
          f"tiny SD 1.x checkpoint, CPU, {args.threads} torch thread(s) per job")
    rows = [
        ("requests served", lambda r: len(r.latencies), "{:.0f}"),
        ("throughput (images/s)", lambda r: r.throughput, "{:.2f}"),
        ("latency p50 (s)", lambda r: percentile(r.latencies, 50), "{:.2f}"),
        ("latency p95 (s)", lambda r: percentile(r.latencies, 95), "{:.2f}"),
        (f"one job alone, median of {args.alone} (s)", lambda r: statistics.median(r.alone) if r.alone else 0,
         "{:.3f}"),
        ("server RSS at start (MiB)", lambda r: r.rss["start"] / MB, "{:.0f}"),
        ("server RSS after warm-up (MiB)", lambda r: r.rss["warm"] / MB, "{:.0f}"),
        ("server RSS at the end (MiB)", lambda r: r.rss["end"] / MB, "{:.0f}"),
        ("errors", lambda r: len(r.errors), "{:.0f}"),
    ]
    header = f"{'':38}" + "".join(f"{run.label:>20}" for run in runs) + ("   ratio" if len(runs) == 2 else "")
    print(header)
    for name, value, form in rows:
        values = [value(run) for run in runs]
        line = f"{name:38}" + "".join(f"{form.format(v):>20}" for v in values)
        if len(runs) == 2 and values[0]:
            line += f"   {values[1] / values[0]:.2f}"
        print(line)
    for run in runs:
        print(f"{run.label}: PNGs saved {run.saved} (incl. the warm-up), over {run.elapsed:.0f} s of load")
        for problem in run.errors[:5]:
            print(f"  {run.label}: {problem}")
    if len(runs) == 2 and runs[0].alone and runs[1].alone:
        difference = statistics.median(runs[1].alone) - statistics.median(runs[0].alone)
        print(f"one job alone, {runs[1].label} minus {runs[0].label}: {difference * 1000:+.0f} ms (medians)")
    for run in runs:
        if run.replica_alone and len(run.replica_alone) == len(run.alone):
            outside = [client - inside for client, inside in zip(run.alone, run.replica_alone)]
            print(f"{run.label}: per job outside the replica (the client's time minus the replica's own): median "
                  f"{statistics.median(outside) * 1000:.0f} ms, max {max(outside) * 1000:.0f} ms; HTTP, the API and "
                  f"Ray together, so at most Ray's overhead (target < 50 ms)")
        elif run.replica_alone:
            print(f"{run.label}: {len(run.replica_alone)} replica log lines for {len(run.alone)} jobs alone: "
                  "no per-job pairing")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=64, help="width and height (multiple of 8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--alone", type=int, default=10, help="jobs run one at a time for the per-job time")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per job (OMP_NUM_THREADS), the same in both runs (default 1)")
    parser.add_argument("--ray", action="store_true",
                        help=f"also run against {RAY_REPLICAS} CPU replicas on a local Ray cluster and compare")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds a server may take to start")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers (and the Ray replicas) inherit it
    body = {"prompt": "a red circle on a blue background", "steps": args.steps, "width": args.size,
            "height": args.size, "sampler_name": "Euler", "save_images": True}
    with contextlib.ExitStack() as stack:
        servers = [start_server("single-process", [], stack, args)]
        if args.ray:
            ray_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="r", dir="/tmp"))  # short socket paths
            os.environ.update({"RAY_TMPDIR": ray_dir, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
                               "RAY_DEDUP_LOGS": "0"})  # every replica's request line, for replica_calls
            ray_args = ["--ray", "local", "--ray-replicas", f"{RAY_REPLICAS}:{RAY_REPLICAS}",
                        "--ray-cpus-per-replica", "1", "--ray-gpus-per-replica", "0"]
            servers.append(start_server(f"ray ({RAY_REPLICAS} replicas)", ray_args, stack, args))
        for server in servers:
            warm_up(server, body, args)
        time_alone(servers, body, args)
        for server in servers:  # one at a time: each gets the whole machine
            load(server, body, args)
        runs = [server.run for server in servers]
    report(runs, args)
    return 1 if any(run.errors for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
