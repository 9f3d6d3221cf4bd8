"""ZeroGPU: device work runs inside `spaces.GPU` functions with a duration estimated from the request.

Tested with the real `spaces` package (a test extra). Off ZeroGPU it must stay out of the way.
On ZeroGPU two ways: in this process SPACES_ZERO_GPU is set and `spaces.GPU` is replaced by a
recorder that does what the real one does to a call (evaluates the duration callable with the
call's arguments, sends arguments and result through pickle as to and from its forked worker,
or raises what the real one raises on a spent quota), so jobs really run; and in a separate
process the real package in ZeroGPU mode talks to a fake device API (tests/zerogpu_device.py),
which checks what it is asked for and how its refusals reach the caller.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
import spaces
from fastapi.testclient import TestClient
from PIL import Image
from spaces.zero.gradio import error as spaces_error
from test_upscale_models import write_tiny_compact

from pipelines.core.hosted_limits import ZeroGPUError
from pipelines.core.request import GenerationRequest, RequestError, UpscaleRequest
from pipelines.core.settings import EngineSettings, Paths
from pipelines.engine import Engine
from pipelines.hosting import zerogpu
from pipelines.hosting.zerogpu import GpuLease, clamp_seconds, generation_seconds
from webui.api import ApiOptions, create_app
from webui.common import call_engine

CKPT = "tiny.safetensors"
SMALL = dict(checkpoint=CKPT, width=64, height=64, steps=2, sampler="Euler", save_images=False)
QUOTA_TEXT = "You have exceeded your free ZeroGPU quota (60s requested vs. 12s left). Try again in 0:04:10."


class FakeZeroGPU:
    """Stands in for `spaces.GPU` on ZeroGPU hardware, one lent call at a time."""

    def __init__(self):
        self.decorated: list[str] = []
        self.durations: list[int] = []
        self.refuse_next: Exception | None = None

    def __call__(self, task=None, *, duration=None, size=None):
        assert task is None, "expected the @spaces.GPU(duration=...) form"
        return lambda fn: self._lent(fn, duration)

    def _lent(self, fn, duration):
        self.decorated.append(fn.__name__)

        def handler(*args, **kwargs):
            # spaces: static_duration(duration, *args, **kwargs), then client.schedule(...)
            asked = duration(*args, **kwargs) if callable(duration) else duration
            if self.refuse_next is not None:
                refusal, self.refuse_next = self.refuse_next, None
                raise refusal
            self.durations.append(asked)
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # into the worker ...
            return pickle.loads(pickle.dumps(fn(*args, **kwargs)))  # ... and back

        return handler


@pytest.fixture(scope="module")
def simulated(models_dir, tmp_path_factory):
    """An engine built on (simulated) ZeroGPU, and the recorder its entry points were lent to."""
    fake = FakeZeroGPU()
    with pytest.MonkeyPatch.context() as patch:  # both are read when the engine is built
        patch.setenv("SPACES_ZERO_GPU", "true")
        patch.setattr(spaces, "GPU", fake)
        tmp = tmp_path_factory.mktemp("zero")
        write_tiny_compact(tmp / "ESRGAN" / "tiny-compact-x2.safetensors")
        engine = Engine(Paths(models_dir=models_dir, esrgan_dir=tmp / "ESRGAN", data_dir=tmp / "data",
                              outdir=tmp / "outputs"), EngineSettings(device="cpu", precision="full"))
    return engine, fake  # fp32 like the `engine` fixture it is compared with pixel for pixel


@pytest.fixture
def zero_gpu(simulated):
    fake = simulated[1]
    fake.durations.clear()
    fake.refuse_next = None
    return fake


@pytest.fixture
def zero_engine(simulated):
    return simulated[0]


# --- off ZeroGPU: a pass-through ------------------------------------------------------------------

def test_off_zero_gpu_nothing_is_wrapped(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    lease = GpuLease()
    assert not lease.active and zerogpu.import_spaces() is None

    def work(request):
        return request.steps

    assert lease.lend(work, lambda request: 60) is work
    # and the real package, imported outside ZeroGPU, hands functions back untouched too
    assert spaces.GPU(work) is work and spaces.GPU(duration=lambda r: 60)(work) is work


def test_off_zero_gpu_generation_works_with_spaces_installed(engine):
    assert not engine.gpu.active
    result = engine.generate(GenerationRequest(prompt="a red square", seed=5, **SMALL))
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert "Steps: 2" in result.infotexts[0]


def test_zero_gpu_env_without_the_package_runs_unwrapped(monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(zerogpu.importlib.util, "find_spec", lambda name: None)
    lease = GpuLease()
    assert not lease.active
    assert lease.lend(len, lambda *a: 60) is len


def test_zero_gpu_env_with_a_spaces_that_will_not_load_runs_unwrapped(monkeypatch, caplog):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")

    def refuse(name):
        raise AssertionError("SPACES_ZERO_DEVICE_API_URL env must be set on ZeroGPU Spaces")

    monkeypatch.setattr(zerogpu.importlib, "import_module", refuse)
    assert not GpuLease().active
    assert "SPACES_ZERO_DEVICE_API_URL" in caplog.text


# --- the duration estimate ----------------------------------------------------------------------------

def test_duration_grows_with_steps_size_batch_and_hires():
    base = GenerationRequest(steps=20, width=512, height=512)
    seconds = generation_seconds(base)
    assert generation_seconds(base.replace(steps=40)) > seconds
    assert generation_seconds(base.replace(width=1024, height=1024)) > generation_seconds(base.replace(steps=40))
    assert generation_seconds(base.replace(batch_size=2)) > seconds
    assert generation_seconds(base.replace(batch_count=3)) > generation_seconds(base.replace(batch_size=2))
    assert generation_seconds(base.replace(enable_hr=True, hr_scale=2.0)) > seconds
    # a checkpoint's native size is used when the request has none
    assert generation_seconds(base.replace(width=None, height=None), 1024) > generation_seconds(
        base.replace(width=None, height=None), 512)
    # img2img runs steps × denoising strength
    image = Image.new("RGB", (512, 512))
    weak = base.replace(mode="img2img", init_image=image, denoising_strength=0.3)
    assert generation_seconds(weak) < generation_seconds(weak.replace(denoising_strength=0.9)) <= seconds


def test_duration_counts_the_refiners_model_and_face_restoration():
    base = GenerationRequest(steps=20, width=1024, height=1024, batch_size=2)
    seconds = generation_seconds(base)
    refined = generation_seconds(base.replace(refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.8))
    assert refined == pytest.approx(seconds + zerogpu.SECOND_MODEL_SECONDS)  # its steps are among the 20
    assert generation_seconds(base.replace(refiner_checkpoint="refiner.safetensors",
                                           refiner_switch_at=1.0)) == seconds  # never switched to: not loaded
    hires = base.replace(enable_hr=True, hr_scale=1.5)
    assert generation_seconds(hires.replace(hr_checkpoint_name="other.safetensors")) == pytest.approx(
        generation_seconds(hires) + zerogpu.SECOND_MODEL_SECONDS)
    both = hires.replace(hr_checkpoint_name="other.safetensors", refiner_checkpoint="refiner.safetensors")
    assert generation_seconds(both) == pytest.approx(generation_seconds(hires) + 2 * zerogpu.SECOND_MODEL_SECONDS)
    # face restoration: loading once, then every image of the job
    faces = generation_seconds(base.replace(restore_faces=True)) - seconds
    more = generation_seconds(base.replace(restore_faces=True, batch_count=3)) - generation_seconds(
        base.replace(batch_count=3))
    assert faces == pytest.approx(zerogpu.FACE_LOAD_SECONDS + 2 * zerogpu.FACE_SECONDS)
    assert more == pytest.approx(zerogpu.FACE_LOAD_SECONDS + 6 * zerogpu.FACE_SECONDS)
    image = Image.new("RGB", (512, 512))
    extras = UpscaleRequest(image=image, scale=2)
    both_restorers = UpscaleRequest(image=image, scale=2, gfpgan_visibility=1.0, codeformer_visibility=0.5)
    assert zerogpu.upscale_seconds(both_restorers) == pytest.approx(
        zerogpu.upscale_seconds(extras) + 2 * (zerogpu.FACE_LOAD_SECONDS + zerogpu.FACE_SECONDS))


def test_duration_is_clamped_to_what_zero_gpu_grants():
    tiny = GenerationRequest(steps=1, width=64, height=64)
    huge = GenerationRequest(steps=150, width=2048, height=2048, batch_size=8)
    assert clamp_seconds(generation_seconds(tiny)) == zerogpu.MIN_SECONDS
    assert clamp_seconds(generation_seconds(huge)) == zerogpu.MAX_SECONDS
    middle = GenerationRequest(steps=30, width=1024, height=1024, batch_size=2)
    assert zerogpu.MIN_SECONDS < clamp_seconds(generation_seconds(middle)) < zerogpu.MAX_SECONDS


def test_upscale_and_sd_upscale_durations_grow_with_output_size():
    image = Image.new("RGB", (512, 512))
    by2 = zerogpu.upscale_seconds(UpscaleRequest(image=image, scale=2))
    assert zerogpu.upscale_seconds(UpscaleRequest(image=image, scale=4)) > by2
    assert zerogpu.upscale_seconds(UpscaleRequest(image=image, images=(image,), scale=2)) > by2
    request = GenerationRequest(mode="img2img", init_image=image, steps=20, width=512, height=512)
    assert zerogpu.sd_upscale_seconds(request, 4, 64) > zerogpu.sd_upscale_seconds(request, 2, 64)


# --- on (simulated) ZeroGPU -----------------------------------------------------------------------

def test_on_zero_gpu_each_entry_point_is_a_spaces_gpu_function(zero_engine, zero_gpu):
    assert zero_engine.gpu.active
    assert sorted(zero_gpu.decorated) == ["_generate_request", "_sd_upscale_request", "_upscale_request"]


def test_on_zero_gpu_generation_crosses_the_worker_boundary_with_its_duration(zero_engine, zero_gpu):
    small = GenerationRequest(prompt="a blue circle", seed=11, **SMALL)
    result = zero_engine.generate(small)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.seeds == [11] and "Seed: 11" in result.infotexts[0]
    assert zero_gpu.durations == [clamp_seconds(generation_seconds(small))]

    bigger = small.replace(steps=4, width=128, height=128, batch_size=2, save_images=True)
    result = zero_engine.generate(bigger)
    assert len(result.images) == 2 and all(p for p in result.paths)  # the worker saved them
    assert zero_gpu.durations[-1] == clamp_seconds(generation_seconds(bigger))


def test_on_zero_gpu_same_pixels_as_in_process(zero_engine, engine):
    request = GenerationRequest(prompt="a green triangle", seed=3, **SMALL)
    lent = zero_engine.generate(request).images[0]
    local = engine.generate(request).images[0]
    assert lent.tobytes() == local.tobytes()


def test_on_zero_gpu_a_worker_side_error_keeps_its_field(zero_engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RequestError("prompt", "this extension refuses the prompt")

    monkeypatch.setattr(zero_engine, "_run_generation", broken)
    with pytest.raises(RequestError) as caught:
        zero_engine.generate(GenerationRequest(prompt="x", **SMALL))
    assert caught.value.field == "prompt" and "refuses" in caught.value.message


def test_quota_refusal_is_a_clear_error_and_the_next_job_runs(zero_engine, zero_gpu):
    request = GenerationRequest(prompt="a cat", seed=1, **SMALL)
    zero_gpu.refuse_next = spaces_error("ZeroGPU quota exceeded", QUOTA_TEXT)
    with pytest.raises(ZeroGPUError) as caught:
        zero_engine.generate(request)
    assert str(caught.value) == f"ZeroGPU quota exceeded: {QUOTA_TEXT}" and caught.value.quota
    assert zero_engine.current_job() is None  # the queue slot was given back
    assert len(zero_engine.generate(request).images) == 1


def test_quota_refusal_in_the_ui_says_so(zero_engine, zero_gpu):
    zero_gpu.refuse_next = spaces_error("ZeroGPU quota exceeded", QUOTA_TEXT)
    request = GenerationRequest(prompt="a cat", **SMALL)
    with pytest.raises(gr.Error) as caught:
        call_engine("Generation", lambda: zero_engine.generate(request))
    assert caught.value.message == f"ZeroGPU quota exceeded: {QUOTA_TEXT}"
    assert len(call_engine("Generation", lambda: zero_engine.generate(request)).images) == 1


def test_quota_and_duration_refusals_over_the_api(zero_engine, zero_gpu):
    client = TestClient(create_app(zero_engine, options=ApiOptions(sd_model_checkpoint=CKPT)))
    body = {"prompt": "a dog", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler"}

    zero_gpu.refuse_next = spaces_error("ZeroGPU quota exceeded", QUOTA_TEXT)
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 429
    assert answer.json()["error"] == f"ZeroGPU quota exceeded: {QUOTA_TEXT}"

    zero_gpu.refuse_next = spaces_error("ZeroGPU illegal duration",
                                        "The requested GPU duration (300s) is larger than the maximum allowed")
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 503 and answer.json()["error"].startswith("ZeroGPU illegal duration: ")

    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1


def test_an_aborted_worker_says_why():
    error = zerogpu.as_zero_gpu_error(spaces_error("ZeroGPU worker error", "GPU task aborted"))
    assert error is not None and not error.quota
    assert str(error).startswith("ZeroGPU worker error: GPU task aborted") and "GPU time" in str(error)
    assert zerogpu.as_zero_gpu_error(ValueError("not ZeroGPU's")) is None
    assert pickle.loads(pickle.dumps(error)).message == error.message


def test_builtin_upscalers_do_not_borrow_the_gpu(zero_engine, zero_gpu):
    result = zero_engine.upscale(UpscaleRequest(image=Image.new("RGB", (32, 32), "red"), upscaler="Lanczos",
                                                scale=2, save_images=False))
    assert result.images[0].size == (64, 64)
    assert zero_gpu.durations == []


def test_model_upscale_and_sd_upscale_borrow_the_gpu(zero_engine, zero_gpu):
    image = Image.new("RGB", (48, 40), "teal")
    request = UpscaleRequest(image=image, upscaler="tiny-compact-x2", scale=2, save_images=False)
    result = zero_engine.upscale(request)
    assert result.images[0].size == (96, 80) and "Postprocess upscaler: tiny-compact-x2" in result.infotexts[0]
    assert zero_gpu.durations == [clamp_seconds(zerogpu.upscale_seconds(request))]

    img2img = GenerationRequest(mode="img2img", init_image=image, prompt="teal", seed=2, denoising_strength=0.5,
                                **SMALL)
    result = zero_engine.sd_upscale(img2img, upscaler="Lanczos", scale=2, overlap=16)
    assert result.images[0].size == (96, 80) and "SD upscale overlap: 16" in result.infotexts[0]
    assert zero_gpu.durations[-1] == clamp_seconds(zerogpu.sd_upscale_seconds(img2img, 2, 16, 512))


def test_the_hosted_page_tells_visitors_about_zero_gpu(zero_engine, engine):
    from pipelines.core.hosted_limits import GPU_LIMITS
    from webui.space import notice_text

    hosted = notice_text(zero_engine, True, GPU_LIMITS, "someone/sdui")
    assert "ZeroGPU" in hosted and "quota" in hosted
    assert "ZeroGPU" not in notice_text(engine, True, GPU_LIMITS, "someone/sdui")


def test_a_job_interrupted_while_waiting_borrows_no_gpu(zero_engine, zero_gpu):
    from pipelines.core.progress import JobControl

    control = JobControl()
    control.interrupt()
    result = zero_engine.generate(GenerationRequest(prompt="x", **SMALL), control=control)
    assert result.interrupted and result.images == []
    assert zero_gpu.durations == []


def test_real_spaces_on_zero_gpu_asks_the_device_api_for_the_estimate_and_reports_refusals(models_dir):
    """The real package in ZeroGPU mode (its own process: importing it patches torch), against a
    fake device API that refuses for quota, then for duration, then lends a GPU that is not there:
    the GPU seconds it was asked for are the estimates, every failure is a ZeroGPUError, and the
    engine keeps working."""
    script = Path(__file__).with_name("zerogpu_device.py")
    done = subprocess.run([sys.executable, str(script), str(models_dir)], capture_output=True, text=True,
                          timeout=600, cwd=script.parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["active"] and report["device"] == "cuda"  # spaces' patched torch shows a GPU
    assert report["asked_seconds"] == report["expected_seconds"]
    assert report["asked_seconds"][0] < report["asked_seconds"][1]  # a bigger job asks for longer
    quota, duration, worker = report["errors"]
    assert quota["quota"] and quota["text"].startswith("ZeroGPU quota exceeded: Space app has reached its GPU limit")
    assert not duration["quota"] and duration["text"].startswith(
        f"ZeroGPU illegal duration: The requested GPU duration ({report['asked_seconds'][1]}s)")
    # the third was granted: the request pickled into spaces' worker, which had no CUDA to start on
    assert worker["text"] == ("ZeroGPU worker error: the GPU worker failed to start or to send its result back "
                              "(RuntimeError; see the Space's logs)")
    assert report["upscaled"] == [32, 32]
