"""The repository as a Hugging Face Space: its configuration, and the hosted demo mode."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from PIL import Image

from pipelines.core.hosted_limits import CPU_LIMITS, GPU_LIMITS, check_generation, check_upscale, limits_for
from pipelines.core.request import GenerationRequest, RequestError, UpscaleRequest
from pipelines.hosting.space import running_on_space
from webui import cli

REPO = Path(__file__).resolve().parent.parent
SPACE_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _front_matter() -> dict:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the Space's YAML front matter must be the very first thing in README.md"
    block = text[4:text.index("\n---\n", 4)]
    return yaml.safe_load(block)


def _dependencies() -> dict[str, Requirement]:
    return {Requirement(d).name.lower(): Requirement(d) for d in _pyproject()["project"]["dependencies"]}


# --- configuration ----------------------------------------------------------------------------

def test_readme_front_matter_is_a_gradio_space_config():
    meta = _front_matter()
    for key in ("title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "python_version",
                "license", "short_description"):
        assert meta.get(key), f"README front matter lacks {key}"
    assert meta["sdk"] == "gradio"
    assert meta["app_file"] == "launch.py" and (REPO / meta["app_file"]).is_file()
    assert meta["colorFrom"] in SPACE_COLORS and meta["colorTo"] in SPACE_COLORS
    assert len(meta["short_description"]) <= 60  # the Hub refuses longer ones
    assert isinstance(meta["sdk_version"], str) and isinstance(meta["python_version"], str)
    gradio_range = _dependencies()["gradio"].specifier
    assert Version(meta["sdk_version"]) in gradio_range, f"sdk_version {meta['sdk_version']} vs gradio{gradio_range}"
    requires_python = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert Version(meta["python_version"]) in requires_python


def test_readme_keeps_the_ci_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert 'python -m pip install -e ".[test]"' in text and "python -m pytest" in text


def test_requirements_match_pyproject():
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    listed = {Requirement(line).name.lower(): Requirement(line) for line in lines if line}
    for name, wanted in _dependencies().items():
        assert name in listed, f"requirements.txt lacks {name} (pyproject: {wanted})"
        assert listed[name].specifier == wanted.specifier, f"{name}: {listed[name]} vs pyproject {wanted}"
        assert listed[name].marker == wanted.marker
    extra = set(listed) - set(_dependencies())
    assert not extra, f"requirements.txt has packages pyproject does not: {extra}"


# --- detection and command line ---------------------------------------------------------------

def test_space_detected_from_its_environment():
    assert running_on_space({"SPACE_ID": "someone/sdui"})
    assert running_on_space({"SYSTEM": "spaces"})
    assert not running_on_space({})
    assert not running_on_space({"SYSTEM": "linux", "SPACE_ID": ""})
    args = cli.parse_args([])
    assert cli.is_space(args, {"SPACE_ID": "someone/sdui"})
    assert not cli.is_space(args, {})
    assert cli.is_space(cli.parse_args(["--space"]), {})


def test_space_flags_pick_safe_launch_options(tmp_path):
    args = cli.parse_args(["--space", "--share", "--allowed-paths", "/etc", "--outdir", str(tmp_path / "out"),
                           "--models-dir", str(tmp_path / "models")])
    paths = cli.paths_from_args(args, space=True)
    kwargs = cli.launch_kwargs(args, paths, space=True)
    assert kwargs["server_name"] == "0.0.0.0" and kwargs["server_port"] == 7860
    assert kwargs["share"] is False
    assert kwargs["allowed_paths"] == [str((tmp_path / "out").resolve())]
    assert cli.settings_from_args(args, space=True).hosted is True
    lines = cli.notices(args, space=True)
    assert any("--share is ignored" in line for line in lines)
    assert any("--allowed-paths is ignored" in line for line in lines)
    assert not any("WITHOUT a password" in line for line in lines)

    local = cli.parse_args(["--allowed-paths", "/srv/pics"])
    kwargs = cli.launch_kwargs(local, cli.paths_from_args(local), space=False)
    assert kwargs["server_name"] == "127.0.0.1" and "/srv/pics" in kwargs["allowed_paths"]
    assert cli.settings_from_args(local).hosted is False


def test_space_outputs_go_to_persistent_storage_when_mounted(tmp_path):
    from pipelines.hosting.space import space_paths

    args = cli.parse_args(["--space"])
    storage = tmp_path / "data"
    storage.mkdir()
    outdir, data_dir = space_paths(args, root=storage)
    assert outdir == storage / "outputs" and data_dir == storage / "sdui"
    # not mounted: the repository's folders, as without --space
    outdir, data_dir = space_paths(args, root=tmp_path / "missing")
    assert outdir == REPO / "outputs" and data_dir == REPO / "data"
    # flags still win
    args = cli.parse_args(["--space", "--outdir", str(tmp_path / "o")])
    assert space_paths(args, root=storage)[0] == tmp_path / "o"


def test_space_auth_guards_the_api_too():
    args = cli.parse_args(["--space", "--gradio-auth", "ann:pw"])
    assert cli.api_credentials(args, space=True) == [("ann", "pw")]


def test_the_demo_folder_stands_in_until_the_user_has_a_checkpoint(tmp_path):
    from pipelines.models.registry import FolderListing

    user, demo = tmp_path / "models" / "Stable-diffusion", tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.safetensors").write_bytes(b"x")
    listing = FolderListing(user, (".safetensors",), fallback=demo)
    assert [f.name for f in listing.files()] == ["demo.safetensors"]  # no user folder yet
    user.mkdir(parents=True)
    assert [f.path for f in listing.files()] == [demo / "demo.safetensors"]  # empty user folder
    (user / "mine.safetensors").write_bytes(b"x")
    assert [f.name for f in listing.files()] == ["mine.safetensors"]  # noticed without a refresh
    args = cli.parse_args(["--models-dir", str(tmp_path / "models")])
    paths = cli.paths_from_args(args)
    assert paths.folder("checkpoints") == user  # new files still go to the user's folder
    assert paths.fallback("checkpoints") == paths.demo_dir and paths.fallback("vae") is None


# --- limits -----------------------------------------------------------------------------------

def test_limits_follow_the_hardware():
    assert limits_for("cpu") is CPU_LIMITS
    assert limits_for("cuda:0") is GPU_LIMITS and limits_for("mps") is GPU_LIMITS
    assert CPU_LIMITS.default_steps <= CPU_LIMITS.max_steps < GPU_LIMITS.max_steps


@pytest.mark.parametrize("changes, field", [
    ({"steps": CPU_LIMITS.max_steps + 1}, "steps"),
    ({"width": CPU_LIMITS.max_side + 8}, "width"),
    ({"height": CPU_LIMITS.max_side + 8}, "height"),
    ({"batch_size": CPU_LIMITS.max_batch_size + 1}, "batch_size"),
    ({"batch_count": CPU_LIMITS.max_batch_count + 1}, "batch_count"),
])
def test_requests_over_the_limits_name_the_field(changes, field):
    request = GenerationRequest(prompt="x", **changes)
    with pytest.raises(RequestError) as caught:
        check_generation(request, CPU_LIMITS)
    assert caught.value.field == field
    assert "hosted demo" in caught.value.message and "CPU" in caught.value.message
    check_generation(GenerationRequest(prompt="x", steps=CPU_LIMITS.max_steps), CPU_LIMITS)


def test_native_size_counts_when_the_request_leaves_it_open():
    request = GenerationRequest(prompt="x")  # width/height None: the checkpoint's native size
    check_generation(request, CPU_LIMITS, native=512)
    with pytest.raises(RequestError) as caught:
        check_generation(request, CPU_LIMITS, native=1024)  # SDXL on a CPU Space
    assert caught.value.field == "width"


def test_upscales_over_the_limits_are_refused():
    small = Image.new("RGB", (512, 512))
    check_upscale(UpscaleRequest(image=small, scale=4), CPU_LIMITS)
    with pytest.raises(RequestError) as caught:
        check_upscale(UpscaleRequest(image=small, scale=8), CPU_LIMITS)
    assert caught.value.field == "scale"
    with pytest.raises(RequestError) as caught:
        check_upscale(UpscaleRequest(image=small, target_width=4096, target_height=512), CPU_LIMITS)
    assert caught.value.field == "target_width"


SMALL = dict(seed=3, steps=2, width=64, height=64, sampler="Euler", save_images=False)


def _hosted_engine(models_dir, tmp_path, limits=None, **settings):
    """An engine over the tiny checkpoint as a hosted demo builds it (CPU limits on this CPU)."""
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    return Engine(Paths(models_dir=models_dir, data_dir=tmp_path / "data", outdir=tmp_path / "out"),
                  EngineSettings(device="cpu", precision="full", hosted=True, **settings), hosted_limits=limits)


def _recording(engine) -> list:
    """Every job the engine queues, recorded: a refused request must never get that far."""
    calls = []
    new_job = engine.queue.new_job

    def recording(*args, **kwargs):
        calls.append(args)
        return new_job(*args, **kwargs)

    engine.queue.new_job = recording
    return calls


def test_limited_engine_checks_before_the_engine_sees_the_request(models_dir, tmp_path):
    engine = _hosted_engine(models_dir, tmp_path)
    calls = _recording(engine)
    assert engine.hosted_limits is CPU_LIMITS  # the engine itself holds the limits (no wrapper)
    assert len(engine.generate(GenerationRequest(prompt="x", **SMALL), owner="me").images) == 1
    with pytest.raises(RequestError):
        engine.generate(GenerationRequest(prompt="x", steps=150))
    with pytest.raises(RequestError):
        engine.upscale(UpscaleRequest(image=Image.new("RGB", (4000, 10)), scale=1))
    assert len(calls) == 1


def test_an_sd_upscale_over_the_hosted_limits_is_refused(models_dir, tmp_path):
    engine = _hosted_engine(models_dir, tmp_path)
    calls = _recording(engine)
    image = Image.new("RGB", (512, 512), "teal")
    request = GenerationRequest(mode="img2img", init_image=image, prompt="teal", denoising_strength=0.5, **SMALL)
    with pytest.raises(RequestError) as caught:  # 1024x1024 out: over a CPU Space's 768 a side
        engine.sd_upscale(request, upscaler="Lanczos", scale=2, overlap=16)
    assert caught.value.field == "scale" and "hosted demo" in caught.value.message
    with pytest.raises(RequestError) as caught:
        engine.sd_upscale(request.replace(steps=CPU_LIMITS.max_steps + 1), scale=1)
    assert caught.value.field == "steps"
    assert calls == []
    small = request.replace(init_image=Image.new("RGB", (48, 40), "teal"))
    assert engine.sd_upscale(small, upscaler="Lanczos", scale=2, overlap=16).images[0].size == (96, 80)


def test_an_xyz_plot_cell_over_the_hosted_limits_is_refused(models_dir, tmp_path):
    from extensions.manager import SHIPPED_DIR

    engine = _hosted_engine(models_dir, tmp_path)
    engine.extensions.discover(SHIPPED_DIR)
    over = str(CPU_LIMITS.max_steps + 10)
    request = GenerationRequest(prompt="x", extension_args={"xyz-plot": {"x_type": "Steps", "x_values": over}},
                                **SMALL)
    with pytest.raises(RequestError) as caught:  # the plot's own request is within them; its cell is not
        engine.generate(request)
    assert caught.value.field == "steps" and "hosted demo" in caught.value.message
    assert engine.current_job() is None  # the job's slot was given back


def test_a_hosted_demo_keeps_its_own_smaller_queue_bound(models_dir, tmp_path):
    from pipelines.core.jobs import DEFAULT_MAX_WAITING

    engine = _hosted_engine(models_dir, tmp_path, max_queue_size=DEFAULT_MAX_WAITING)  # the flag's default
    assert engine.queue.max_waiting == CPU_LIMITS.queue_max_size  # the one bound UI and API share
    engine = _hosted_engine(models_dir, tmp_path, GPU_LIMITS, max_queue_size=3)  # the flag may lower it
    assert engine.queue.max_waiting == 3


def test_api_options_are_read_only_on_a_space():
    from webui.api.errors import ApiError
    from webui.space import ReadOnlyApiOptions

    with pytest.raises(ApiError):
        ReadOnlyApiOptions().update(None, {"sd_model_checkpoint": "x"})


# --- the UI -----------------------------------------------------------------------------------

def _empty_engine(tmp_path):
    from pipelines.core.settings import EngineSettings, Paths
    from pipelines.engine import Engine

    # demo_dir=None: truly no checkpoint (the shipped demo would otherwise stand in)
    return Engine(Paths(models_dir=tmp_path / "models", data_dir=tmp_path / "data", outdir=tmp_path / "out",
                        demo_dir=None),
                  EngineSettings(device="cpu", hosted=True))


def test_space_ui_shows_limits_and_where_to_put_a_checkpoint(tmp_path):
    from webui.app import build_ui
    from webui.space import apply_space_ui, notice_text

    engine = _empty_engine(tmp_path)  # hosted: CPU limits on this CPU; no checkpoint at all: the UI still builds
    blocks = build_ui(engine, notice=lambda: notice_text(engine, True, CPU_LIMITS, "someone/sdui"))
    apply_space_ui(blocks, CPU_LIMITS)
    note = blocks.webui.components["notice"]
    assert blocks.children[0] is note
    assert "Hosted demo" in note.value and "someone/sdui" in note.value
    assert "No checkpoint found" in note.value and "models/Stable-diffusion" in note.value
    for mode in ("txt2img", "img2img", "inpaint"):
        fields = blocks.webui.fields[mode]
        assert fields["steps"].maximum == CPU_LIMITS.max_steps, mode
        assert fields["steps"].value == CPU_LIMITS.default_steps, mode
        assert fields["width"].maximum == CPU_LIMITS.max_side
        assert fields["batch_size"].maximum == CPU_LIMITS.max_batch_size
    config = blocks.get_config_file()
    steps = [c for c in config["components"] if c["props"].get("elem_id") == "txt2img_steps"][0]
    assert steps["props"]["maximum"] == CPU_LIMITS.max_steps


def test_local_ui_without_checkpoint_says_where_to_put_one(tmp_path):
    from webui.space import notice_text

    engine = _empty_engine(tmp_path)
    text = notice_text(engine, hosted=False)
    assert "No checkpoint found" in text and str(tmp_path / "models" / "Stable-diffusion") in text
    assert "Hosted demo" not in text


# --- end to end -------------------------------------------------------------------------------

def test_launch_inside_a_space_serves_the_hosted_demo(tmp_path, monkeypatch):
    from serving import launched
    from tiny import write_tiny_sd1_checkpoint

    write_tiny_sd1_checkpoint(tmp_path / "models" / "Stable-diffusion" / "tiny.safetensors")
    # SPACE_ID alone: SYSTEM=spaces also makes Gradio itself start Spaces-only machinery
    # (hot reload through the `spaces` package), which is the Space's business, not this test's
    monkeypatch.setenv("SPACE_ID", "someone/sdui")
    args = ["--models-dir", str(tmp_path / "models"), "--outdir", str(tmp_path / "out"),
            "--data-dir", str(tmp_path / "data"), "--api", "--allowed-paths", str(REPO)]
    log = tmp_path / "server.log"
    with launched(args, log) as url:
        _wait_for_api(log)
        config = httpx.get(f"{url}/config", timeout=30).json()
        props = {c["props"].get("elem_id"): c["props"] for c in config["components"]}
        assert "Hosted demo" in props["space_notice"]["value"]
        assert "No checkpoint" not in props["space_notice"]["value"]
        assert props["txt2img_steps"]["maximum"] == CPU_LIMITS.max_steps
        # files outside the outputs are not served, --allowed-paths notwithstanding
        assert httpx.get(f"{url}/gradio_api/file={REPO / 'README.md'}", timeout=30).status_code in (403, 404)
        # the same limits reach the API, before any work is queued
        over = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 31}, timeout=30)
        assert over.status_code == 422 and over.json()["field"] == "steps"
        ok = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                              "save_images": True}, timeout=120)
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1
        saved = list((tmp_path / "out").rglob("*.png"))
        assert saved, "the image was saved under --outdir"
        assert httpx.get(f"{url}/gradio_api/file={saved[0]}", timeout=30).status_code == 200  # outputs are served
        assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"},
                          timeout=30).status_code == 422
    text = log.read_text()
    assert re.search(r"Running on local URL:\s+http://0\.0\.0\.0:\d+", text), text[-2000:]
    assert "Hosted demo limits (cpu)" in text


def _wait_for_api(log: Path, timeout: float = 60) -> None:
    """--api is mounted just after Gradio prints its URL: wait for the launcher's API line."""
    deadline = time.monotonic() + timeout
    while "REST API: /sdapi/v1/" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
