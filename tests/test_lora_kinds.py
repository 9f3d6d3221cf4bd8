"""LoRA beyond SD 1.x: kohya files for SDXL (two text encoders, original U-Net paths) and SD 2.x
(OpenCLIP), LyCORIS LoHa/LoKr files, and layouts this app cannot read. Every request must leave
the cached model exactly as it found it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_engine
from lora_files import assert_same_state, kohya_targets, loha_file, lokr_file, lora_file, state_without_lora
from safetensors.torch import save_file
from tiny import make_tiny, write_tiny_checkpoint

from pipelines.core.infotext import parse_infotext
from pipelines.core.request import GenerationRequest
from pipelines.generate import lora, lycoris
from pipelines.models.build import load_components

CHECKPOINTS = {"sd2": "tiny-sd2.safetensors", "sdxl": "tiny-sdxl.safetensors"}


@pytest.fixture(scope="module")
def kinds_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-kinds")
    lora_dir = root / "Lora"
    lora_dir.mkdir()
    for family, name in CHECKPOINTS.items():
        ckpt = write_tiny_checkpoint(root / "Stable-diffusion" / name, family=family, seed=3)
        components = load_components(Path(ckpt))
        everything = kohya_targets(components, convs=True)
        save_file(lora_file(everything), str(lora_dir / f"{family}_lora.safetensors"))
        save_file(loha_file(everything, seed=1), str(lora_dir / f"{family}_loha.safetensors"))
        save_file(lokr_file(everything, seed=2), str(lora_dir / f"{family}_lokr.safetensors"))
        save_file(lokr_file(everything, seed=4, decompose=False, scale=0.3),
                  str(lora_dir / f"{family}_lokr_full.safetensors"))
        if family == "sdxl":  # only the second (OpenCLIP bigG) text encoder
            te2 = [(k, m) for k, m in kohya_targets(components, unet=False) if k.startswith("lora_te2_")]
            save_file(lora_file(te2, seed=5), str(lora_dir / "sdxl_te2_only.safetensors"))
            save_file(loha_file(te2, seed=6), str(lora_dir / "sdxl_te2_loha.safetensors"))
    return make_engine(root, tmp_path_factory.mktemp("lora-kinds-engine"))


def generate(engine, family: str, prompt: str):
    return engine.generate(GenerationRequest(
        prompt=prompt, negative_prompt="", steps=2, width=64, height=64, seed=5, sampler="Euler",
        save_images=False, checkpoint=CHECKPOINTS[family]))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0])


def cached_components(engine, family: str):
    file = engine.resolve_checkpoint(CHECKPOINTS[family])
    return engine.manager.get(file.name, file.path).components


def test_sdxl_lora_uses_kohya_names_for_both_encoders_and_the_original_unet(kinds_engine):
    path = Path(kinds_engine.paths.folder("lora")) / "sdxl_lora.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    # what kohya's sd-scripts writes for SDXL (tiny model: one layer per level, so level 1's
    # first attention is input_blocks.3.1 where the real model has input_blocks.4.1)
    for key in ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
                "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k",
                "lora_unet_output_blocks_0_1_proj_in",
                "lora_unet_input_blocks_1_0_in_layers_2",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_2_mlp_fc2"):
        assert key + ".lora_down.weight" in keys, key


@pytest.fixture(scope="module")
def plain(kinds_engine):
    """The image without LoRA, per family (generated once)."""
    images = {}

    def get(family: str) -> np.ndarray:
        if family not in images:
            images[family] = pixels(generate(kinds_engine, family, "a red circle"))
        return images[family]
    return get


def applies(engine, plain, family: str, name: str, weights: str = "1"):
    """Generate with one LoRA; it must change the image and leave no warning."""
    result = generate(engine, family, f"a red circle <lora:{name}:{weights}>")
    assert result.warnings == []
    assert not np.array_equal(plain(family), pixels(result))
    return result


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_kohya_lora_applies_per_encoder_and_unet_and_leaves_the_model_untouched(kinds_engine, plain, family):
    plain(family)
    before = state_without_lora(cached_components(kinds_engine, family))
    name = f"{family}_lora"
    full = applies(kinds_engine, plain, family, name)
    te_only = applies(kinds_engine, plain, family, name, "1:0")
    unet_only = applies(kinds_engine, plain, family, name, "0:1")
    assert not np.array_equal(pixels(te_only), pixels(unet_only))
    zero = generate(kinds_engine, family, f"a red circle <lora:{name}:0>")
    assert np.array_equal(plain(family), pixels(zero))
    assert_same_state(before, state_without_lora(cached_components(kinds_engine, family)))
    path = Path(kinds_engine.paths.folder("lora")) / f"{name}.safetensors"
    assert parse_infotext(full.infotexts[0])["Lora hashes"] == f"{name}: {lora.short_hash(path)}"


@pytest.mark.parametrize("family,kind", [("sdxl", "loha"), ("sdxl", "lokr"), ("sd2", "loha"), ("sd2", "lokr_full")])
def test_lycoris_files_apply_and_leave_the_model_untouched(kinds_engine, plain, family, kind):
    plain(family)
    before = state_without_lora(cached_components(kinds_engine, family))
    name = f"{family}_{kind}"
    full = applies(kinds_engine, plain, family, name)
    zero = generate(kinds_engine, family, f"a red circle <lora:{name}:0>")
    assert np.array_equal(plain(family), pixels(zero))
    assert_same_state(before, state_without_lora(cached_components(kinds_engine, family)))
    path = Path(kinds_engine.paths.folder("lora")) / f"{name}.safetensors"
    assert parse_infotext(full.infotexts[0])["Lora hashes"] == f"{name}: {lora.short_hash(path)}"


@pytest.mark.parametrize("name", ["sdxl_te2_only", "sdxl_te2_loha"])
def test_sdxl_second_text_encoder_layers_apply(kinds_engine, plain, name):
    applies(kinds_engine, plain, "sdxl", name)


def test_lora_and_lycoris_on_the_same_layers_together(kinds_engine):
    before = state_without_lora(cached_components(kinds_engine, "sdxl"))
    lora_only = generate(kinds_engine, "sdxl", "a red circle <lora:sdxl_lora:0.7>")
    # LyCORIS first in the prompt, resnet convs included: loading order must not matter
    both = generate(kinds_engine, "sdxl", "a red circle <lora:sdxl_loha:0.5> <lora:sdxl_lora:0.7> <lora:sdxl_lokr:0.5>")
    assert both.warnings == []
    assert not np.array_equal(pixels(lora_only), pixels(both))
    names = [part.split(":")[0] for part in parse_infotext(both.infotexts[0])["Lora hashes"].split(", ")]
    assert names == ["sdxl_loha", "sdxl_lora", "sdxl_lokr"]
    assert_same_state(before, state_without_lora(cached_components(kinds_engine, "sdxl")))


def test_other_family_lora_warns_about_what_does_not_match(kinds_engine):
    # an SD 2.x file on SDXL: layers whose names or shapes fit nothing are reported, not applied
    before = state_without_lora(cached_components(kinds_engine, "sdxl"))
    result = generate(kinds_engine, "sdxl", "a red circle <lora:sd2_loha:1>")
    assert len(result.images) == 1
    assert any("sd2_loha" in w and "match" in w for w in result.warnings)
    assert_same_state(before, state_without_lora(cached_components(kinds_engine, "sdxl")))


def test_unsupported_layout_warns_naming_the_file(kinds_engine, plain):
    folder = Path(kinds_engine.paths.folder("lora"))
    components = cached_components(kinds_engine, "sd2")
    targets = kohya_targets(components)
    tensors = lora_file(targets[:len(targets) // 2])
    for key, m in targets[len(targets) // 2:]:  # OFT-style blocks: no reader here
        tensors[key + ".oft_blocks"] = torch.zeros(4, m.weight.shape[0] // 4, m.weight.shape[0] // 4)
        tensors[key + ".alpha"] = torch.tensor(1.0)
    save_file(tensors, str(folder / "half_oft.safetensors"))
    save_file({key + ".oft_blocks": torch.zeros(1, 2, 2) for key, _ in targets[:3]},
              str(folder / "all_oft.safetensors"))
    kinds_engine.registry.list("lora", True)

    half = generate(kinds_engine, "sd2", "a red circle <lora:half_oft:1>")
    assert any("half_oft.safetensors" in w and "format" in w for w in half.warnings)
    assert not np.array_equal(plain("sd2"), pixels(half))  # its plain LoRA layers still apply
    none = generate(kinds_engine, "sd2", "a red circle <lora:all_oft:1>")
    assert len(none.warnings) == 1 and "all_oft.safetensors" in none.warnings[0]
    assert np.array_equal(plain("sd2"), pixels(none))
    assert "all_oft: " in parse_infotext(none.infotexts[0])["Lora hashes"]


# --- the arithmetic, against LyCORIS' formulas --------------------------------------------------

def _tiny_sd1():
    unet, _, encoders = make_tiny("sd1", seed=0)
    return SimpleNamespace(unet=unet, text_encoders=encoders,
                           spec=SimpleNamespace(family=SimpleNamespace(
                               name="sd1", text_encoders=[SimpleNamespace(pooled=False)])))


LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def _delta(kind: str, f: dict) -> torch.Tensor:
    """LyCORIS' weight delta of one layer's factors (as its LoHa/LoKr modules and A1111 compute it)."""
    if kind == "loha":
        rank = f["hada_w1_b"].shape[0]
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * f["alpha"] / rank
    w2 = f["lokr_w2_a"] @ f["lokr_w2_b"] if "lokr_w2_a" in f else f["lokr_w2"]
    scale = f["alpha"] / f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else 1.0  # whole factors: no alpha
    if w2.ndim == 4:
        return torch.kron(f["lokr_w1"][:, :, None, None], w2) * scale
    return torch.kron(f["lokr_w1"], w2) * scale


@pytest.mark.parametrize("maker,kind", [(loha_file, "loha"), (lokr_file, "lokr"),
                                        (lambda t, **kw: lokr_file(t, decompose=False, **kw), "lokr")])
def test_lycoris_layers_add_exactly_the_lycoris_delta(maker, kind):
    components = _tiny_sd1()
    unet = components.unet
    modules = {LINEAR: unet.get_submodule(LINEAR), CONV: unet.get_submodule(CONV)}
    targets = [("lora_unet_" + path.replace(".", "_"), m) for path, m in modules.items()]
    state = maker(targets, seed=7, alpha=3.0)
    _, layers, unknown = lycoris.split(state)
    assert unknown == [] and {layer.kind for layer in layers} == {kind}
    index = lycoris.module_index(unet, [("text_encoder", components.text_encoders[0])])
    x = torch.randn(2, 5, modules[LINEAR].in_features)
    img = torch.randn(1, modules[CONV].in_channels, 8, 8)
    with torch.no_grad():
        base_linear, base_conv = modules[LINEAR](x), modules[CONV](img)
        names, unmatched = lycoris.inject(layers, index, "t")
        assert names == [f"t_{kind}"] and unmatched == []
        lora._set_weights(components, [(names, lora.LoraUse("t", Path("t"), te=1.0, unet=0.5))])
        got_linear, got_conv = unet.get_submodule(LINEAR)(x), unet.get_submodule(CONV)(img)
    for path, got, want in ((LINEAR, got_linear, lambda d: base_linear + 0.5 * F.linear(x, d)),
                            (CONV, got_conv, lambda d: base_conv + 0.5 * F.conv2d(img, d, padding=1))):
        key = "lora_unet_" + path.replace(".", "_")
        f = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(key + ".")}
        delta = _delta(kind, {**f, "alpha": float(f["alpha"])}).reshape(modules[path].weight.shape)
        torch.testing.assert_close(got, want(delta), rtol=1e-4, atol=1e-4)
    lora.remove_all(components)
    assert unet.get_submodule(LINEAR) is modules[LINEAR] and unet.get_submodule(CONV) is modules[CONV]


def _tucker(t, w_a, w_b):
    """LyCORIS' Tucker rebuild of a conv factor: core (rank, rank, kh, kw), w_a (rank, out), w_b (rank, in)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, w_a, w_b).contiguous()


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_tucker_conv_layers_add_the_lycoris_delta(kind):
    components = _tiny_sd1()
    conv = components.unet.get_submodule(CONV)
    out, inp, rank, alpha = conv.out_channels, conv.in_channels, 3, 1.5
    g = torch.Generator().manual_seed(9)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    key = "lora_unet_" + CONV.replace(".", "_")
    if kind == "loha":
        f = {"hada_t1": rnd(rank, rank, 3, 3), "hada_w1_a": rnd(rank, out), "hada_w1_b": rnd(rank, inp),
             "hada_t2": rnd(rank, rank, 3, 3), "hada_w2_a": rnd(rank, out), "hada_w2_b": rnd(rank, inp)}
        delta = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) \
            * _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"]) * alpha / rank
    else:
        f = {"lokr_w1": rnd(4, 4), "lokr_t2": rnd(rank, rank, 3, 3), "lokr_w2_a": rnd(rank, out // 4),
             "lokr_w2_b": rnd(rank, inp // 4)}
        delta = torch.kron(f["lokr_w1"][:, :, None, None], _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"]))
        delta = delta * alpha / rank
    _, layers, unknown = lycoris.split({**{f"{key}.{k}": v for k, v in f.items()}, key + ".alpha": torch.tensor(alpha)})
    assert unknown == [] and [layer.kind for layer in layers] == [kind]
    index = lycoris.module_index(components.unet, [("text_encoder", components.text_encoders[0])])
    img = torch.randn(1, inp, 8, 8)
    with torch.no_grad():
        want = conv(img) + F.conv2d(img, delta, padding=1)
        names, unmatched = lycoris.inject(layers, index, "t")
        assert unmatched == []
        lora._set_weights(components, [(names, lora.LoraUse("t", Path("t"), te=1.0, unet=1.0))])
        got = components.unet.get_submodule(CONV)(img)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    lora.remove_all(components)
    assert components.unet.get_submodule(CONV) is conv


def test_pt_lycoris_file_applies_and_an_unreadable_file_is_reported(tmp_path):
    components = _tiny_sd1()
    targets = [("lora_unet_" + LINEAR.replace(".", "_"), components.unet.get_submodule(LINEAR))]
    torch.save(loha_file(targets), tmp_path / "h.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    warnings: list[str] = []
    uses = [lora.LoraUse("bad", tmp_path / "bad.safetensors", 1, 1), lora.LoraUse("h", tmp_path / "h.pt", 1, 1)]
    original = components.unet.get_submodule(LINEAR).weight
    with lora.applied(components, uses, warnings) as loaded:
        assert [use.name for use in loaded] == ["h"]
        assert not torch.equal(components.unet.get_submodule(LINEAR).weight, original)  # merged in
    assert len(warnings) == 1 and "bad.safetensors" in warnings[0] and "could not be read" in warnings[0]
    assert not lora._has_any_tuner(components.unet)
