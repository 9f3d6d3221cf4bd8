"""Fast tests of the Gradio UI against a fake engine (no torch, no browser, no server)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from pipelines.core.control import DEFAULT_MAX_UNITS
from pipelines.core.jobs import JobQueue
from pipelines.core.merge_request import MergeResult
from pipelines.core.progress import JobControl, Progress
from pipelines.core.request import GenerationRequest, GenerationResult, RequestError, UpscaleRequest
from pipelines.core.settings import EngineSettings, Paths
from webui import convert
from webui.app import build_ui
from webui.jobs import JobRegistry

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"


@dataclass
class FakeCheckpoint:
    name: str
    path: str
    size: int
    mtime: float
    family: str | None = None
    short_hash: str | None = None
    details: dict = field(default_factory=dict)


class FakeEngine:
    """Implements EngineAPI (tests/test_architecture.py holds it to it); records requests,
    returns flat images. Its queue holds one job and lets none wait (QueuedFakeEngine waits in one)."""

    def __init__(self, checkpoints=None, step_delay: float = 0.0, steps_hook=None, data_dir: Path | None = None):
        self.checkpoints = checkpoints if checkpoints is not None else [
            FakeCheckpoint("sd15", "/m/sd15.safetensors", 2_132_000_000, 1_700_000_000.0, "SD 1.x", "0123456789"),
            FakeCheckpoint("sdxl", "/m/sdxl.safetensors", 6_938_000_000, 1_700_000_100.0, "SDXL", None),
        ]
        # nothing on disk: a data folder that is not there (no styles), a checkpoint folder by name only
        data_dir = data_dir or Path("/nonexistent/sdui-fake-engine")
        self.paths = Paths(models_dir=data_dir / "models", ckpt_dir=data_dir / "models" / "Stable-diffusion",
                           data_dir=data_dir, outdir=data_dir / "outputs", demo_dir=None)
        self.settings = EngineSettings(device="cpu")
        self.queue = JobQueue(max_waiting=0)
        self.extensions = None  # no extensions: no sections, no Extensions tab
        self.requests: list[GenerationRequest] = []
        self.owners: list[str | None] = []
        self.upscales: list[UpscaleRequest] = []
        self.sd_upscales: list[tuple[GenerationRequest, str, float, int]] = []
        self.loaded: list[str] = []
        self.refreshes = 0
        self.step_delay = step_delay
        self.steps_hook = steps_hook  # called with (request, control) before each step
        self.error: Exception | None = None
        self.prediction_types: dict[str, str | None] = {}
        self.control_files: list = []  # FakeCheckpoint-like entries a test puts in models/ControlNet
        self.previews: list = []  # (unit, width, height) of each preprocess_control call
        self.recommended: list = []  # (checkpoint, prompt) of each recommended_settings call

    @property
    def hosted_limits(self):
        return None

    @property
    def on_zero_gpu(self) -> bool:
        return False

    # --- what is on disk ---------------------------------------------------------------------
    def list_checkpoints(self, refresh: bool = False):
        self.refreshes += bool(refresh)
        return list(self.checkpoints)

    def find_checkpoint(self, name):
        return next((c for c in self.checkpoints if name in (c.name, c.short_hash)), None)

    def resolve_checkpoint(self, name):
        found = self.find_checkpoint(name or self.default_checkpoint() or "")
        if found is None:
            raise RequestError("checkpoint", f"unknown checkpoint {name!r}")
        return found

    def default_checkpoint(self):
        return self.checkpoints[0].name if self.checkpoints else None

    def native_resolution(self, checkpoint):
        return 1024 if checkpoint == "sdxl" else 512

    def list_vaes(self, refresh: bool = False):
        return []

    def vae_choices(self):
        return ["Automatic", "None"]

    def text_encoder_names(self, refresh: bool = False):
        return list(getattr(self, "text_encoders", ()))  # a test sets them: models/text_encoder's files

    def sampler_names(self):
        return ("DPM++ 2M", "Euler a", "Euler")

    def schedule_types(self, sampler=None):
        return ("Automatic",) if sampler == "Euler a" else ("Automatic", "Karras")

    def upscalers(self, refresh: bool = False):
        return []

    def upscaler_names(self):
        return ["None", "Lanczos", "Nearest"]

    def hires_upscaler_names(self):
        return ["Latent", *self.upscaler_names()]

    def lora_listing(self, refresh: bool = False):
        return []

    def embedding_listing(self, refresh: bool = False):
        return {"loaded": {}, "skipped": {}}

    def recommended_settings(self, checkpoint, prompt):
        """A few-step LoRA for <lora:fast8...> (settings this engine offers) or <lora:hyper...> (DDIM,
        which it does not), a checkpoint named "...lightning..."; else None."""
        self.recommended.append((checkpoint, prompt))
        lowered = (prompt or "").lower()
        if "<lora:fast8" in lowered:
            return {"sampler": "Euler", "schedule_type": "Karras", "steps": 8, "cfg_scale": 1.0,
                    "why": "Fast 8-step LoRA: Euler, Karras, 8 steps, CFG 1", "source": "fast8.safetensors",
                    "source_kind": "lora"}
        if "<lora:hyper" in lowered:
            return {"sampler": "DDIM", "schedule_type": "SGM Uniform", "steps": 8, "cfg_scale": 1.0,
                    "why": "Hyper-SD 8-step LoRA: DDIM, SGM Uniform (trailing), 8 steps, CFG 1",
                    "source": "Hyper-SD15-8steps-lora.safetensors", "source_kind": "lora"}
        if checkpoint and "lightning" in checkpoint.lower():
            return {"sampler": "Euler", "schedule_type": "Automatic", "steps": 4, "cfg_scale": 1.0,
                    "why": "SDXL-Lightning: Euler, 4 steps as trained (1, 2, 4 or 8), CFG 1",
                    "source": checkpoint, "source_kind": "checkpoint"}
        return None

    def face_restorers(self, refresh: bool = False) -> list[dict]:
        return [{"name": "GFPGAN", "cmd_dir": "models/GFPGAN"}]

    # --- control models ------------------------------------------------------------------------
    @property
    def max_control_units(self) -> int:
        return DEFAULT_MAX_UNITS

    def control_models(self, refresh: bool = False) -> list:
        return list(self.control_files)

    def control_preprocessors(self) -> list[dict]:
        return [{"name": name, "available": True, "missing": ""} for name in ("none", "canny", "invert")]

    def preprocess_control(self, unit, width, height, init_image=None):
        image = unit.image if unit.image is not None else init_image
        if image is None:
            raise RequestError("image", "the unit has no image")
        self.previews.append((unit, width, height))
        return image.convert("RGB").resize((width, height))

    # --- what is loaded ----------------------------------------------------------------------
    def load_checkpoint(self, name):
        match = [c for c in self.checkpoints if c.name == name]
        if not match:
            raise RequestError("checkpoint", f"unknown checkpoint {name!r}")
        self.loaded = [name] + [n for n in self.loaded if n != name]
        return match[0]

    def unload_checkpoint(self, name):
        if name not in self.loaded:
            return False
        self.loaded.remove(name)
        return True

    def loaded_checkpoints(self):
        return list(self.loaded)

    def loading_checkpoints(self):
        return []

    def preload(self, name=None, on_done=None, start=None):
        return None

    def preload_when_idle(self, name):
        return None  # never idle enough: a pick only resizes

    def set_prediction_type(self, name, prediction):
        self.prediction_types[name] = prediction

    def hash_checkpoint(self, name):
        return None  # already hashed, as far as it knows

    def hash_progress(self, name):
        return None

    # --- status ------------------------------------------------------------------------------
    def describe(self):
        return {"device": "cpu", "dtype": "float32", "attention": "sdpa"}

    def runtime_flags(self):
        return {}

    def cache_memory(self):
        return {}

    def current_job(self):
        return None

    # --- work --------------------------------------------------------------------------------
    def generate(self, request, *, on_progress=None, control=None, owner=None, on_wait=None):
        self.requests.append(request)
        self.owners.append(owner)
        if self.error is not None:
            raise self.error
        control = control or JobControl()
        request = request.with_resolved_seeds()
        if request.checkpoint:
            self.load_checkpoint(request.checkpoint)
        result = GenerationResult(request=request)
        width = request.width or 512
        height = request.height or 512
        for batch in range(request.batch_count):
            for step in range(1, request.steps + 1):
                if self.steps_hook:
                    self.steps_hook(request, control)
                if control.stop_current:
                    break
                time.sleep(self.step_delay)
                if on_progress:
                    on_progress(Progress(step, request.steps, batch, request.batch_count, 0.1, 1.0))
            control.take_skip()
            if control.interrupted:
                break
            for i in range(request.batch_size):
                seed = request.seed + batch * request.batch_size + i
                result.images.append(Image.new("RGB", (width, height), (seed % 256, 0, 0)))
                result.seeds.append(seed)
                result.subseeds.append(request.subseed)
                result.infotexts.append(f"{request.prompt}\nSteps: {request.steps}, Sampler: {request.sampler}, "
                                        f"CFG scale: {request.cfg_scale:g}, Seed: {seed}, Size: {width}x{height}")
                result.paths.append("")
        result.interrupted = control.interrupted
        return result

    def upscale(self, request, *, on_progress=None, control=None, owner=None, on_wait=None):
        self.upscales.append(request)
        if request.target_width:
            size = (request.target_width, request.target_height)
        else:
            size = (round(request.image.width * request.scale), round(request.image.height * request.scale))
        return GenerationResult(images=[request.image.resize(size)],
                                infotexts=[f"Postprocess upscaler: {request.upscaler}"])

    def sd_upscale(self, request, *, upscaler="Lanczos", scale=2.0, overlap=64, on_progress=None, control=None,
                   owner=None, on_wait=None):
        self.sd_upscales.append((request, upscaler, scale, overlap))
        image = request.init_image
        size = (round(image.width * scale), round(image.height * scale))
        return GenerationResult(images=[image.resize(size)], infotexts=[f"SD upscale overlap: {overlap}"])

    def merge_checkpoints(self, request, *, on_progress=None, control=None, owner=None, on_wait=None):
        self.__dict__.setdefault("merges", []).append(request)  # recorded for the Merge tab's tests
        return MergeResult(name=f"{request.custom_name or 'merged'}.safetensors", path="/models/merged.safetensors",
                           tensors=3)


def fake_request(session: str) -> gr.Request:
    return gr.Request(session_hash=session)


def values(ui, mode: str, **overrides):
    """Component values of a tab keyed by name, as Gradio would pass them, with overrides."""
    out = {name: getattr(component, "value", None) for name, component in ui.fields[mode].items()}
    out.update(overrides)
    return out


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def ui(engine):
    return build_ui(engine).webui


def test_build_ui_has_the_tabs_header_and_footer(engine):
    blocks = build_ui(engine)
    assert isinstance(blocks, gr.Blocks)
    labels = [block.label for block in blocks.blocks.values()
              if isinstance(block, gr.Tab) and (block.elem_id or "").startswith("tab_")]
    assert labels == ["txt2img", "img2img", "Inpaint", "Upscale", "PNG Info", "Checkpoints", "Merge",
                      "Image browser", "Settings"]
    units = [block.label for block in blocks.blocks.values()
             if isinstance(block, gr.Tab) and "_controlnet_unit_" in (block.elem_id or "")]
    assert units == [f"ControlNet Unit {i}" for i in range(3)] * 3  # txt2img, img2img, Inpaint
    ui = blocks.webui
    header = ui.components["checkpoint"]
    assert header.choices == [("sd15", "sd15"), ("sdxl", "sdxl")]
    assert header.value == "sd15"
    assert "device: cpu" in ui.components["footer"].value
    assert ui.fields["txt2img"]["width"].value == 512
    assert ui.fields["txt2img"]["width"].step == 8
    assert ui.fields["txt2img"]["steps"].maximum == 150


def test_two_builds_share_nothing():
    a, b = build_ui(FakeEngine()).webui, build_ui(FakeEngine()).webui
    assert a.jobs is not b.jobs and a.fields is not b.fields


def test_builds_without_checkpoints():
    ui = build_ui(FakeEngine(checkpoints=[])).webui
    assert ui.components["checkpoint"].value is None


def test_generate_maps_named_values_to_request_fields(ui, engine):
    fields = values(ui, "txt2img", prompt="a cat", negative_prompt="blurry", steps=7, cfg_scale=4.5,
                    sampler="Euler", schedule_type="Karras", width=256, height=320, seed=1234.0,
                    batch_count=2, batch_size=3, checkpoint="sdxl")
    images, infotext, last, loaded = ui.generate("txt2img", fields, request=fake_request("s1"))
    req = engine.requests[-1]
    assert (req.mode, req.prompt, req.negative_prompt) == ("txt2img", "a cat", "blurry")
    assert (req.steps, req.cfg_scale, req.sampler, req.schedule_type) == (7, 4.5, "Euler", "Karras")
    assert (req.width, req.height, req.seed, req.batch_count, req.batch_size) == (256, 320, 1234, 2, 3)
    assert req.checkpoint == "sdxl"
    assert engine.owners[-1] == "s1"  # the engine's queue knows whose job it is
    assert len(images) == 6 and infotext.startswith("a cat")
    assert last["seeds"][:3] == [1234, 1235, 1236]
    assert "sdxl" in loaded


def test_handler_registered_with_inputs_by_name(ui):
    """The Generate event hands components over by parameter name (inputs_kwargs), not by position."""
    for mode in ("txt2img", "img2img", "inpaint"):
        fns = [fn for fn in ui.blocks.fns.values() if fn.name == f"generate_{mode}"]
        assert fns, f"generate_{mode} not registered"
        for fn in fns:
            named = dict(zip(fn.input_parameter_names, fn.inputs))
            assert named == ui.fields[mode]
            # they wait in the engine's queue; this fake's holds one job: one at a time
            assert fn.concurrency_id == "queued" and fn.concurrency_limit == 1


def test_img2img_and_inpaint_requests(ui, engine):
    init = Image.new("RGB", (64, 64), "blue")
    ui.generate("img2img", values(ui, "img2img", init_image=init, denoising_strength=0.4,
                                  resize_mode="crop and resize", width=64, height=64, steps=2),
                request=fake_request("s"))
    req = engine.requests[-1]
    assert req.mode == "img2img" and req.init_image is init and req.denoising_strength == 0.4
    assert req.resize_mode == "crop and resize"

    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 200), (10, 10, 20, 30))
    editor = {"background": Image.new("RGBA", (64, 64), (0, 128, 0, 255)), "layers": [layer], "composite": None}
    ui.generate("inpaint", values(ui, "inpaint", inpaint_image=editor, inpaint_area="Only masked",
                                  mask_mode="Inpaint not masked", inpainting_fill="latent noise",
                                  inpaint_full_res_padding=16, mask_blur=8, width=64, height=64, steps=2),
                request=fake_request("s"))
    req = engine.requests[-1]
    assert req.mode == "inpaint" and req.init_image.mode == "RGB"
    assert req.init_image.getpixel((0, 0)) == (0, 128, 0)
    assert req.mask.mode == "L" and req.mask.getbbox() == (10, 10, 20, 30)
    assert req.mask.getpixel((15, 15)) == 255 and req.mask.getpixel((0, 0)) == 0
    assert req.inpaint_full_res is True and req.inpainting_mask_invert is True
    assert req.inpainting_fill == "latent noise" and req.inpaint_full_res_padding == 16 and req.mask_blur == 8


def test_inpaint_without_painting_names_the_mask(ui):
    editor = {"background": Image.new("RGB", (64, 64)), "layers": [Image.new("RGBA", (64, 64))], "composite": None}
    with pytest.raises(gr.Error, match=r"Mask \(mask\)"):
        ui.generate("inpaint", values(ui, "inpaint", inpaint_image=editor), request=fake_request("s"))


@pytest.mark.parametrize("overrides, field", [
    ({"steps": 500}, "steps"),
    ({"width": 4096}, "width"),  # 100 is no error: it snaps to 104, as A1111's step-8 slider
    ({"cfg_scale": 99}, "cfg_scale"),
    ({"sampler": "Nope"}, "sampler"),
    ({"seed": -5}, "seed"),
])
def test_bad_value_gives_gr_error_naming_the_field(ui, engine, overrides, field):
    with pytest.raises(gr.Error) as info:
        ui.generate("txt2img", values(ui, "txt2img", **overrides), request=fake_request("s"))
    assert f"({field})" in info.value.message
    assert convert.LABELS[field] in info.value.message
    assert engine.requests == []


def test_img2img_without_image_names_the_field(ui):
    with pytest.raises(gr.Error, match="init_image"):
        ui.generate("img2img", values(ui, "img2img", init_image=None), request=fake_request("s"))


def test_engine_errors_become_gr_error(ui, engine):
    engine.error = RuntimeError("CUDA out of memory")
    with pytest.raises(gr.Error, match="Generation failed: RuntimeError: CUDA out of memory"):
        ui.generate("txt2img", values(ui, "txt2img"), request=fake_request("s"))
    engine.error = RequestError("checkpoint", "unknown checkpoint 'x'")
    with pytest.raises(gr.Error, match=r"Checkpoint \(checkpoint\): unknown"):
        ui.generate("txt2img", values(ui, "txt2img"), request=fake_request("s"))
    assert len(ui.jobs) == 0  # the job is unregistered even on failure


def test_empty_seed_means_random(ui, engine):
    ui.generate("txt2img", values(ui, "txt2img", seed=None, steps=1, width=64, height=64), request=fake_request("s"))
    assert engine.requests[-1].seed == -1


def test_interrupt_hits_only_the_callers_job(engine):
    ui = build_ui(engine).webui
    started = threading.Event()
    release = threading.Event()
    controls = {}

    def hook(request, control):
        controls[request.prompt] = control
        started.set()
        release.wait(5)

    engine.steps_hook = hook
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault(
        "a", ui.generate("txt2img", values(ui, "txt2img", prompt="A", steps=3, width=64, height=64),
                         request=fake_request("session-A"))))
    thread.start()
    assert started.wait(5)
    ui.interrupt(fake_request("session-B"))  # someone else: nothing of theirs runs
    assert not controls["A"].interrupted
    ui.skip(fake_request("session-B"))
    assert not controls["A"].stop_current
    ui.interrupt(fake_request("session-A"))
    assert controls["A"].interrupted
    release.set()
    thread.join(5)
    assert results["a"][0] == []  # interrupted before the first batch finished
    assert len(ui.jobs) == 0


def test_job_registry_per_session():
    jobs = JobRegistry()
    with jobs.run("a") as a, jobs.run("b") as b:
        assert jobs.skip("a") and a.stop_current and not b.stop_current
        assert jobs.interrupt("b") and b.interrupted and not a.interrupted
    assert not jobs.interrupt("a") and len(jobs) == 0


def test_progress_reported_through_gr_progress(ui):
    calls = []
    ui.generate("txt2img", values(ui, "txt2img", steps=4, width=64, height=64), request=fake_request("s"),
                progress=lambda value, desc=None: calls.append((value, desc)))
    assert calls[-1] == (1.0, "Step 4/4, ETA 1s")
    assert calls[0][0] == 0.0


def test_gallery_select_and_reuse_seed(ui):
    _, _, last, _ = ui.generate("txt2img", values(ui, "txt2img", prompt="p", seed=10, batch_size=3, steps=1,
                                                  width=64, height=64), request=fake_request("s"))
    assert ui.reuse_seed(last=last) == 10
    text, last = ui.select_image(gr.SelectData(None, {"index": 2, "value": None}), last=last)
    assert "Seed: 12" in text and last["selected"] == 2
    assert ui.reuse_seed(last=last) == 12
    assert ui.reuse_seed(last=None) == -1


def test_sizes_follow_the_sessions_checkpoint(ui):
    def sizes(updates, mode):
        fields = ui.fields[mode]
        return (updates.get(fields["width"]), updates.get(fields["height"]),
                updates.get(ui.components[mode]["sized_for"]))

    # a pick resizes the tab on screen only (Gradio drops updates to tabs not on screen)
    updates = ui.on_checkpoint_pick(checkpoint="sdxl", current_tab="img2img")
    assert sizes(updates, "img2img") == (1024, 1024, "sdxl") and len(updates) == 3
    assert ui.on_checkpoint_pick(checkpoint="sdxl", current_tab="upscale") == {}
    # the other tabs catch up when selected, once
    select = ui.tab_select_handler("inpaint")
    updates = select(checkpoint="sdxl", sized_for="sd15")
    assert sizes(updates, "inpaint") == (1024, 1024, "sdxl")
    assert updates[ui.components["current_tab"]] == "inpaint"
    assert select(checkpoint="sdxl", sized_for="sdxl") == {ui.components["current_tab"]: "inpaint"}


def test_checkpoints_tab_refresh_and_load(ui, engine):
    rows = convert.checkpoint_rows(engine.list_checkpoints())
    assert rows[0][:4] == ["sd15", "SD 1.x", "1.99 GiB", "0123456789"]
    assert rows[1][3] == ""  # unknown hash stays blank
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", rows[0][4])

    engine.checkpoints.append(FakeCheckpoint("new", "/m/new.safetensors", 1000, 1.0))
    table, header, choice, loaded = ui.refresh_checkpoints(current="sdxl")
    assert engine.refreshes == 1 and [r[0] for r in table] == ["sd15", "sdxl", "new"]
    assert header["choices"] == ["sd15", "sdxl", "new"] and header["value"] == "sdxl"
    assert ui.refresh_checkpoints(current="gone")[1]["value"] == "sd15"  # back to the default

    name, loaded, table, status = ui.load_checkpoint(name="sdxl")
    assert name == "sdxl" and "sdxl" in loaded and engine.loaded == ["sdxl"]
    with pytest.raises(gr.Error, match="unknown checkpoint"):
        ui.load_checkpoint(name="missing")
    with pytest.raises(gr.Error, match="pick a checkpoint"):
        ui.load_checkpoint(name=None)


def test_read_parameters_fills_fields_by_name(ui, engine):
    text = ("a castle\nNegative prompt: fog\nSteps: 33, Sampler: Euler, Schedule type: Karras, CFG scale: 5.5, "
            "Seed: 77, Size: 640x384, Model hash: 0123456789, Model: sd15, Denoising strength: 0.3, "
            "Mask blur: 9, Inpaint area: Only masked, Mask mode: Inpaint not masked")
    fields = ui.fields["inpaint"]
    updates = ui.read_parameters("inpaint", text, last=None, checkpoint="sdxl")
    got = {name: updates[component] for name, component in fields.items() if component in updates}
    assert got == {"prompt": "a castle", "negative_prompt": "fog", "steps": 33, "sampler": "Euler",
                   "schedule_type": "Karras", "cfg_scale": 5.5, "seed": 77, "width": 640, "height": 384,
                   "denoising_strength": 0.3, "mask_blur": 9, "inpaint_area": "Only masked",
                   "mask_mode": "Inpaint not masked", "checkpoint": "sd15",
                   "clip_skip": 1,  # absent in the text: A1111 leaves it out at 1
                   # absent too, so off: no variation, no seed resize (the seed extras)
                   "subseed_strength": 0.0, "seed_resize_from_w": 0, "seed_resize_from_h": 0,
                   "tiling": False,  # absent: A1111 writes "Tiling: True" only when on
                   "restore_faces": False,  # absent: "Face restoration: <model>" only when on
                   "soft_inpainting": False,  # absent: "Soft inpainting: True" only when on
                   "tiny_vae_decode": False,  # absent: the full VAE decoded
                   # absent: the speed options are off (token merging, DeepCache, CFG cutoff)
                   "token_merging_ratio": 0.0, "deepcache_interval": 1, "s_min_uncond": 0.0,
                   "s_min_uncond_all": False, "skip_early_cond": 0.0,
                   "refiner_checkpoint": "None"}  # absent: "Refiner: name [hash]" only when one ran
    assert set(updates) <= set(fields.values()) | {ui.components["inpaint"]["sized_for"]}
    assert updates[ui.components["inpaint"]["sized_for"]] == "sd15"
    # txt2img has no denoising/mask fields: they are simply not touched
    updates = ui.read_parameters("txt2img", text, last=None, checkpoint="sd15")
    assert ui.fields["txt2img"]["steps"] in updates and ui.fields["txt2img"]["checkpoint"] not in updates
    # a plain prompt restores nothing (the negative prompt is not wiped)
    assert ui.read_parameters("txt2img", "just a prompt", last=None) == {}
    # an empty prompt reads the selected image of the last result
    _, _, last, _ = ui.generate("txt2img", values(ui, "txt2img", prompt="p", seed=5, steps=2, width=64, height=64),
                                request=fake_request("s"))
    updates = ui.read_parameters("txt2img", "", last=last, checkpoint="sd15")
    assert updates[ui.fields["txt2img"]["seed"]] == 5 and updates[ui.fields["txt2img"]["steps"]] == 2


def test_upscale_by_factor_and_to_size(ui, engine):
    image = Image.new("RGB", (32, 16))
    images, info = ui.upscale(image=image, upscaler="Lanczos", upscale_mode="Scale by", scale=2,
                              target_width=1024, target_height=1024)
    req = engine.upscales[-1]
    assert req.scale == 2 and req.target_width is None and images[0].size == (64, 32)
    assert "Lanczos" in info
    images, _ = ui.upscale(image=image, upscaler="Nearest", upscale_mode="Scale to", scale=2,
                           target_width=100.0, target_height=40.0)
    req = engine.upscales[-1]
    assert (req.target_width, req.target_height, req.upscaler) == (100, 40, "Nearest")
    with pytest.raises(gr.Error, match=r"scale"):
        ui.upscale(image=image, upscaler="Lanczos", upscale_mode="Scale by", scale=20,
                   target_width=None, target_height=None)
    with pytest.raises(gr.Error, match=r"Input image \(image\)"):
        ui.upscale(image=None, upscaler="Lanczos", upscale_mode="Scale by", scale=2,
                   target_width=None, target_height=None)


def test_editor_mask_extraction_resizes_layers():
    editor = {"background": Image.new("RGB", (32, 32), "red"),
              "layers": [Image.new("RGBA", (64, 64), (255, 255, 255, 255))], "composite": None}
    init, mask = convert.editor_image_and_mask(editor)
    assert init.size == mask.size == (32, 32) and mask.getextrema() == (255, 255)
    assert convert.editor_image_and_mask(None) == (None, None)


def test_cli_flags_map_to_settings(tmp_path):
    from webui import cli

    args = cli.parse_args(["--port", "9000", "--listen", "--models-dir", str(tmp_path), "--use-cpu", "all",
                           "--no-half", "--xformers", "--medvram", "--ckpt", "x.safetensors",
                           "--gradio-auth", "a:b,c:d:e", "--outdir", str(tmp_path / "out"),
                           "--allowed-paths", str(tmp_path / "extra")])
    paths, settings = cli.paths_from_args(args), cli.settings_from_args(args)
    assert paths.models_dir == tmp_path and paths.outdir == tmp_path / "out"
    assert (settings.device, settings.precision, settings.attention, settings.offload) == (
        "cpu", "full", "xformers", "medvram")
    assert settings.default_checkpoint == "x.safetensors"
    kwargs = cli.launch_kwargs(args, paths)
    assert kwargs["server_name"] == "0.0.0.0" and kwargs["server_port"] == 9000
    assert kwargs["auth"] == [("a", "b"), ("c", "d:e")]
    assert str((tmp_path / "out").resolve()) in kwargs["allowed_paths"]
    assert cli.launch_kwargs(cli.parse_args([]), cli.paths_from_args(cli.parse_args([])))["server_name"] == "127.0.0.1"
    with pytest.raises(SystemExit):
        cli.parse_args(["--gradio-auth", "nopassword"])


def test_help_lists_every_design_flag(capsys):
    from webui import cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--port", "--listen", "--share", "--api", "--nowebui", "--api-auth", "--gradio-auth",
                 "--models-dir", "--ckpt-dir", "--vae-dir", "--lora-dir", "--esrgan-models-path",
                 "--embeddings-dir", "--ckpt", "--data-dir", "--outdir", "--use-cpu", "--device", "--precision",
                 "--no-half", "--no-half-vae", "--attention", "--xformers", "--opt-sdp-attention", "--lowvram",
                 "--medvram", "--allowed-paths"):
        assert re.search(rf"{re.escape(flag)}\b", text), flag


def test_no_torch_import_in_webui():
    offenders = []
    for path in WEBUI_DIR.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(import\s+torch\b|from\s+torch\b)", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_importing_launch_starts_nothing():
    """No server, no engine, no torch when launch.py is merely imported."""
    import subprocess
    import sys

    code = ("import sys, launch; assert callable(launch.main); "
            "print('torch' in sys.modules, 'gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=WEBUI_DIR.parent, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_schedule_choices_follow_the_sampler(ui):
    update = ui.schedule_choices(sampler="Euler a", current="Karras")
    assert update["choices"] in (["Automatic"], [("Automatic", "Automatic")]) and update["value"] == "Automatic"
    update = ui.schedule_choices(sampler="DPM++ 2M", current="Karras")
    assert update["value"] == "Karras"


class QueuedFakeEngine(FakeEngine):
    """The fake engine behind a real JobQueue, as the real engine is."""

    def __init__(self, max_waiting=4):
        super().__init__()
        self.queue = JobQueue(max_waiting)

    def generate(self, request, *, on_progress=None, control=None, owner=None, on_wait=None):
        with self.queue.run(self.queue.new_job(request.mode, owner, control), on_wait):
            return super().generate(request, on_progress=on_progress, control=control, owner=owner)


def hold_queue(queue):
    """Occupy the queue's slot until the returned event is set."""
    release, entered = threading.Event(), threading.Event()

    def hold():
        with queue.run(queue.new_job("txt2img", owner="someone else")):
            entered.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    entered.wait(5)
    return release


def test_waiting_jobs_are_told_their_place_and_a_full_queue_is_a_warning(capsys):
    engine = QueuedFakeEngine(max_waiting=1)
    ui = build_ui(engine).webui
    generate = next(fn for fn in ui.blocks.fns.values() if fn.name == "generate_txt2img")
    assert generate.concurrency_limit == 2  # as many handlers as the queue holds, running one included
    release = hold_queue(engine.queue)
    shown, answers = [], []

    class Shown:  # stands in for gr.Progress: what the page's progress bar would say
        def __call__(self, fraction, desc=None):
            shown.append(desc)

    waiter = threading.Thread(target=lambda: answers.append(ui.generate(
        "txt2img", {"prompt": "a", "steps": 1}, request=fake_request("s1"), progress=Shown())))
    waiter.start()
    while engine.queue.waiting() < 1:
        time.sleep(0.01)
    with pytest.warns(UserWarning, match=r"^Queue full \(1 waiting\), try again in a moment$"):
        refused = ui.generate("txt2img", {"prompt": "b", "steps": 1}, request=fake_request("s2"))
    assert all(isinstance(value, type(gr.skip())) for value in refused) and len(refused) == 4
    assert [r.prompt for r in engine.requests] == []
    release.set()
    waiter.join(10)
    assert "Waiting: 1 job ahead of you" in shown and shown[-1] != "Waiting: 1 job ahead of you"
    assert len(answers[0][0]) == 1 and [r.prompt for r in engine.requests] == ["a"]


def test_interrupt_reaches_a_job_that_still_waits(capsys):
    engine = QueuedFakeEngine()
    ui = build_ui(engine).webui
    release = hold_queue(engine.queue)
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(ui.generate(
        "txt2img", {"prompt": "a", "steps": 1}, request=fake_request("s1"))))
    waiter.start()
    while engine.queue.waiting() < 1:
        time.sleep(0.01)
    ui.interrupt(fake_request("s2"))  # another session's Interrupt does nothing to it
    time.sleep(0.5)
    assert engine.queue.waiting() == 1
    ui.interrupt(fake_request("s1"))
    waiter.join(5)
    assert not waiter.is_alive() and engine.queue.waiting() == 0  # it left at once, the slot still held
    assert engine.requests == [] and len(answers[0]) == 4
    assert "Interrupted while waiting: nothing ran." in capsys.readouterr().out
    release.set()


def test_seed_extras_reach_the_request_and_are_read_back(ui, engine):
    """Variation seed and "Resize seed from" (the seed's extra options) in every generation tab."""
    for mode in ("txt2img", "img2img", "inpaint"):
        for name in ("subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h"):
            assert name in ui.fields[mode], (mode, name)
    assert ui.fields["txt2img"]["seed_resize_from_w"].value == 0  # off until set
    ui.generate("txt2img", values(ui, "txt2img", prompt="p", width=96, height=64, steps=2, subseed=9.0,
                                  subseed_strength=0.25, seed_resize_from_w=64.0, seed_resize_from_h=64.0),
                request=fake_request("s"))
    req = engine.requests[-1]
    assert (req.subseed, req.subseed_strength, req.seed_resize_from_w, req.seed_resize_from_h) == (9, 0.25, 64, 64)
    with pytest.raises(gr.Error) as info:  # one side only: the other is named
        ui.generate("txt2img", values(ui, "txt2img", seed_resize_from_w=64), request=fake_request("s"))
    assert "Resize seed from height (seed_resize_from_h)" in info.value.message
    text = ("p\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 96x64, Variation seed: 9, "
            "Variation seed strength: 0.25, Seed resize from: 64x48")
    updates = ui.read_parameters("img2img", text, last=None, checkpoint="sd15")
    fields = ui.fields["img2img"]
    assert [updates[fields[name]] for name in ("subseed", "subseed_strength", "seed_resize_from_w",
                                               "seed_resize_from_h")] == [9, 0.25, 64, 48]


def test_tiling_checkbox_reaches_the_request_and_is_read_back(ui, engine):
    """A1111's "Tiling" checkbox in every generation tab: off by default, on in the request when ticked."""
    for mode in ("txt2img", "img2img", "inpaint"):
        assert isinstance(ui.fields[mode]["tiling"], gr.Checkbox) and ui.fields[mode]["tiling"].value is False
        assert ui.fields[mode]["tiling"].label == "Tiling"
    ui.generate("txt2img", values(ui, "txt2img", prompt="p", steps=2), request=fake_request("s"))
    assert engine.requests[-1].tiling is False
    ui.generate("txt2img", values(ui, "txt2img", prompt="p", steps=2, tiling=True), request=fake_request("s"))
    assert engine.requests[-1].tiling is True
    init = Image.new("RGB", (64, 64), "blue")
    ui.generate("img2img", values(ui, "img2img", init_image=init, width=64, height=64, steps=2, tiling=True),
                request=fake_request("s"))
    assert engine.requests[-1].mode == "img2img" and engine.requests[-1].tiling is True
    text = "p\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, Tiling: True"
    fields = ui.fields["img2img"]
    assert ui.read_parameters("img2img", text, last=None, checkpoint="sd15")[fields["tiling"]] is True
    plain = text.replace(", Tiling: True", "")  # A1111 leaves it out when off
    assert ui.read_parameters("img2img", plain, last=None, checkpoint="sd15")[fields["tiling"]] is False


def test_refiner_and_hires_checkpoint_reach_the_request_and_are_read_back(ui, engine):
    """A1111 1.6's Refiner accordion in every generation tab, and hires fix's checkpoint dropdown."""
    for mode in ("txt2img", "img2img", "inpaint"):
        assert ui.fields[mode]["refiner_checkpoint"].value == "None"
        assert ui.fields[mode]["refiner_switch_at"].value == 0.8
    assert ui.fields["txt2img"]["hr_checkpoint_name"].value == "Use same checkpoint"
    ui.generate("txt2img", values(ui, "txt2img", prompt="p", steps=2, enable_hr=True), request=fake_request("s"))
    assert (engine.requests[-1].refiner_checkpoint, engine.requests[-1].hr_checkpoint_name) == (None, None)
    ui.generate("txt2img", values(ui, "txt2img", prompt="p", steps=2, refiner_checkpoint="sd15",
                                  refiner_switch_at=0.6, enable_hr=True, hr_checkpoint_name="sd15"),
                request=fake_request("s"))
    request = engine.requests[-1]
    assert (request.refiner_checkpoint, request.refiner_switch_at, request.hr_checkpoint_name) == ("sd15", 0.6, "sd15")
    text = ("p\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, Denoising strength: 0.7, "
            "Hires upscale: 2, Hires upscaler: Latent, Hires checkpoint: sd15 [0123456789], "
            "Refiner: sd15 [0123456789], Refiner switch at: 0.6")
    fields = ui.fields["txt2img"]
    updates = ui.read_parameters("txt2img", text, last=None, checkpoint="sd15")
    assert [updates[fields[name]] for name in ("refiner_checkpoint", "refiner_switch_at", "hr_checkpoint_name")] \
        == ["sd15", 0.6, "sd15"]
    plain = ui.read_parameters("txt2img", "p\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3", last=None,
                               checkpoint="sd15")
    assert plain[fields["refiner_checkpoint"]] == "None"
