"""The Ray Serve application for `serve run` / `serve deploy` / KubeRay, built from the environment.

    serve run pipelines.hosting.ray_app:app                  # one machine, defaults
    serve deploy deploy/serve_config.yaml                    # a running cluster (see deploy/README.md)

Ray Serve imports `app` on the cluster, where there are no launch.py flags: the folders and the
engine settings come from environment variables (a serve config sets them under
`runtime_env.env_vars`), named after launch.py's flags. The replicas' size and count come from
the config's `deployments:` section, which overrides what is built here; the SDUI_RAY_* variables
only matter without one. The front end (`launch.py --ray ...`) finds the running application by
its name (`sdui`) and sends it jobs; it must be started with the same --models-dir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from pipelines.core.settings import EngineSettings, Paths
from pipelines.hosting.ray_serve import RayOptions, worker_app

# environment variable -> Paths field (the launch.py flag it stands for)
PATH_VARIABLES = {
    "SDUI_MODELS_DIR": "models_dir",  # --models-dir: the shared folder, the same path on every node
    "SDUI_CKPT_DIR": "ckpt_dir",
    "SDUI_VAE_DIR": "vae_dir",
    "SDUI_LORA_DIR": "lora_dir",
    "SDUI_ESRGAN_MODELS_PATH": "esrgan_dir",
    "SDUI_EMBEDDINGS_DIR": "embeddings_dir",
    "SDUI_GFPGAN_MODELS_PATH": "gfpgan_dir",
    "SDUI_CODEFORMER_MODELS_PATH": "codeformer_dir",
    "SDUI_CONTROLNET_DIR": "controlnet_dir",
    "SDUI_DATA_DIR": "data_dir",  # each replica's own caches (hashes)
}
# environment variable -> EngineSettings field (text values, as the flags take them)
SETTING_VARIABLES = {
    "SDUI_DEVICE": "device",  # auto | cpu | cuda | mps
    "SDUI_PRECISION": "precision",  # auto | full | half | bf16
    "SDUI_ATTENTION": "attention",  # auto | xformers | sdpa | sliced
    "SDUI_OFFLOAD": "offload",  # none | medvram | lowvram
}
FLAG_VARIABLES = {"SDUI_NO_HALF_VAE": "no_half_vae", "SDUI_COMPILE": "compile"}  # "1" / "true" turn them on
# environment variable -> RayOptions.from_flags keyword (used when no serve config sizes the replicas)
RAY_VARIABLES = {"SDUI_RAY_REPLICAS": "replicas", "SDUI_RAY_GPUS_PER_REPLICA": "gpus",
                 "SDUI_RAY_CPUS_PER_REPLICA": "cpus"}
TRUE_WORDS = ("1", "true", "yes", "on")


def paths_from_env(environ: Mapping[str, str]) -> Paths:
    given = {field: Path(environ[name]) for name, field in PATH_VARIABLES.items() if environ.get(name)}
    return Paths(**given)


def settings_from_env(environ: Mapping[str, str]) -> EngineSettings:
    given: dict = {field: environ[name] for name, field in SETTING_VARIABLES.items() if environ.get(name)}
    given.update({field: environ[name].strip().lower() in TRUE_WORDS
                  for name, field in FLAG_VARIABLES.items() if environ.get(name)})
    return EngineSettings(**given)


def options_from_env(environ: Mapping[str, str]) -> RayOptions:
    """RayOptions from SDUI_RAY_*; a bad value raises ValueError naming the variable."""
    given = {keyword: environ[name] for name, keyword in RAY_VARIABLES.items() if environ.get(name)}
    try:
        numbers = {key: float(value) for key, value in given.items() if key != "replicas"}
        return RayOptions.from_flags("auto", **{**given, **numbers})
    except ValueError as exc:
        names = ", ".join(name for name in RAY_VARIABLES if environ.get(name))
        raise ValueError(f"{names}: {exc}") from exc


def build_app(environ: Mapping[str, str]):
    """The worker application (a bound Serve deployment) for these environment variables."""
    return worker_app(paths_from_env(environ), settings_from_env(environ), options_from_env(environ))


app = build_app(os.environ)
