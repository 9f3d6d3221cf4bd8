"""The launcher's Ray flags: --ray ADDRESS, --ray-replicas MIN:MAX, --ray-gpus-per-replica,
--ray-cpus-per-replica. Parsing never starts a cluster; without --ray nothing of Ray is imported;
a bad value stops the launcher with a message naming the flag."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest
from serving import free_port, stop, wait_for_url

from webui.cli import parse_args, ray_options_from_args

REPO = Path(__file__).resolve().parent.parent
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or importlib.util.find_spec("pipelines.hosting.ray_serve") is None,
    reason="Ray (the [ray] extra) or pipelines.hosting.ray_serve is not installed")


def run_python(code: str, tmp_path: Path, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def living(processes: list) -> list:
    """The processes still running (not exited, not zombies)."""
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def error_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_without_the_flag_the_launcher_builds_its_engine_without_importing_ray(tmp_path):
    """Even with RAY_ADDRESS set (a machine in a Ray cluster): only --ray turns Ray on."""
    out = run_python(f"""
        import sys
        from webui import cli
        args = cli.parse_args(["--use-cpu", "all", "--models-dir", {str(tmp_path / "models")!r},
                               "--data-dir", {str(tmp_path / "data")!r}, "--outdir", {str(tmp_path / "out")!r}])
        paths, settings = cli.paths_from_args(args), cli.settings_from_args(args)
        options = cli.ray_options_from_args(args)
        remote = cli.connect_workers(options, paths, settings)
        engine = cli.start_engine(paths, settings, remote).result()
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "pipelines.hosting.ray")))
        print(options, remote, loaded, engine.list_checkpoints() is not None)
    """, tmp_path, RAY_ADDRESS="127.0.0.1:6379")
    assert out == "None None [] True"


@needs_ray
def test_the_flags_become_ray_options_without_starting_a_cluster(tmp_path):
    out = run_python("""
        import sys
        from webui import cli
        args = cli.parse_args(["--ray", "ray://head.example:10001", "--ray-replicas", "2:5",
                               "--ray-gpus-per-replica", "0.5", "--ray-cpus-per-replica", "3"])
        o = cli.ray_options_from_args(args)
        print(o.address, o.min_replicas, o.max_replicas, o.gpus_per_replica, o.cpus_per_replica)
        ray = sys.modules.get("ray")
        print(ray is not None and ray.is_initialized())
    """, tmp_path, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    assert out.splitlines() == ["ray://head.example:10001 2 5 0.5 3.0", "False"]


@needs_ray
@pytest.mark.parametrize("flags, gpus", [([], 1.0), (["--use-cpu", "all"], 0.0), (["--device", "cpu"], 0.0),
                                         (["--use-cpu", "all", "--ray-gpus-per-replica", "1"], 1.0)])
def test_a_replica_reserves_a_gpu_unless_the_device_flags_keep_the_work_on_the_cpu(flags, gpus):
    options = ray_options_from_args(parse_args(["--ray", "auto", *flags]))
    assert options.gpus_per_replica == gpus
    assert (options.min_replicas, options.max_replicas) == (1, 1)  # --ray-replicas' default


def test_without_the_flag_there_are_no_ray_options_even_with_ray_address_set(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert ray_options_from_args(parse_args([])) is None


@needs_ray
@pytest.mark.parametrize("argv, flag", [
    (["--ray", "auto", "--ray-replicas", "3:1"], "--ray-replicas"),
    (["--ray", "auto", "--ray-replicas", "two"], "--ray-replicas"),
    (["--ray", "auto", "--ray-replicas", "0:2"], "--ray-replicas"),
    (["--ray", "auto", "--ray-gpus-per-replica", "-1"], "--ray-gpus-per-replica"),
    (["--ray", "auto", "--ray-cpus-per-replica", "-2"], "--ray-cpus-per-replica"),
    (["--ray", "", "--ray-replicas", "1:2"], "--ray"),
])
def test_a_bad_value_stops_the_launcher_naming_the_flag(argv, flag, capsys):
    assert f"error: {flag}" in error_of(argv, capsys)


@pytest.mark.parametrize("flag, value", [("--ray-replicas", "1:4"), ("--ray-gpus-per-replica", "1"),
                                         ("--ray-cpus-per-replica", "2")])
def test_a_ray_sizing_flag_without_ray_says_it_needs_ray(flag, value, capsys):
    assert "only with --ray ADDRESS" in error_of([flag, value], capsys)


def test_a_non_number_per_replica_is_refused_naming_the_flag(capsys):
    assert "--ray-gpus-per-replica" in error_of(["--ray", "auto", "--ray-gpus-per-replica", "one"], capsys)


def test_help_names_the_flags_and_the_environment_variable():
    result = subprocess.run([sys.executable, "launch.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    text = " ".join(result.stdout.split())
    for flag in ("--ray ADDRESS", "--ray-replicas MIN:MAX", "--ray-gpus-per-replica N", "--ray-cpus-per-replica N",
                 "RAY_ADDRESS", "--models-dir"):
        assert flag in text, flag


@needs_ray
def test_launch_with_a_local_cluster_serves_jobs_on_a_replica_and_takes_the_cluster_down_on_sigterm(tmp_path):
    """The launcher's whole --ray path: the cluster it starts (`local`) outlives start-up (Ray
    kills what it starts when the starting thread ends), jobs run on the replica, and SIGTERM
    to the launcher alone ends it and every Ray process it started."""
    from tiny import write_tiny_sd1_checkpoint  # imports torch

    write_tiny_sd1_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors")
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "launch.py", "--port", str(port), "--nowebui", "--use-cpu", "all", "--ray", "local",
           "--models-dir", str(tmp_path / "models"), "--outdir", str(tmp_path / "out"),
           "--data-dir", str(tmp_path / "data")]
    with tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as ray_dir:  # short: Ray's socket paths
        env = {**os.environ, "RAY_TMPDIR": ray_dir, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_for_url(proc, log, timeout=240)
            body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3}
            response = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body, timeout=240)
            assert response.status_code == 200 and len(response.json()["images"]) == 1, response.text[:500]
            front = psutil.Process(proc.pid)
            family = front.children(recursive=True)
            names = " ".join(" ".join(p.cmdline()) for p in living(family))
            assert "gcs_server" in names and "ServeReplica" in names  # the cluster lives on after start-up
            proc.send_signal(signal.SIGTERM)  # the launcher alone, not its process group
            assert proc.wait(60) == 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and living(family):
                time.sleep(0.5)
            assert not living(family), f"Ray processes left after the launcher stopped: {living(family)}"
        finally:
            stop(proc)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything of its group that outlived it
