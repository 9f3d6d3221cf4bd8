"""The extension API: discovery, versions, every hook's contract, isolation of broken
extensions, persisted enable/disable, and the REST API's alwayson_scripts."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from extensions import api
from extensions.manager import ENABLED, FAILED, INCOMPATIBLE, ExtensionManager
from pipelines.core.request import GenerationRequest

SHIPPED = Path(__file__).resolve().parent.parent / "extensions"


def write_extension(root: Path, folder: str, code: str, *, ext_id: str | None = None, api_version: str = "1.0",
                    manifest: str = "toml") -> Path:
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    ext_id = ext_id or folder
    if manifest == "toml":
        (path / "extension.toml").write_text(f'id = "{ext_id}"\nname = "{folder} ext"\nversion = "0.1"\n'
                                             f'api = "{api_version}"\nrequirements = ["somepkg>=1"]\n')
    else:
        (path / "extension.json").write_text(json.dumps({"id": ext_id, "api": api_version}))
    (path / "main.py").write_text(textwrap.dedent(code))
    return path


@pytest.fixture
def with_extensions(engine, tmp_path):
    """Swap a fresh manager over tmp_path/exts into the shared engine; restore afterwards."""
    saved = engine.extensions
    manager = ExtensionManager(tmp_path / "data" / "extensions.json")
    engine.extensions = manager
    root = tmp_path / "exts"
    root.mkdir()
    yield manager, root
    engine.extensions = saved


def small(**changes) -> GenerationRequest:
    values = dict(prompt="a red square", seed=7, steps=2, width=64, height=64, sampler="Euler",
                  save_images=False)
    values.update(changes)
    return GenerationRequest(**values)


RECORDING = """
from extensions.api import GenerationRequest, ImageChange, StepChange
from PIL import ImageOps

calls = {"before": [], "step": [], "image": []}

def setup(ext):
    @ext.before_request
    def before(ctx):
        calls["before"].append(ctx)
        if ctx.args and ctx.args.get("steps"):
            return ctx.request.replace(steps=ctx.args["steps"])
        return None

    @ext.on_step
    def step(ctx):
        calls["step"].append(ctx)
        if ctx.args and "guidance" in ctx.args:
            return StepChange(guidance_scale=ctx.args["guidance"])
        return None

    @ext.after_image
    def image(ctx):
        calls["image"].append(ctx)
        if ctx.args and ctx.args.get("invert"):
            return ImageChange(image=ImageOps.invert(ctx.image.convert("RGB")), infotext={"Inverted": "yes"})
        return None
"""


def recording_module(manager):
    return manager.get("rec").module


# --- discovery, versions -----------------------------------------------------------------------

def test_shipped_extensions_load():
    manager = ExtensionManager(None)
    found = {e.id: e for e in manager.discover(SHIPPED)}
    assert found["xyz-plot"].status == ENABLED and found["prompt-matrix"].status == ENABLED
    assert found["xyz-plot"].registered.scripts and found["xyz-plot"].registered.ui_sections


def test_api_version_rules():
    major, minor = api.parse_version(api.API_VERSION)
    assert api.is_compatible(f"{major}.0") and api.is_compatible(str(major))
    assert not api.is_compatible(f"{major}.{minor + 1}")
    assert not api.is_compatible(f"{major + 1}.0")
    with pytest.raises(ValueError):
        api.parse_version("one")


def test_incompatible_api_version_is_refused_without_running_its_code(tmp_path):
    write_extension(tmp_path, "future", "raise SystemExit('must not be imported')\n", api_version="2.0")
    write_extension(tmp_path, "nover", "def setup(ext): pass\n", api_version="")
    manager = ExtensionManager(None)
    manager.discover(tmp_path)
    future = manager.get("future")
    assert future.status == INCOMPATIBLE and "2.0" in future.error and api.API_VERSION in future.error
    assert manager.get("nover").status == INCOMPATIBLE
    assert not future.active and future.module is None
    assert any("future" in line for line in manager.failures())


def test_import_error_is_isolated(tmp_path, caplog):
    write_extension(tmp_path, "broken", "import not_a_module_anywhere\n")
    write_extension(tmp_path, "nosetup", "x = 1\n", manifest="json")
    write_extension(tmp_path, "fine", "def setup(ext): pass\n")
    manager = ExtensionManager(None)
    manager.discover(tmp_path)
    assert manager.get("broken").status == FAILED and "ModuleNotFoundError" in manager.get("broken").error
    assert manager.get("nosetup").status == FAILED and "setup" in manager.get("nosetup").error
    assert manager.get("fine").status == ENABLED
    assert "broken" in caplog.text


def test_relative_imports_inside_an_extension(tmp_path):
    path = write_extension(tmp_path, "pkg", "from . import helper\n\ndef setup(ext):\n    ext.name = helper.NAME\n")
    (path / "helper.py").write_text("NAME = 'helped'\n")
    manager = ExtensionManager(None)
    manager.discover(tmp_path)
    assert manager.get("pkg").status == ENABLED


def test_enable_disable_is_persisted(tmp_path):
    write_extension(tmp_path / "exts", "toggle", "def setup(ext): pass\n")
    state = tmp_path / "data" / "extensions.json"
    manager = ExtensionManager(state)
    manager.discover(tmp_path / "exts")
    manager.set_enabled("toggle", False)
    assert manager.get("toggle").status == "disabled"
    again = ExtensionManager(state)
    again.discover(tmp_path / "exts")
    assert again.get("toggle").status == "disabled" and again.get("toggle").module is None
    again.set_enabled("toggle", True)
    assert again.get("toggle").status == ENABLED
    assert ExtensionManager(state).discover(tmp_path / "exts")[0].status == ENABLED


# --- hook contracts through the engine -------------------------------------------------------

def test_hooks_are_called_with_documented_arguments(engine, with_extensions):
    manager, root = with_extensions
    write_extension(root, "rec", RECORDING)
    manager.discover(root)
    calls = recording_module(manager).calls
    result = engine.generate(small(extension_args={"rec": {"note": 1}}))
    assert len(result.images) == 1 and not result.warnings

    (before,) = calls["before"]
    assert isinstance(before, api.RequestContext) and before.extension_id == "rec"
    assert before.args == {"note": 1} and before.request.prompt == "a red square"

    assert [c.step for c in calls["step"]] == [0, 1]
    first = calls["step"][0]
    assert isinstance(first, api.StepContext) and first.steps == 2 and first.guidance_scale == 7.0
    assert tuple(first.latents.shape) == (1, 4, 8, 8)
    assert first.sigma is not None and first.sigma > calls["step"][1].sigma > 0
    assert first.args == {"note": 1}

    (image,) = calls["image"]
    assert isinstance(image, api.ImageContext) and image.seed == 7 and image.index == 0
    assert image.image.size == (64, 64) and image.request.steps == 2


def test_before_request_changes_the_request(engine, with_extensions):
    manager, root = with_extensions
    write_extension(root, "rec", RECORDING)
    manager.discover(root)
    result = engine.generate(small(extension_args={"rec": {"steps": 3}}))
    assert result.request.steps == 3
    assert "Steps: 3," in result.infotexts[0]
    assert [c.step for c in recording_module(manager).calls["step"]] == [0, 1, 2]


def test_step_hook_changes_guidance(engine, with_extensions):
    manager, root = with_extensions
    write_extension(root, "rec", RECORDING)
    manager.discover(root)
    plain = engine.generate(small(cfg_scale=7.0, seed=3))
    changed = engine.generate(small(cfg_scale=7.0, seed=3, extension_args={"rec": {"guidance": 2.0}}))
    reference = engine.generate(small(cfg_scale=2.0, seed=3))
    assert changed.images[0].tobytes() == reference.images[0].tobytes()
    assert changed.images[0].tobytes() != plain.images[0].tobytes()


def test_after_image_changes_image_and_infotext(engine, with_extensions):
    manager, root = with_extensions
    write_extension(root, "rec", RECORDING)
    manager.discover(root)
    plain = engine.generate(small(seed=5))
    inverted = engine.generate(small(seed=5, extension_args={"rec": {"invert": True}}))
    a, b = plain.images[0].convert("RGB").getpixel((10, 10)), inverted.images[0].getpixel((10, 10))
    assert b == tuple(255 - v for v in a)
    assert "Inverted: yes" in inverted.infotexts[0]
    assert inverted.images[0].info["parameters"] == inverted.infotexts[0]


RAISING = """
from extensions.api import StepChange

count = {"step": 0}

def setup(ext):
    @ext.on_step
    def step(ctx):
        count["step"] += 1
        raise RuntimeError("boom in step")

    @ext.after_image
    def image(ctx):
        return "not an ImageChange"
"""


def test_hook_exception_is_isolated_and_the_job_goes_on(engine, with_extensions):
    manager, root = with_extensions
    write_extension(root, "raiser", RAISING)
    write_extension(root, "rec", RECORDING)
    manager.discover(root)
    result = engine.generate(small(steps=3))
    assert len(result.images) == 1  # the job finished
    assert manager.get("raiser").status == FAILED and "boom in step" in manager.get("raiser").error
    assert manager.get("raiser").module.count["step"] == 1  # not called again after failing
    assert any("raiser" in w and "on_step" in w for w in result.warnings)
    assert len(recording_module(manager).calls["step"]) == 3  # the other extension kept running
    again = engine.generate(small(steps=2))
    assert not again.warnings
    manager.set_enabled("raiser", True)  # the user re-enables it: loaded again
    assert manager.get("raiser").status == ENABLED


def test_wrong_return_type_disables(engine, with_extensions):
    manager, root = with_extensions
    write_extension(root, "badimage", "def setup(ext):\n    ext.after_image(lambda ctx: 'nope')\n")
    manager.discover(root)
    result = engine.generate(small())
    assert len(result.images) == 1
    assert manager.get("badimage").status == FAILED
    assert any("badimage" in w and "after_image" in w for w in result.warnings)


# --- scripts: X/Y/Z plot and prompt matrix ---------------------------------------------------

def test_xyz_grid_dimensions_labels_and_cells(engine, with_extensions):
    manager, _ = with_extensions
    manager.discover(SHIPPED)
    args = {"x_type": "Seed", "x_values": "1, 2, 3", "y_type": "Steps", "y_values": "2-3"}
    result = engine.generate(small(extension_args={"xyz-plot": args}))
    grid, *cells = result.images
    assert len(cells) == 6
    assert [c.size for c in cells] == [(64, 64)] * 6
    # label band above and to the left of the 3 x 2 cells
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    left, top = grid.width - 3 * 64, grid.height - 2 * 64
    assert 0 < left < 200 and 0 < top < 100
    assert grid.crop((left, top, left + 64, top + 64)).tobytes() == cells[0].convert("RGB").tobytes()
    assert grid.crop((left + 128, top + 64, left + 192, top + 128)).tobytes() == cells[5].convert("RGB").tobytes()
    assert result.seeds[1:] == [1, 2, 3, 1, 2, 3]
    assert ["Steps: 2" in t for t in result.infotexts[1:]] == [True] * 3 + [False] * 3
    assert grid.info["parameters"] == result.infotexts[0]


def test_xyz_labels_and_values():
    from extensions.xyz_plot import axes, main

    args = main.read_args({"x_type": "CFG Scale", "x_values": "3-5 (+1)", "y_type": "Prompt S/R",
                           "y_values": "red, blue", "z_type": "Sampler", "z_values": "euler, Euler a"})
    (x, y, z), cells = main.plan(small(), args)
    assert x[2] == ["CFG Scale: 3", "CFG Scale: 4", "CFG Scale: 5"]
    assert y[2] == ["red", "blue"] and z[2] == ["Sampler: Euler", "Sampler: Euler a"]
    assert len(cells) == 12
    assert cells[(2, 1, 1)].prompt == "a blue square" and cells[(2, 1, 1)].cfg_scale == 5.0
    assert cells[(0, 0, 1)].sampler == "Euler a"
    with pytest.raises(api.RequestError, match="x_values"):
        main.plan(small(), main.read_args({"x_type": "Sampler", "x_values": "no such sampler"}))
    with pytest.raises(api.RequestError, match="not in the prompt"):
        main.plan(small(), main.read_args({"x_type": "Prompt S/R", "x_values": "green, blue"}))
    assert axes.parse_values(axes.AXIS_TYPES["Steps"], "1-7 [3]", "w") == [1, 4, 7]


def test_xyz_with_z_gives_combined_and_per_z_grids():
    from extensions.xyz_plot import main

    args = main.read_args({"x_type": "Seed", "x_values": "1,2", "z_type": "Steps", "z_values": "2,3"})
    (x, y, z), cells = main.plan(small(), args)
    tile = Image.new("RGB", (64, 64), "red")
    grids = main.build_grids({key: (tile, "", 1) for key in cells}, x, y, z)
    assert len(grids) == 3
    combined, first, second = grids
    assert combined.width == first.width + second.width and first.size == second.size
    assert first.width == 2 * 64 and first.height > 64  # no row labels (no Y); title and column labels on top


def test_prompt_matrix(engine, with_extensions):
    manager, _ = with_extensions
    manager.discover(SHIPPED)
    result = engine.generate(small(prompt="a square|red|blue", extension_args={"prompt-matrix": {}}))
    grid, *images = result.images
    assert len(images) == 4
    assert [t.splitlines()[0] for t in result.infotexts[1:]] == ["a square", "a square, red", "a square, blue",
                                                                 "a square, red, blue"]
    assert grid.width > 2 * 64 and grid.height > 2 * 64
    off = engine.generate(small(prompt="a square|red", extension_args={"prompt-matrix": {"enabled": False}}))
    assert len(off.images) == 1


def test_script_runs_inside_one_job(engine, with_extensions):
    manager, _ = with_extensions
    manager.discover(SHIPPED)
    seen = []
    original = engine.queue.new_job

    def counting(*args, **kwargs):
        seen.append(args)
        return original(*args, **kwargs)

    engine.queue.new_job = counting
    try:
        engine.generate(small(extension_args={"xyz-plot": {"x_type": "Seed", "x_values": "1,2"}}))
    finally:
        del engine.queue.new_job
    assert len(seen) == 1


def test_grid_helper_geometry():
    tiles = [[Image.new("RGB", (32, 48), "blue")] * 3] * 2
    plain = api.labelled_grid(tiles)
    assert plain.size == (96, 96)
    labelled = api.labelled_grid(tiles, column_labels=["a", "b", "c"], row_labels=["row one", "row two"],
                                 title="Title")
    assert labelled.width > 96 and labelled.height > 96


# --- REST API ------------------------------------------------------------------------------------------

def test_alwayson_scripts_reach_extension_args(engine, with_extensions):
    from fastapi.testclient import TestClient

    from webui.api import create_app

    manager, root = with_extensions
    write_extension(root, "rec", RECORDING)
    manager.discover(root)
    client = TestClient(create_app(engine))
    body = {"prompt": "a red square", "steps": 2, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler",
            "alwayson_scripts": {"rec": {"args": {"steps": 3, "invert": True}}, "unknown thing": {"args": []}}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert "Inverted: yes" in info["infotexts"][0] and "Steps: 3," in info["infotexts"][0]
    assert recording_module(manager).calls["before"][0].args == {"steps": 3, "invert": True}
    assert any("unknown thing" in w for w in info["warnings"])
    assert not any("'rec'" in w for w in info["warnings"])


def test_alwayson_xyz_by_title_and_extension_routes(engine, with_extensions):
    from fastapi.testclient import TestClient

    from webui.api import create_app

    manager, root = with_extensions
    write_extension(root, "routes", """
def setup(ext):
    def add(router, ctx):
        @router.get("/hello")
        def hello():
            return {"from": ctx.extension_id}
    ext.api_routes(add)
""")
    manager.discover(root, SHIPPED)
    client = TestClient(create_app(engine))
    assert client.get("/ext/routes/hello").json() == {"from": "routes"}
    body = {"prompt": "a red square", "steps": 2, "width": 64, "height": 64, "seed": 4, "sampler_name": "Euler",
            "alwayson_scripts": {"X/Y/Z plot": {"args": {"x_type": "Steps", "x_values": "2,3"}}}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 3
    bad = dict(body, alwayson_scripts={"xyz-plot": {"args": {"x_type": "Sampler", "x_values": "nope"}}})
    response = client.post("/sdapi/v1/txt2img", json=bad)
    assert response.status_code == 422 and "x_values" in response.text
    manager.set_enabled("routes", False)
    assert client.get("/ext/routes/hello").status_code == 404


# --- launcher ------------------------------------------------------------------------------------------

def test_launcher_discovery_and_install_policy():
    from webui.cli import discover_extensions, parse_args

    class FakeEngine:
        def __init__(self):
            self.extensions = ExtensionManager(None)

    local, public, off = FakeEngine(), FakeEngine(), FakeEngine()
    assert discover_extensions(local, parse_args([])) == []
    assert local.extensions.allow_install and local.extensions.get("xyz-plot").active
    discover_extensions(public, parse_args(["--listen"]))
    assert not public.extensions.allow_install
    discover_extensions(off, parse_args(["--disable-all-extensions", "--share"]))
    assert off.extensions.list() == [] and not off.extensions.allow_install
    with pytest.raises(RuntimeError, match="off"):
        public.extensions.install("https://example.invalid/owner/ext.git")
    with pytest.raises(ValueError, match="https"):
        local.extensions.install("file:///etc/passwd")
