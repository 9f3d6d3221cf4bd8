"""Every request field's (minimum, maximum): one table, so the UI's sliders and the checks agree.

Torch-free: the UI reads it.
"""

from __future__ import annotations

from pipelines.core.checks import check_range_of, within

# field -> (minimum, maximum); the UI builds its sliders from this table.
LIMITS: dict[str, tuple[float, float]] = {
    "steps": (1, 150),
    "cfg_scale": (1.0, 30.0),
    "shift": (0.1, 20.0),  # flow models' timestep shift (SD 3: 3; Flux dev: from the image size)
    "distilled_cfg_scale": (0.0, 30.0),  # Flux dev's guidance input (Forge's slider)
    "width": (64, 2048),
    "height": (64, 2048),
    "batch_size": (1, 8),
    "batch_count": (1, 100),
    "denoising_strength": (0.0, 1.0),
    "subseed_strength": (0.0, 1.0),
    "seed_resize_from_w": (0, 2048),  # 0: off
    "seed_resize_from_h": (0, 2048),
    "mask_blur": (0, 64),
    "inpaint_full_res_padding": (0, 256),
    "clip_skip": (1, 12),
    "s_min_uncond": (0.0, 15.0),  # NGMS: a sigma (SD's largest is about 14.6); 0: off
    "skip_early_cond": (0.0, 1.0),  # Skip Early CFG: a share of the steps; 0: off
    "deepcache_interval": (1, 10),  # DeepCache: the whole U-Net runs every Nth step; 1: off
    "deepcache_branch": (0, 2),  # DeepCache: layers kept live besides the outermost (0: fastest)
    "deepcache_start": (0.0, 1.0),  # DeepCache: share of the first steps that always run in full
    # ToMe: share of full-resolution tokens merged; A1111's range (past 0.75 every token but one per 2x2 cell
    # is merged, so 0.75-0.9 act alike, as in A1111)
    "token_merging_ratio": (0.0, 0.9),
    "outpaint_left": (0, 1024),  # pixels the canvas grows by on that side (img2img / inpaint)
    "outpaint_right": (0, 1024),
    "outpaint_up": (0, 1024),
    "outpaint_down": (0, 1024),
    # hires fix
    "hr_scale": (1.0, 4.0),
    "hr_second_pass_steps": (0, 150),  # 0: as many as the first pass
    "hr_resize_x": (0, 4096),  # 0: from hr_scale (or from the other side's aspect)
    "hr_resize_y": (0, 4096),
    "hr_denoising_strength": (0.0, 1.0),
    "hr_size": (64, 4096),  # the second pass's width and height
    # neural upscalers (0: the whole image in one pass)
    "tile_size": (0, 4096),
    "tile_overlap": (0, 256),
    "upscaler_2_visibility": (0.0, 1.0),
    "refiner_switch_at": (0.0, 1.0),  # the share of the steps run before the refiner takes over (1: none)
    "code_former_weight": (0.0, 1.0),  # CodeFormer's fidelity: 0 strongest restoration, 1 closest to the input
    "gfpgan_visibility": (0.0, 1.0),  # Extras: how much of the restored faces shows (0: off)
    "codeformer_visibility": (0.0, 1.0),
    "codeformer_weight": (0.0, 1.0),  # Extras' spelling of code_former_weight (A1111's field names)
}


def in_limits(name: str, value: float | None) -> bool:
    """True when `value` lies within ``LIMITS[name]`` (None never does)."""
    return within(LIMITS, name, value)


def check_limit(name: str, value: float) -> None:
    """RequestError naming `name` when `value` lies outside ``LIMITS[name]``."""
    check_range_of(LIMITS, name, value)
