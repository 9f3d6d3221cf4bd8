"""DoRA LoRA files (kohya/LyCORIS layout: lora_down, lora_up, alpha and ``dora_scale`` per layer) on
SD 1.x and SDXL: the layers must compute DoRA's weight, and the model must come back untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lora_files import assert_same_state, kohya_targets, lora_file, model_state, state_without_lora
from safetensors.torch import save_file
from tiny import write_tiny_checkpoint

from pipelines.generate import lora, lora_merge
from pipelines.models.build import load_components

RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def components(request, tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("dora") / "tiny.safetensors", family=request.param, seed=3)
    return load_components(Path(ckpt))


@pytest.fixture(autouse=True)
def unmerged(components):
    """Each test starts from the weights as loaded: a job's set stays merged until the next job, and
    these tests read the modules directly."""
    lora_merge.restore(components)


def dora_file(targets, per_input: bool = False) -> dict[str, torch.Tensor]:
    """A kohya LoRA with alpha != rank and a LyCORIS ``dora_scale`` per layer: (out, 1), as LyCORIS
    writes it with wd_on_out=True, or with `per_input` (1, in), as with wd_on_out=False."""
    state = lora_file(targets, rank=RANK, seed=8, scale=0.3)
    g = torch.Generator().manual_seed(9)
    for key, m in targets:
        state[key + ".alpha"] = torch.tensor(ALPHA)
        if per_input:
            norm = m.weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *(1 for _ in m.weight.shape[2:]))
        else:
            norm = m.weight.flatten(1).norm(dim=1).reshape(-1, *(1 for _ in m.weight.shape[1:]))
        state[key + ".dora_scale"] = norm * (0.5 + torch.rand(norm.shape, generator=g))
    return state


def dora_weight(weight, state, key, multiplier: float = 1.0):
    """DoRA: m * (W + s*B@A) / ||W + s*B@A||, s = alpha/rank (times the multiplier: peft scales
    the low-rank part only, the magnitude stays); the norm per output channel where m is
    (out, 1[, 1, 1]), per input channel where m is (1, in[, 1, 1])."""
    s = float(state[key + ".alpha"]) / RANK * multiplier
    up, down = state[key + ".lora_up.weight"], state[key + ".lora_down.weight"]
    merged = weight + s * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    m = state[key + ".dora_scale"]
    if m.shape[0] == weight.shape[0]:
        norm = merged.flatten(1).norm(dim=1).reshape(m.shape)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(m.shape)
    return m * merged / norm


def forward(m, weight, x):
    """What module `m` computes with `weight` instead of its own."""
    if isinstance(m, torch.nn.Conv2d):
        return F.conv2d(x, weight, m.bias, padding=m.padding)
    return F.linear(x, weight, m.bias)


def sample(m):
    """An input for `m`, the same whatever ran before (the global RNG is not used)."""
    g = torch.Generator().manual_seed(5)
    shape = (1, m.in_channels, 8, 8) if isinstance(m, torch.nn.Conv2d) else (2, 3, m.in_features)
    return torch.randn(shape, generator=g)


def picked(components, targets):
    """U-Net attention, feed-forward and resnet conv layers, and two layers of each text encoder."""
    chosen = [next(t for t in targets if t[0].startswith("lora_unet_") and t[0].endswith("attn2_to_k")),
              next(t for t in targets if t[0].startswith("lora_unet_") and "_ff_net_2" in t[0]),
              next(t for t in targets if isinstance(t[1], torch.nn.Conv2d))]
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        chosen += [t for t in targets if t[0].startswith(prefix) and "layers_1_self_attn_q_proj" in t[0]]
        chosen += [t for t in targets if t[0].startswith(prefix) and "layers_0_mlp_fc1" in t[0]]
    return chosen


def outputs(layers, inputs):
    with torch.no_grad():
        return [m(x) for (_, m), x in zip(layers, inputs)]


@pytest.mark.parametrize("per_input", [False, True])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_dora_layers_compute_the_dora_weight_and_are_removed(components, tmp_path, multiplier, per_input):
    targets = kohya_targets(components, convs=True)
    state = dora_file(targets, per_input)
    path = tmp_path / "dora.safetensors"
    save_file(state, str(path))
    layers = picked(components, targets)
    assert len(layers) == (7 if components.spec.family.name == "sdxl" else 5)
    # the modules as the tests see them: peft wraps them, so look them up by path while applied
    paths = [(root, name) for key, m in layers for root in (components.unet, *components.text_encoders)
             for name, sub in root.named_modules() if sub is m]
    inputs = [sample(m) for _, m in layers]
    want = [forward(m, dora_weight(m.weight, state, key, multiplier), x) for (key, m), x in zip(layers, inputs)]
    before = model_state(components)
    warnings: list[str] = []
    use = lora.LoraUse("dora", path, te=multiplier, unet=multiplier)
    with lora.applied(components, [use], warnings) as loaded:
        assert [u.name for u in loaded] == ["dora"] and warnings == []
        with torch.no_grad():
            got = [root.get_submodule(name)(x) for (root, name), x in zip(paths, inputs)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # peft merges DoRA per output channel; the per-input kind is a pre-hook: peft layers for the job only
    assert (lora_merge.merged_bytes(components) == 0) == per_input
    assert_same_state(before, state_without_lora(components))


def test_file_with_both_magnitude_kinds_and_plain_layers(components, tmp_path):
    targets = kohya_targets(components, convs=True)
    layers = picked(components, targets)
    out_layers, in_layers, plain_layers = layers[0::3], layers[1::3], layers[2::3]
    state = {**lora_file(targets, seed=2), **dora_file(out_layers), **dora_file(in_layers, per_input=True)}
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    inputs = [sample(m) for _, m in layers]
    paths = [(root, name) for key, m in layers for root in (components.unet, *components.text_encoders)
             for name, sub in root.named_modules() if sub is m]
    want = []
    for (key, m), x in zip(layers, inputs):
        if (key, m) in plain_layers:
            delta = (state[key + ".lora_up.weight"].flatten(1) @ state[key + ".lora_down.weight"].flatten(1))
            want.append(forward(m, m.weight + delta.reshape(m.weight.shape) * float(state[key + ".alpha"]) / RANK, x))
        else:
            want.append(forward(m, dora_weight(m.weight, state, key), x))
    before = model_state(components)
    warnings: list[str] = []
    with lora.applied(components, [lora.LoraUse("mixed", path, 1, 1)], warnings) as loaded:
        assert [u.name for u in loaded] == ["mixed"] and warnings == []
        with torch.no_grad():
            got = [root.get_submodule(name)(x) for (root, name), x in zip(paths, inputs)]
    for (key, _), g, w in zip(layers, got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=key)
    assert_same_state(before, state_without_lora(components))


def test_dora_at_weight_zero_leaves_that_part_unchanged(components, tmp_path):
    # peft keeps a DoRA layer's magnitude at any multiplier; at 0 the adapter must not be active
    targets = kohya_targets(components, convs=True)
    path = tmp_path / "dora.safetensors"
    state = dora_file(targets)
    save_file(state, str(path))
    layers = picked(components, targets)
    inputs = [sample(m) for _, m in layers]
    base = outputs(layers, inputs)
    paths = [(root, name) for key, m in layers for root in (components.unet, *components.text_encoders)
             for name, sub in root.named_modules() if sub is m]
    want = [forward(m, dora_weight(m.weight, state, key), x) for (key, m), x in zip(layers, inputs)]
    with lora.applied(components, [lora.LoraUse("dora", path, te=0.0, unet=1.0)]):
        with torch.no_grad():
            got = [root.get_submodule(name)(x) for (root, name), x in zip(paths, inputs)]
    for (key, m), b, g, w in zip(layers, base, got, want):
        if key.startswith("lora_te"):
            assert torch.equal(g, b), key
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_dora_magnitude_of_no_shape_of_the_layer_is_reported(components, tmp_path):
    targets = kohya_targets(components)
    state = dora_file(targets[:4])
    state[targets[0][0] + ".dora_scale"] = torch.ones(3)
    path = tmp_path / "bad_dora.safetensors"
    save_file(state, str(path))
    before = model_state(components)
    warnings: list[str] = []
    with lora.applied(components, [lora.LoraUse("bad_dora", path, 1, 1)], warnings) as loaded:
        assert [u.name for u in loaded] == ["bad_dora"]  # its other layers apply
    assert len(warnings) == 1 and "bad_dora" in warnings[0] and targets[0][0] in warnings[0]
    assert_same_state(before, state_without_lora(components))
