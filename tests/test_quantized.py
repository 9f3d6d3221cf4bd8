"""Quantized denoiser files: GGUF kept quantized (Q8_0 .. Q4_0, K-quants), fp8 kept in fp8,
NF4 and unknown GGUF types refused with a message naming the file. Tiny SD 3 transformers
are written as users get such files (`tiny_quant`) and loaded by the code real files take."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from diffusers.quantizers.gguf.utils import GGUFLinear

from pipelines.core.progress import JobControl
from pipelines.core.request import GenerationRequest
from pipelines.generate import flow_runner
from pipelines.models.build import empty_modules
from pipelines.models.checkpoint_file import CheckpointError, TensorSource, read_header
from pipelines.models.gguf_dequant import FAST_TYPES, dequantize, fast_gguf_linear_class
from pipelines.models.gguf_files import decoded_bytes
from pipelines.models.inspection import describe_checkpoint
from pipelines.models.quantized import (
    check_runnable,
    keep_fp8,
    load_gguf_transformer,
    storage_description,
    stored_fp8_dtype,
    weights_bytes,
)
from pipelines.models.sd3_files import is_sd3_file, transformer_config, transformer_prefix

try:
    from tiny_quant import gguf_blocks, gguf_reference_weights, transformer_tensors, write_fp8, write_gguf, write_nf4
    from tiny_sd3 import make_tiny_sd3, write_tiny_sd3
except ImportError:
    from tests.tiny_quant import (
        gguf_blocks,
        gguf_reference_weights,
        transformer_tensors,
        write_fp8,
        write_gguf,
        write_nf4,
    )
    from tests.tiny_sd3 import make_tiny_sd3, write_tiny_sd3


@pytest.fixture(scope="module")
def models():
    return make_tiny_sd3(seed=3, qk_norm="rms_norm", dual_attention_layers=(0,))  # SD 3.5 medium's shape


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=generator),
                encoder_hidden_states=torch.randn(1, 12, 64, generator=generator),
                pooled_projections=torch.randn(1, 64, generator=generator), timestep=torch.tensor([500.0]))


def run(transformer, inputs, dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        cast = {k: v.to(dtype) if k != "timestep" else v for k, v in inputs.items()}
        return transformer(**cast).sample.float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    error = float(((a - b) ** 2).mean())
    return math.inf if error == 0 else 10 * math.log10(float(b.pow(2).mean()) / error)


def load_gguf(path, dtype=torch.float32):
    from diffusers import SD3Transformer2DModel

    header = read_header(path)
    config = transformer_config(header.shapes, transformer_prefix(header.shapes))
    return load_gguf_transformer(header, SD3Transformer2DModel, config, dtype)


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_gguf_header_is_read_like_a_safetensors_one_and_the_listing_describes_it(models, tmp_path):
    path = write_gguf(tmp_path / "sd3.5_medium-Q8_0.gguf", transformer_tensors(models), "Q8_0")
    header = read_header(path)
    expected = {k: tuple(v.shape) for k, v in transformer_tensors(models).items()}
    assert header.format == "gguf" and header.shapes == expected  # torch's order, not GGUF's
    assert is_sd3_file(header.shapes)
    assert {e[0] for e in header.entries.values()} == {"Q8_0", "F32"}
    details = describe_checkpoint(path)
    assert details["family_id"] == "sd3" and details["variant"] == "SD 3.5 medium"
    assert storage_description(header) == "GGUF Q8_0"


@pytest.mark.parametrize("kind, least, most", [("Q8_0", 40, math.inf), ("Q4_0", 18, 35)])
def test_gguf_weights_stay_quantized_and_compute_close_to_the_original(models, inputs, tmp_path, kind, least,
                                                                        most):
    path = write_gguf(tmp_path / f"tiny-{kind}.gguf", transformer_tensors(models), kind)
    transformer = load_gguf(path)
    linear = transformer.transformer_blocks[0].attn.to_q
    assert isinstance(linear, GGUFLinear) and linear.weight.quant_type.name == kind
    assert weight_bytes(transformer) < 0.5 * weight_bytes(models.transformer)  # blocks, not floats
    assert least < psnr(run(transformer, inputs), run(models.transformer, inputs)) < most
    header = read_header(path)
    assert weights_bytes(header, header.shapes, torch.float32) == weight_bytes(transformer)  # what memory plans use


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "BF16"])
def test_every_gguf_type_computes_with_the_weights_the_gguf_package_decodes(models, inputs, tmp_path, kind):
    from diffusers import SD3Transformer2DModel

    path = write_gguf(tmp_path / f"tiny-{kind}.gguf", transformer_tensors(models), kind)
    transformer = load_gguf(path)
    kinds = {m.weight.quant_type.name for m in transformer.modules() if isinstance(m, GGUFLinear)}
    assert kinds == {kind}  # computed from the blocks, one layer at a time
    # the same file decoded by the gguf package, loaded at full precision: the same outputs
    reference = SD3Transformer2DModel.from_single_file(
        gguf_reference_weights(path), config=save_config(transformer, tmp_path), local_files_only=True)
    ours, expected = run(transformer, inputs), run(reference, inputs)
    if kind in FAST_TYPES:  # our decoders: the gguf package's weights exactly
        assert torch.equal(ours, expected)
    else:  # diffusers' decoders (Q2_K, Q3_K) round through float16
        assert psnr(ours, expected) > 60


@pytest.mark.parametrize("kind", sorted(FAST_TYPES))
def test_our_gguf_decoders_give_the_gguf_packages_values_bit_for_bit(kind):
    """Every type decoded fast, against `gguf.quants.dequantize` (numpy, float32): the same
    float32 values, and in bf16 / fp16 those values rounded once."""
    blocks = gguf_blocks(96, 512, kind, seed=5)  # several rows of K blocks, odd-sized weights for the rest
    qtype = gguf.GGMLQuantizationType[kind]
    expected = torch.from_numpy(np.array(gguf.quants.dequantize(blocks, qtype), dtype=np.float32))
    raw = torch.from_numpy(blocks.view(np.uint8))
    assert torch.equal(dequantize(raw, qtype, torch.float32), expected)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize(raw, qtype, dtype), expected.to(dtype))
    into = torch.full_like(expected, float("nan"))
    assert dequantize(raw, qtype, torch.float32, out=into) is into and torch.equal(into, expected)


@pytest.mark.parametrize("kind, dtype, least", [("Q4_0", torch.bfloat16, 44), ("Q6_K", torch.float32, 60)])
def test_gguf_layers_decode_fast_and_the_image_matches_diffusers_own_decoding(models, inputs, tmp_path, kind,
                                                                              dtype, least):
    """Our layers (diffusers' GGUFLinear with faster decoders) against the same file run by
    diffusers' own decoder, which rounds through float16: close (measured 48 dB in bf16, 65-74
    dB in float32), not bit-identical; ours equal the gguf package's values (test above)."""
    path = write_gguf(tmp_path / f"tiny-{kind}.gguf", transformer_tensors(models), kind)
    transformer = load_gguf(path, dtype)
    layers = [m for m in transformer.modules() if isinstance(m, GGUFLinear)]
    assert layers and all(type(m) is fast_gguf_linear_class() for m in layers)
    ours = run(transformer, inputs, dtype)
    for layer in layers:
        layer.__class__ = GGUFLinear  # diffusers' own forward, as before this change
    assert least < psnr(ours, run(transformer, inputs, dtype)) < math.inf


def test_gguf_dequantize_once_keeps_decoded_weights_and_computes_the_same(models, inputs, tmp_path):
    from diffusers import SD3Transformer2DModel

    path = write_gguf(tmp_path / "tiny-Q4_K.gguf", transformer_tensors(models), "Q4_K")
    header = read_header(path)
    config = transformer_config(header.shapes, transformer_prefix(header.shapes))
    per_step = load_gguf_transformer(header, SD3Transformer2DModel, config, torch.bfloat16)
    once = load_gguf_transformer(header, SD3Transformer2DModel, config, torch.bfloat16, keep_dequantized=True)
    layers = [m for m in once.modules() if isinstance(m, GGUFLinear)]
    assert all(m.kept_weight is None for m in layers)  # nothing decoded before the first step
    first = run(once, inputs, torch.bfloat16)
    assert torch.equal(first, run(per_step, inputs, torch.bfloat16))
    kept = sum(m.kept_weight.numel() * m.kept_weight.element_size() for m in layers)
    assert kept == decoded_bytes(header, header.shapes, 2)  # what the memory plan counts for it
    assert weights_bytes(header, header.shapes, torch.bfloat16, gguf_decoded=True) == (
        weights_bytes(header, header.shapes, torch.bfloat16) + kept)
    assert torch.equal(run(once, inputs, torch.bfloat16), first)  # later steps: the kept weights
    assert all(m.kept_weight is None for m in per_step.modules() if isinstance(m, GGUFLinear))
    assert not any(key.endswith("kept_weight") for key in once.state_dict())


def save_config(transformer, tmp_path):
    folder = tmp_path / "config"
    transformer.save_config(folder)
    return str(folder)


def test_a_gguf_type_we_cannot_compute_with_is_refused_naming_the_file_and_the_type(models, tmp_path):
    path = write_gguf(tmp_path / "tiny-TQ1_0.gguf", transformer_tensors(models), "TQ1_0")
    assert describe_checkpoint(path)["family_id"] == "sd3"  # still listed for what it is
    with pytest.raises(CheckpointError, match=r"tiny-TQ1_0\.gguf: GGUF quantization type TQ1_0 .*Q4_K"):
        load_gguf(path)


def test_a_gguf_file_read_through_the_plain_tensor_source_is_dequantized(models, tmp_path):
    path = write_gguf(tmp_path / "tiny-Q8_0.gguf", transformer_tensors(models), "Q8_0")
    decoded = gguf_reference_weights(path)
    with TensorSource(read_header(path)) as source:
        weight = source.get("context_embedder.weight", torch.bfloat16)
    assert weight.dtype == torch.bfloat16 and weight.shape == (128, 64)
    assert torch.allclose(weight.float(), decoded["context_embedder.weight"].reshape(128, 64), atol=1e-2)


def load_fp8_transformer(path, compute_dtype):
    """The fp8 path of a loader: fp8 tensors read as stored, converted, kept in fp8."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    header = read_header(path)
    prefix = transformer_prefix(header.shapes)
    keys = [k for k in header.shapes if k.startswith(prefix)]
    storage = stored_fp8_dtype(header, keys)
    with TensorSource(header) as source:
        raw = {k[len(prefix):]: source.get(k) for k in keys}
    with empty_modules():
        transformer = SD3Transformer2DModel(**transformer_config(header.shapes, prefix))
    return keep_fp8(transformer, convert_sd3_transformer_checkpoint_to_diffusers(raw), compute_dtype, storage)


@pytest.mark.parametrize("fp8, compute", [(torch.float8_e4m3fn, torch.bfloat16), (torch.float8_e5m2, torch.float32)])
def test_fp8_weights_stay_fp8_in_memory_and_compute_in_the_run_dtype(models, inputs, tmp_path, fp8, compute):
    path = write_fp8(tmp_path / "tiny_fp8.safetensors", models, fp8)
    header = read_header(path)
    assert stored_fp8_dtype(header) == fp8 and storage_description(header).startswith("fp8")
    transformer = load_fp8_transformer(path, compute)
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == fp8
    assert transformer.dtype == compute  # what the runner casts its inputs to
    # the reference: the same weights rounded to fp8 (1-D ones to bf16), computed in the run dtype
    reference = make_tiny_sd3(seed=3, qk_norm="rms_norm", dual_attention_layers=(0,)).transformer
    with torch.no_grad():
        for tensor in [*reference.parameters(), *reference.buffers()]:
            tensor.copy_(tensor.to(fp8 if tensor.dim() >= 2 else torch.bfloat16).float())
    first, again = run(transformer, inputs, compute), run(transformer, inputs, compute)
    assert torch.equal(first, again)  # the layers went back to fp8 unchanged after the first step
    assert psnr(first, run(reference.to(compute), inputs, compute)) > 60  # nothing rounded beyond the file
    assert weight_bytes(transformer) < 0.6 * sum(p.numel() * 2 for p in transformer.parameters())  # bf16's half
    prefix = transformer_prefix(header.shapes)
    keys = [k for k in header.shapes if k.startswith(prefix)]
    assert weights_bytes(header, keys, torch.bfloat16) < 0.6 * weights_bytes(header, keys, torch.bfloat16,
                                                                              keep_fp8=False)


def test_nf4_files_are_refused_on_the_cpu_with_what_to_use_instead(models, tmp_path):
    path = write_nf4(tmp_path / "flux1-dev-bnb-nf4.safetensors", models)
    header = read_header(path)
    assert storage_description(header) == "NF4"
    with pytest.raises(CheckpointError, match=r"flux1-dev-bnb-nf4\.safetensors: NF4 needs bitsandbytes on CUDA; "
                                              r"use a GGUF Q4 or fp8 file on the CPU"):
        check_runnable(header, "cpu")
    check_runnable(read_header(write_fp8(tmp_path / "fp8.safetensors", models)), "cpu")  # others pass


def test_comfyui_scaled_fp8_files_are_refused_rather_than_run_unscaled(models, tmp_path):
    from safetensors.torch import load_file, save_file

    plain = write_fp8(tmp_path / "fp8.safetensors", models)
    state = load_file(plain)
    scaled = {**state, "model.diffusion_model.scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
              "model.diffusion_model.context_embedder.scale_weight": torch.tensor(0.5)}
    save_file(scaled, str(tmp_path / "sd3.5_large_fp8_scaled.safetensors"))
    with pytest.raises(CheckpointError, match=r"sd3.5_large_fp8_scaled\.safetensors: a scaled fp8 file"):
        check_runnable(read_header(tmp_path / "sd3.5_large_fp8_scaled.safetensors"), "cpu")


def test_split_sd3_with_a_gguf_denoiser_generates_close_to_the_full_precision_files(models, tmp_path):
    """A GGUF denoiser in models/Stable-diffusion, the encoders in models/text_encoder, the VAE
    apart: loaded by the SD 3 loader, the transformer kept quantized, the image close to the one
    from the same model's full-precision files. (Needs sd3_build.load_transformer to call
    quantized.load_gguf_transformer for GGUF files.)"""
    from pipelines.models.sd3_build import load_sd3_components, load_sd3_vae

    files = write_tiny_sd3(tmp_path, models)
    gguf_file = write_gguf(files.all_in_one.parent / "tiny-Q8_0.gguf", transformer_tensors(models), "Q8_0")
    with TensorSource(read_header(files.transformer_only)) as source:
        vae = load_sd3_vae(source, torch.float32)
    quantized = load_sd3_components(gguf_file, text_encoder_dir=files.text_encoder_dir, vae=vae)
    assert any(isinstance(m, GGUFLinear) for m in quantized.unet.modules()), "GGUF weights dequantized"
    full = load_sd3_components(files.transformer_only, text_encoder_dir=files.text_encoder_dir)
    image, expected = generate(quantized), generate(full)
    assert 30 < 10 * math.log10(255.0 ** 2 / float(np.mean((image - expected) ** 2))) < math.inf


def generate(components) -> np.ndarray:
    request = GenerationRequest(prompt="a photo of a red cat", negative_prompt="blue sky", seed=1234, subseed=0,
                                steps=3, cfg_scale=4.5, sampler="Euler", width=64, height=64)
    (output,) = flow_runner.run(components, torch.device("cpu"), request, control=JobControl())
    return np.asarray(output.images[0], dtype=np.float64)



def test_gguf_denoisers_in_comfyui_folders_are_listed_as_checkpoints_with_their_family(models, tmp_path):
    """models/Stable-diffusion first, then --unet-dir folders and ComfyUI's models/unet and
    models/diffusion_models; .gguf files among them, described from their header with how they
    are stored. The registry is built as the Engine builds it, from the command line's Paths."""
    from pipelines.core.settings import MODEL_KINDS
    from pipelines.models.registry import ModelRegistry
    from pipelines.models.stores import HashCache
    from webui.cli import parse_args, paths_from_args

    root, elsewhere = tmp_path / "models", tmp_path / "comfy-unet"
    for folder in (root / "unet", root / "diffusion_models", elsewhere):
        folder.mkdir(parents=True)
    write_gguf(root / "unet" / "sd3.5_medium-Q4_0.gguf", transformer_tensors(models), "Q4_0")
    write_fp8(root / "diffusion_models" / "sd3.5_medium_fp8.safetensors", models)
    write_gguf(elsewhere / "sd3.5_medium-Q8_0.gguf", transformer_tensors(models), "Q8_0")
    paths = paths_from_args(parse_args(["--models-dir", str(root), "--unet-dir", str(elsewhere)]))
    assert paths.extra_folders("vae") == ()
    registry = ModelRegistry({kind: paths.folder(kind) for kind in MODEL_KINDS}, HashCache(tmp_path / "hashes.json"),
                             describers={"checkpoints": describe_checkpoint},
                             extra_folders={kind: paths.extra_folders(kind) for kind in MODEL_KINDS})
    listed = {f.name: f for f in registry.list("checkpoints")}
    assert set(listed) == {"sd3.5_medium-Q4_0.gguf", "sd3.5_medium_fp8.safetensors", "sd3.5_medium-Q8_0.gguf"}
    assert listed["sd3.5_medium-Q4_0.gguf"].details["family_id"] == "sd3"
    assert [listed[name].details["storage"] for name in sorted(listed)] == ["GGUF Q4_0", "GGUF Q8_0", "fp8 (e4m3fn)"]
    assert registry.find("checkpoints", "sd3.5_medium-Q4_0").path == root / "unet" / "sd3.5_medium-Q4_0.gguf"


def test_a_flux_gguf_denoiser_loads_through_the_same_code_with_the_flux_converter(tmp_path):
    from diffusers import FluxTransformer2DModel

    from pipelines.models.flux_build import to_diffusers
    from pipelines.models.flux_files import transformer_config as flux_config

    try:
        from tiny_flux import flux_state_dicts, make_tiny_flux
    except ImportError:
        from tests.tiny_flux import flux_state_dicts, make_tiny_flux

    models = make_tiny_flux(seed=1)
    path = write_gguf(tmp_path / "flux1-schnell-Q8_0.gguf", flux_state_dicts(models)["transformer"], "Q8_0",
                      arch="flux")
    header = read_header(path)
    config = flux_config(header.shapes, "")
    transformer = load_gguf_transformer(header, FluxTransformer2DModel, config, torch.float32,
                                        convert=lambda raw: to_diffusers(raw, config))
    assert isinstance(transformer.single_transformer_blocks[0].attn.to_q, GGUFLinear)
    generator = torch.Generator().manual_seed(0)
    flux_inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=generator),
                       encoder_hidden_states=torch.randn(1, 8, config["joint_attention_dim"], generator=generator),
                       pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=generator),
                       timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                       guidance=torch.tensor([3.5]) if config.get("guidance_embeds") else None)
    with torch.no_grad():
        quantized, full = (m(**flux_inputs).sample for m in (transformer, models.transformer))
    assert psnr(quantized, full) > 40


def test_a_truncated_gguf_file_is_refused_naming_it(models, tmp_path):
    path = write_gguf(tmp_path / "whole.gguf", transformer_tensors(models), "Q8_0")
    cut = tmp_path / "half-downloaded.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"half-downloaded\.gguf: unreadable GGUF header"):
        read_header(cut)


@pytest.fixture(scope="module")
def flux_engine(tmp_path_factory):
    """models/ as a Forge user has it, the denoiser as a GGUF Q8_0 file, an all-in-one file and a
    Forge NF4 file beside it, ae.safetensors in VAE/, clip_l, t5xxl and T5's tokenizer in text_encoder/."""
    import shutil

    from conftest import make_engine
    from tiny_flux import flux_state_dicts, make_tiny_flux, write_tiny_flux

    root = tmp_path_factory.mktemp("quant-models")
    tiny = make_tiny_flux(seed=7, guidance=False)
    files = write_tiny_flux(tmp_path_factory.mktemp("quant-files"), tiny)
    for folder in ("Stable-diffusion", "VAE"):
        (root / folder).mkdir()
    shutil.copy(files.all_in_one, root / "Stable-diffusion" / "flux_aio.safetensors")
    shutil.copy(files.bare, root / "Stable-diffusion" / "flux1-schnell.safetensors")
    write_gguf(root / "Stable-diffusion" / "flux1-schnell-Q8_0.gguf", flux_state_dicts(tiny)["transformer"], "Q8_0",
               arch="flux")
    write_nf4(root / "Stable-diffusion" / "flux1-dev-bnb-nf4.safetensors")
    shutil.copy(files.vae, root / "VAE" / "ae.safetensors")
    shutil.copytree(files.text_encoder_dir, root / "text_encoder")
    return make_engine(root, tmp_path_factory.mktemp("quant-engine"))


def flux_image(engine, checkpoint: str) -> np.ndarray:
    request = GenerationRequest(prompt="a red circle", seed=3, steps=2, sampler="Euler", cfg_scale=1.0, width=64,
                                height=64, save_images=False, checkpoint=checkpoint)
    return np.asarray(engine.generate(request).images[0], dtype=np.float64)


def test_a_gguf_flux_file_runs_quantized_through_the_engine_close_to_the_full_precision_one(flux_engine):
    assert flux_engine.find_checkpoint("flux1-schnell-Q8_0.gguf").details["storage"] == "GGUF Q8_0"
    quantized = flux_image(flux_engine, "flux1-schnell-Q8_0.gguf")
    unet = flux_engine.manager.loaded("flux1-schnell-Q8_0.gguf").components.unet
    assert any(isinstance(m, GGUFLinear) for m in unet.modules()), "GGUF weights dequantized"
    full = flux_image(flux_engine, "flux1-schnell.safetensors")
    assert 30 < 10 * math.log10(255.0 ** 2 / float(np.mean((quantized - full) ** 2))) < math.inf


def test_an_nf4_file_is_refused_before_eviction_and_the_loaded_model_keeps_working(flux_engine):
    flux_engine.manager.unload_all()
    before = flux_image(flux_engine, "flux_aio.safetensors")
    with pytest.raises(CheckpointError, match=r"flux1-dev-bnb-nf4\.safetensors: NF4 needs bitsandbytes on CUDA"):
        flux_image(flux_engine, "flux1-dev-bnb-nf4.safetensors")
    assert flux_engine.manager.loaded_names() == ["flux_aio.safetensors"]
    assert np.array_equal(flux_image(flux_engine, "flux_aio.safetensors"), before)


def test_the_memory_check_counts_a_gguf_denoiser_as_stored_and_offers_it_for_a_file_too_big(
        flux_engine, monkeypatch):
    """Room for the encoders, the VAE and a bit more than the Q8_0 transformer: the GGUF file loads,
    the full-precision one is refused with the GGUF (or fp8) file that would fit."""
    manager, models = flux_engine.manager, flux_engine.paths.folder("checkpoints")
    manager.unload_all()
    gguf_file, bare = models / "flux1-schnell-Q8_0.gguf", models / "flux1-schnell.safetensors"
    parts = [models.parent / "VAE" / "ae.safetensors", *(models.parent / "text_encoder").glob("*.safetensors")]
    room = sum(p.stat().st_size for p in parts) + (gguf_file.stat().st_size + bare.stat().st_size) // 2
    assert gguf_file.stat().st_size < bare.stat().st_size // 2
    monkeypatch.setattr(type(manager), "room_bytes", lambda self: room)
    assert flux_image(flux_engine, "flux1-schnell-Q8_0.gguf").std() > 1
    with pytest.raises(CheckpointError, match=r"flux1-schnell.safetensors needs about .* of memory .* "
                                              r"a (GGUF Q8_0|fp8 \(e4m3fn\)) file of it \(about .*\) would fit"):
        flux_image(flux_engine, "flux1-schnell.safetensors")
    assert manager.loaded_names() == ["flux1-schnell-Q8_0.gguf"]


def test_an_sd3_gguf_denoiser_pairs_with_the_sd3_vae_in_models_vae_and_generates_through_the_engine(
        models, tmp_path):
    """GGUF files hold the transformer alone: with the encoders in models/text_encoder and the one
    VAE file named for SD 3 in models/VAE, it loads and gives the all-in-one file's image (nearly)."""
    import shutil

    from conftest import make_engine
    from safetensors.torch import save_file
    from tiny_sd3 import sd3_state_dicts

    files = write_tiny_sd3(tmp_path / "files", models)
    root = tmp_path / "models"
    for folder in ("Stable-diffusion", "VAE"):
        (root / folder).mkdir(parents=True)
    shutil.copy(files.all_in_one, root / "Stable-diffusion" / "sd35_aio.safetensors")
    write_gguf(root / "Stable-diffusion" / "sd3.5_medium-Q8_0.gguf", transformer_tensors(models), "Q8_0")
    shutil.copytree(files.text_encoder_dir, root / "text_encoder")
    engine = make_engine(root, tmp_path / "engine")
    with pytest.raises(CheckpointError, match=r"sd3.5_medium-Q8_0.gguf: an SD 3 transformer without its VAE; "
                                              r"put SD 3's VAE .* in models/VAE"):
        engine.load_checkpoint("sd3.5_medium-Q8_0.gguf")
    save_file(sd3_state_dicts(models)["vae"], str(root / "VAE" / "sd3_vae.safetensors"))
    images = {}
    for name in ("sd3.5_medium-Q8_0.gguf", "sd35_aio.safetensors"):
        request = GenerationRequest(prompt="a photo of a red cat", seed=5, steps=3, sampler="Euler", cfg_scale=4.5,
                                    width=64, height=64, save_images=False, checkpoint=name)
        images[name] = np.asarray(engine.generate(request).images[0], dtype=np.float64)
    quantized, full = images.values()
    assert 30 < 10 * math.log10(255.0 ** 2 / float(np.mean((quantized - full) ** 2))) < math.inf
