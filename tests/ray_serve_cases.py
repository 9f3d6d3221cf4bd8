"""Ray Serve scale-out on a real local Ray cluster (its own temp dir, 127.0.0.1 only, stopped at
the end), run by tests/test_ray_serve.py in an interpreter of its own: a head with no CPU and two
1-CPU worker nodes, one CPU replica of tiny checkpoints on each, and the real front end
(Engine(remote=...), the FastAPI app, webuiapi)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import webuiapi
from conftest import make_engine
from test_api import serve
from tiny import write_tiny_sd1_checkpoint

from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest
from pipelines.core.settings import EngineSettings, Paths
from webui.api import create_app
from webui.common import JobRunner

# read when Ray is imported: without it Ray swaps 127.0.0.1 for the machine's own address
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="Ray Serve is the optional `ray` extra (pip install -e '.[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is the optional `ray` extra (pip install -e '.[ray]')")

from pipelines.hosting.ray_serve import RayOptions, connect  # noqa: E402
from pipelines.hosting.ray_workers import RERUN_NOTICE  # noqa: E402

SMALL = dict(width=64, height=64, steps=3, sampler="Euler")
WAIT = 90  # seconds a replica may take to (re)start on two busy cores


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_models(tmp_path_factory):
    """models/ with two tiny SD 1.x checkpoints (a second one no job uses before the affinity test)."""
    root = tmp_path_factory.mktemp("ray-models")
    write_tiny_sd1_checkpoint(root / "Stable-diffusion" / "tiny.safetensors", seed=0)
    write_tiny_sd1_checkpoint(root / "Stable-diffusion" / "other.safetensors", seed=2)
    return root


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="sdui-ray-")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp  # Ray's files (and its "current cluster" note) stay out of /tmp/ray
    os.makedirs(os.path.join(temp, "ray"))  # where Ray writes the address of the cluster it starts
    node = dict(node_ip_address="127.0.0.1", temp_dir=os.path.join(temp, "ray"))
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, **node) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        yield cluster, workers, node
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved


@pytest.fixture(scope="module")
def front(cluster, ray_models, tmp_path_factory):
    """The front end: an Engine whose jobs run on two CPU replicas."""
    from pipelines.engine import Engine

    tmp = tmp_path_factory.mktemp("front")
    paths = Paths(models_dir=ray_models, data_dir=tmp / "data", outdir=tmp / "outputs")
    settings = EngineSettings(device="cpu", precision="full")
    workers = connect(RayOptions(address=cluster[0].address, min_replicas=2, max_replicas=2), paths, settings)
    wait_until(lambda: workers.live_replicas() == 2, "two live replicas")
    engine = Engine(paths, settings, remote=workers)
    yield engine
    workers.close()


def test_a_checkpoint_used_twice_in_a_row_is_loaded_once(front):
    for _ in range(2):
        result = front.generate(GenerationRequest(prompt="a cat", seed=1, checkpoint="other", **SMALL))
        assert len(result.images) == 1
    first, second = list(front.remote.history)[-2:]
    assert first.checkpoint == second.checkpoint == "other.safetensors"
    assert first.loaded and not second.loaded  # the router sent the second job where the model was
    assert second.pid == first.pid and second.loads == 1
    assert front.loaded_checkpoints() == []  # the front end holds no model


def test_outputs_and_infotexts_match_a_single_process_run(front, ray_models, tmp_path):
    request = GenerationRequest(prompt="a red fox", negative_prompt="blurry", seed=1234, batch_size=2,
                                checkpoint="tiny", **SMALL)
    import torch  # the single-process run only

    local, threads = make_engine(ray_models, tmp_path), torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU replica runs (Ray sets OMP_NUM_THREADS): the same sums in the same order
    try:
        expected = local.generate(request)
    finally:
        torch.set_num_threads(threads)
    got = front.generate(request)
    assert got.infotexts == expected.infotexts and got.seeds == expected.seeds
    for a, b in zip(expected.images, got.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # saved here, by the front end, named alike (after the number: earlier tests saved there too),
    # with the same parameters inside
    def names(result, engine):
        paths = [os.path.relpath(p, engine.paths.outdir) for p in result.paths]
        return [(os.path.dirname(p), os.path.basename(p).split("-", 1)[1]) for p in paths]

    assert names(got, front) == names(expected, local) and all(got.paths)
    from PIL import Image

    assert [Image.open(p).info["parameters"] for p in got.paths] == expected.infotexts


def test_jobs_from_four_api_clients_and_a_page_all_complete(front):
    with serve(create_app(front)) as url:
        host, port = url.rsplit("//", 1)[1].split(":")

        def api_job(seed: int):
            client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)
            return client.txt2img(prompt=f"job {seed}", seed=seed, width=64, height=64, batch_size=1)

        def page_job():
            runner = JobRunner(front)
            request = GenerationRequest(prompt="from the page", seed=9, **SMALL)
            return runner.run("txt2img", None, None, lambda **kw: front.generate(request, **kw))

        with ThreadPoolExecutor(5) as pool:
            api_results = [pool.submit(api_job, seed) for seed in range(4)]
            page_result = pool.submit(page_job)
            results = [f.result(timeout=WAIT) for f in api_results]
            assert len(page_result.result(timeout=WAIT).images) == 1
    assert [r.info["seed"] for r in results] == [0, 1, 2, 3]
    assert all(r.image.size == (64, 64) for r in results)
    assert len({run.pid for run in front.remote.history}) == 2  # both replicas took jobs


def test_interrupt_stops_a_remote_job_within_one_step(front):
    control, steps = JobControl(), []
    started = threading.Event()

    def on_progress(progress) -> None:
        steps.append(progress.step)
        if progress.step == 3:
            control.interrupt()
            started.set()

    request = GenerationRequest(prompt="long", seed=5, width=128, height=128, steps=60, sampler="Euler")
    result = front.generate(request, on_progress=on_progress, control=control)
    assert started.is_set() and result.interrupted
    assert max(steps) <= 3 + 2, steps  # the step running when it arrived, and at most one more in flight


def test_killing_a_replica_mid_job_still_completes_every_job(front):
    request = GenerationRequest(prompt="survive", seed=7, width=64, height=64, steps=40, batch_count=3,
                                sampler="Euler")
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(front.generate, request) for _ in range(2)]
        wait_until(lambda: len(front.queue.running_jobs()) == 2 and
                   all(job.progress is not None for job in front.queue.running_jobs()), "both jobs running")
        os.kill(front.remote.worker_of(front.queue.running_jobs()[0]).pid, signal.SIGKILL)
        results = [job.result(timeout=WAIT * 2) for job in jobs]
    assert all(len(r.images) == 3 for r in results)
    assert sum(RERUN_NOTICE in r.warnings for r in results) == 1
    assert results[0].infotexts == results[1].infotexts  # the rerun made the same images
    wait_until(lambda: front.remote.live_replicas() == 2, "Serve to restart the killed replica")


def test_no_live_replica_is_a_503_until_workers_return(front, cluster):
    ray_cluster, workers, node = cluster
    for worker in workers:
        ray_cluster.remove_node(worker)
    wait_until(lambda: front.remote.live_replicas() == 0, "the replicas to go")
    with serve(create_app(front)) as url:
        response = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                                  "steps": 2}, timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["detail"].startswith("No workers available")
        ray_cluster.add_node(num_cpus=1, **node)
        wait_until(lambda: front.remote.live_replicas() >= 1, "a replica on the returning node")
        response = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                                  "steps": 2}, timeout=WAIT)
        assert response.status_code == 200, response.text


def test_without_the_flag_nothing_of_ray_is_imported(ray_models, tmp_path):
    script = ("import sys; sys.path.insert(0, 'tests'); from conftest import make_engine; import pathlib;"
              f"make_engine(pathlib.Path({str(ray_models)!r}), pathlib.Path({str(tmp_path)!r}));"
              "import pipelines.hosting.ray_serve;"
              "assert not [m for m in sys.modules if m.split('.')[0] == 'ray'], 'ray was imported'")
    out = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_bad_flags_name_the_flag():
    with pytest.raises(ValueError, match=r"--ray-replicas: MIN:MAX with 1 <= MIN <= MAX, got '3:1'"):
        RayOptions.from_flags("auto", "3:1")
    with pytest.raises(ValueError, match="--ray-gpus-per-replica"):
        RayOptions.from_flags("auto", "1:2", gpus=-1)
    assert RayOptions.from_flags("auto", "2").max_replicas == 2
