"""Issue 23, items 7 and 8 without a browser: SD upscale and the X/Y/Z plot report their
progress like txt2img (step count and ETA, over the whole job), SD upscale's infotext says the
size it made, its prompt starts from the dropped image's, its tiles start at the checkpoint's
native size; the Checkpoints tab's dropdown shows the checkpoint in use."""

from __future__ import annotations

import io
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_metadata_read import A1111_TEXT
from test_webui import FakeCheckpoint, FakeEngine

from extensions.manager import ExtensionManager
from extensions.script_progress import ScriptProgress
from pipelines.core.infotext import parse_infotext
from pipelines.core.progress import Progress
from pipelines.core.request import GenerationRequest
from pipelines.core.settings import DEMO_CHECKPOINT_DIR, EngineSettings, Paths
from pipelines.engine import Engine
from pipelines.training.data import COLOUR_NAMES, SHAPES, judge
from webui.app import build_ui
from webui.tabs import upscale

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "extensions"
DEMO = DEMO_CHECKPOINT_DIR / "demo-shapes.safetensors"
# a demo prompt as the README quotes it: "a [small|large] <colour> <shape> ... on a[n] <colour> background"
README_PROMPT = re.compile(r'"(a [a-z\s]+? background)"')  # a quote may wrap onto the next line
POSITION_WORDS = {"top", "bottom", "left", "right", "center", "centre"}


def noise_image(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def with_parameters(image: Image.Image, text: str) -> Image.Image:
    """`image` as it arrives from an uploaded PNG that carries A1111's parameters."""
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    buffer.seek(0)
    return Image.open(buffer)


def assert_whole_job_progress(seen: list[Progress], batches: int) -> None:
    """Every report speaks of the whole job: the same number of batches (cells), a fraction that
    only grows and ends at 1, a step count and an ETA as txt2img's ("Step k/n, ETA s")."""
    assert seen, "no progress reported"
    assert {p.batch_count for p in seen} == {batches}
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert all(p.eta is not None and "ETA" in p.describe() and "Step" in p.describe() for p in seen)
    assert seen[-1].eta == pytest.approx(0.0)


# --- item 7: SD upscale ------------------------------------------------------------------------

def test_sd_upscale_counts_every_tiles_steps_and_says_the_size_it_made(engine):
    request = GenerationRequest(mode="img2img", init_image=noise_image(56, 48), prompt="a red circle", steps=4,
                                width=64, height=64, seed=5, sampler="Euler", denoising_strength=0.5,
                                save_images=False, checkpoint="tiny.safetensors")
    seen: list[Progress] = []
    result = engine.sd_upscale(request, upscaler="Lanczos", scale=2, overlap=16, on_progress=seen.append)
    assert result.images[0].size == (112, 96)
    assert_whole_job_progress(seen, 1)
    assert seen[-1].describe() == "Step 8/8, ETA 0s"  # 2 x 2 tiles, int(4 * 0.5) = 2 steps each
    info = parse_infotext(result.infotexts[0])
    assert info["Size"] == "112x96"  # the picture made, not the tile it was sampled in
    assert info["SD upscale tile"] == "64x64" and info["SD upscale overlap"] == "16"


# --- item 7: X/Y/Z plot (and every script) -----------------------------------------------------

@pytest.fixture
def shipped_extensions(engine, tmp_path):
    saved = engine.extensions
    engine.extensions = ExtensionManager(tmp_path / "extensions.json")
    engine.extensions.discover(SHIPPED)
    yield engine.extensions
    engine.extensions = saved


def test_xyz_plot_progress_runs_over_the_whole_grid(engine, shipped_extensions):
    args = {"x_type": "Seed", "x_values": "1, 2", "y_type": "CFG Scale", "y_values": "5, 7"}
    request = GenerationRequest(prompt="a red square", seed=7, steps=2, width=64, height=64, sampler="Euler",
                                save_images=False, extension_args={"xyz-plot": args})
    seen: list[Progress] = []
    result = engine.generate(request, on_progress=seen.append)
    assert len(result.images) == 5  # the grid and its 4 cells
    assert len(seen) == 4 * 2  # one report per step of every cell
    assert_whole_job_progress(seen, 4)
    assert [p.batch_index for p in seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert seen[-1].describe() == "Cell 4/4, Step 2/2, ETA 0s"


def step(index: int, steps: int, batch: int = 0, batches: int = 1) -> Progress:
    return Progress(step=index, steps=steps, batch_index=batch, batch_count=batches, elapsed=0.0, eta=None)


def test_script_progress_counts_cells_that_ran_elsewhere_and_cells_of_several_batches():
    seen: list[Progress] = []
    progress = ScriptProgress(seen.append)
    progress.cells(0, 3)  # the script says how many cells come
    for batch in range(2):  # a cell of two batches of two steps: four steps of that cell
        for index in (1, 2):
            progress.cell_step(step(index, 2, batch, 2))
    progress.cells(1, 3)
    progress.cells(2, 3)  # ran on a ZeroGPU worker: no step reports, counted as one
    assert [(p.batch_index, p.step, p.steps) for p in seen] == [(0, 1, 4), (0, 2, 4), (0, 3, 4), (0, 4, 4),
                                                                  (1, 1, 1)]
    assert [round(p.fraction, 3) for p in seen] == [0.083, 0.167, 0.25, 0.333, 0.667]
    progress.cell_step(step(1, 2))
    progress.cell_step(step(2, 2))
    assert seen[-1].fraction == pytest.approx(1.0) and seen[-1].batch_count == 3


def test_a_script_that_never_says_its_total_still_counts_up():
    seen: list[Progress] = []
    progress = ScriptProgress(seen.append)
    progress.cell_step(step(1, 1))
    progress.cells(1, 2)
    progress.cell_step(step(1, 1))
    assert [(p.batch_index, p.batch_count) for p in seen] == [(0, 1), (1, 2)]


# --- item 7: SD upscale in the page ------------------------------------------------------------

def test_a_dropped_image_starts_the_sd_upscale_prompt_from_its_own():
    image = with_parameters(Image.new("RGB", (48, 32), (200, 30, 30)), A1111_TEXT)
    prompt, negative, prompted = upscale.prompt_from_image(image, "", "", None)
    assert prompt == "a castle on a hill, <lora:add_detail:0.8>" and negative == "blurry, lowres"
    # the next image replaces what the last one put in ...
    other = with_parameters(Image.new("RGB", (48, 32)),
                            "a dog\nNegative prompt: cats\nSteps: 3, Sampler: Euler, Seed: 1, Size: 48x32")
    assert upscale.prompt_from_image(other, prompt, negative, prompted)[:2] == ("a dog", "cats")
    # ... but never what the user wrote
    assert upscale.prompt_from_image(other, "my own words", negative, prompted)[:2] == ("my own words", "cats")
    # an image without parameters leaves the boxes alone
    untouched = upscale.prompt_from_image(Image.new("RGB", (8, 8)), "kept", "", prompted)
    assert untouched == (gr.update(), gr.update(), prompted)


def sdxl_first() -> FakeEngine:
    return FakeEngine([FakeCheckpoint("sdxl", "/m/sdxl.safetensors", 6_938_000_000, 1.7e9, "SDXL", None),
                       FakeCheckpoint("sd15", "/m/sd15.safetensors", 2_132_000_000, 1.7e9, "SD 1.x", "0123456789")])


def test_sd_upscale_tiles_start_at_the_checkpoints_native_size_and_follow_it():
    # A1111's 64 px overlap for its 512 px tile, in proportion (the demo's 64 px tiles share 8)
    assert [upscale.tile_overlap(n) for n in (64, 512, 768, 1024)] == [8, 64, 96, 128]
    assert build_ui(FakeEngine()).webui.fields["sd_upscale"]["width"].value == 512
    ui = build_ui(sdxl_first()).webui
    sd = ui.fields["sd_upscale"]
    assert (sd["width"].value, sd["height"].value, sd["sd_overlap"].value) == (1024, 1024, 128)
    sized_for = ui.components["upscale"]["sized_for"]
    selected = ui.select_upscale_tab("sd15", "sdxl")  # the session picked SD 1.5 elsewhere
    assert [selected[c] for c in (sd["width"], sd["height"], sd["sd_overlap"], sized_for)] == [512, 512, 64, "sd15"]
    assert ui.select_upscale_tab("sd15", "sd15") == {ui.components["current_tab"]: "upscale"}
    assert ui.upscale_tab.on_checkpoint_pick("sd15", "sdxl", current_tab="upscale")[sd["width"]] == 512
    assert ui.upscale_tab.on_checkpoint_pick("sd15", "sdxl", current_tab="txt2img") == {}


# --- item 8: the Checkpoints tab's dropdown -----------------------------------------------------

def test_checkpoints_dropdown_shows_the_checkpoint_in_use():
    ui = build_ui(sdxl_first()).webui
    assert ui.components["checkpoints"]["choice"].value == "sdxl"  # the default, as the header's
    tab = ui.checkpoints_tab
    *_, choice = tab.show("", "Name", current="sd15", chosen=None)  # the session's pick, when the tab opens
    assert choice["value"] == "sd15"
    *_, choice = tab.show("", "Name", current="sd15", chosen="sdxl")  # a pick made here stays
    assert "value" not in choice


# --- item 10: the README's example prompts work on the demo model ------------------------------

@pytest.mark.skipif(not DEMO.is_file(), reason="the demo checkpoint is not trained yet")
def test_every_example_prompt_in_the_readme_draws_what_it_says(tmp_path):
    examples = README_PROMPT.findall((REPO / "README.md").read_text(encoding="utf-8"))
    assert examples, "the README quotes no demo prompt"
    engine = Engine(Paths(models_dir=tmp_path / "models", data_dir=tmp_path / "data", outdir=tmp_path / "out"),
                    EngineSettings(device="cpu"))
    for quoted in examples:
        words = quoted.split()
        prompt = " ".join(words)
        assert not POSITION_WORDS & set(words), f"{prompt!r}: the demo model ignores position words"
        shape = next(word for word in words if word in SHAPES)
        colour, background = words[words.index(shape) - 1], words[-2]
        assert colour in COLOUR_NAMES and background in COLOUR_NAMES, prompt
        images = engine.generate(GenerationRequest(prompt=prompt, steps=20, cfg_scale=6.0, sampler="DPM++ 2M",
                                                   seed=100, batch_size=4, save_images=False)).images
        drawn = [(j.colour, j.shape, j.background) for j in map(judge, images)]
        assert drawn.count((colour, shape, background)) >= 3, (prompt, drawn)
