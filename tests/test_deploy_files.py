"""deploy/: the Ray Serve config and the KubeRay manifest are what Ray and KubeRay will accept,
describe the same application the launcher deploys, and size it the way the --ray-* flags do.

Ray's own schema checks the serve config (as `serve deploy` does), `serve build` imports the
config's import path and writes the deployment options our code gives it (no cluster is started).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from webui.cli import parse_args

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
KUBERAY = REPO / "deploy" / "kuberay-rayservice.yaml"

schema = pytest.importorskip("ray.serve.schema", reason="Ray Serve is not installed (the [ray] extra)")
ray_serve = pytest.importorskip("pipelines.hosting.ray_serve", reason="pipelines.hosting.ray_serve is missing")


def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def kuberay_documents() -> dict[str, dict]:
    return {doc["kind"] + "/" + doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(KUBERAY.read_text())}


def only_app(config: dict) -> dict:
    (app,) = config["applications"]
    return app


def only_deployment(app: dict) -> dict:
    (deployment,) = app["deployments"]
    return deployment


def flags_for(deployment: dict) -> list[str]:
    """The launch.py flags that mean what this deployment's fields say."""
    scaling, actor = deployment["autoscaling_config"], deployment["ray_actor_options"]
    return ["--ray-replicas", f"{scaling['min_replicas']}:{scaling['max_replicas']}",
            "--ray-gpus-per-replica", str(actor["num_gpus"]), "--ray-cpus-per-replica", str(actor["num_cpus"])]


def built_deployment(environ: dict[str, str], tmp_path: Path) -> dict:
    """`serve build` of the config's import path with these environment variables: the
    deployment options our code produces, in the serve config's own format."""
    out = tmp_path / "built.yaml"
    env = {**os.environ, **environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    import_path = only_app(serve_config())["import_path"]
    result = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "build", import_path, "-o", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_deployment(only_app(yaml.safe_load(out.read_text())))


def test_the_serve_config_is_one_ray_serve_accepts_and_names_the_launchers_application():
    config = serve_config()
    schema.ServeDeploySchema.model_validate(config)  # what `serve deploy` checks: field names and types
    app = only_app(config)
    assert app["name"] == ray_serve.RayOptions().app_name  # the front end looks the application up by it
    assert app["route_prefix"] is None  # reached through Ray by the front end, not over HTTP
    assert Path(app["runtime_env"]["env_vars"]["SDUI_MODELS_DIR"]).is_absolute()


def test_the_import_path_builds_the_deployment_the_flags_describe(tmp_path):
    """The config's sizes, given as the --ray-* flags would give them, build a deployment with
    exactly the config's name and fields: the two say the same thing."""
    deployment = only_deployment(only_app(serve_config()))
    options = ray_serve.RayOptions.from_flags("auto", replicas=flags_for(deployment)[1],
                                              gpus=deployment["ray_actor_options"]["num_gpus"],
                                              cpus=deployment["ray_actor_options"]["num_cpus"])
    environ = {"SDUI_RAY_REPLICAS": f"{options.min_replicas}:{options.max_replicas}",
               "SDUI_RAY_GPUS_PER_REPLICA": str(options.gpus_per_replica),
               "SDUI_RAY_CPUS_PER_REPLICA": str(options.cpus_per_replica)}
    built = built_deployment(environ, tmp_path)
    assert built["name"] == deployment["name"]
    assert built["max_ongoing_requests"] == deployment["max_ongoing_requests"] == 1  # one job per replica
    for field in ("min_replicas", "max_replicas", "target_ongoing_requests"):
        assert built["autoscaling_config"][field] == deployment["autoscaling_config"][field], field
    for field in ("num_gpus", "num_cpus"):
        assert built["ray_actor_options"][field] == deployment["ray_actor_options"][field], field


def test_the_launch_flags_read_from_the_config_parse_to_the_same_sizes():
    deployment = only_deployment(only_app(serve_config()))
    from webui.cli import ray_options_from_args

    options = ray_options_from_args(parse_args(["--ray", "auto", *flags_for(deployment)]))
    scaling, actor = deployment["autoscaling_config"], deployment["ray_actor_options"]
    assert (options.min_replicas, options.max_replicas) == (scaling["min_replicas"], scaling["max_replicas"])
    assert (options.gpus_per_replica, options.cpus_per_replica) == (actor["num_gpus"], actor["num_cpus"])


def test_the_rayservice_embeds_the_same_application_as_the_serve_config():
    docs = kuberay_documents()
    service = docs["RayService/sdui"]
    assert service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema.ServeDeploySchema.model_validate(embedded)
    ours, theirs = only_app(serve_config()), only_app(embedded)
    for field in ("name", "import_path", "route_prefix"):
        assert theirs[field] == ours[field], field
    assert set(theirs["runtime_env"]["env_vars"]) == set(ours["runtime_env"]["env_vars"])
    ours_deployment, theirs_deployment = only_deployment(ours), only_deployment(theirs)
    assert theirs_deployment["name"] == ours_deployment["name"]
    assert theirs_deployment["max_ongoing_requests"] == 1
    assert set(theirs_deployment["autoscaling_config"]) == set(ours_deployment["autoscaling_config"])


def test_the_gpu_workers_have_room_for_the_replicas_and_every_pod_shares_the_models_at_one_path():
    docs = kuberay_documents()
    cluster = docs["RayService/sdui"]["spec"]["rayClusterConfig"]
    app = only_app(yaml.safe_load(docs["RayService/sdui"]["spec"]["serveConfigV2"]))
    deployment = only_deployment(app)
    models_dir = app["runtime_env"]["env_vars"]["SDUI_MODELS_DIR"]
    (workers,) = cluster["workerGroupSpecs"]
    worker = workers["template"]["spec"]["containers"][0]
    gpus_per_pod = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    replicas_per_pod = gpus_per_pod / deployment["ray_actor_options"]["num_gpus"]
    scaling = deployment["autoscaling_config"]
    assert workers["minReplicas"] * replicas_per_pod >= scaling["min_replicas"]
    assert workers["maxReplicas"] * replicas_per_pod >= scaling["max_replicas"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas land on GPU workers only

    claim = docs["PersistentVolumeClaim/sdui-models"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"], "worker": workers["template"]["spec"],
            "frontend": docs["Deployment/sdui-frontend"]["spec"]["template"]["spec"]}
    for role, pod in pods.items():
        volume = {v["name"] for v in pod["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == "sdui-models"}
        mounts = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"] if m["name"] in volume]
        assert mounts == [models_dir], role


def test_the_front_end_runs_the_launcher_against_the_head_service_with_the_same_models_dir():
    docs = kuberay_documents()
    frontend = docs["Deployment/sdui-frontend"]["spec"]["template"]["spec"]["containers"][0]
    head = docs["RayService/sdui"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert frontend["command"] == ["python", "launch.py"]
    # Kubernetes puts the Secret's value where $(SDUI_AUTH) stands
    args = parse_args([arg.replace("$(SDUI_AUTH)", "me:secret") for arg in frontend["args"]])
    assert args.ray == "ray://sdui-head-svc:10001"  # KubeRay's Service for RayService "sdui"
    assert 10001 in [port["containerPort"] for port in head["ports"]]
    app = only_app(yaml.safe_load(docs["RayService/sdui"]["spec"]["serveConfigV2"]))
    assert str(args.models_dir) == app["runtime_env"]["env_vars"]["SDUI_MODELS_DIR"]
    assert args.gradio_auth and args.listen  # reachable from the cluster, never without a password
