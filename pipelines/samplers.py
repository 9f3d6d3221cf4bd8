"""A1111 sampler and schedule-type names -> diffusers schedulers.

(Placeholder names table; the full mapping is being written.)
"""

SAMPLER_NAMES: tuple[str, ...] = (
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2S a", "Euler a", "Euler", "LMS", "Heun",
    "DPM2", "DPM2 a", "DDIM", "PLMS", "UniPC", "LCM",
)
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Karras", "Exponential", "SGM Uniform")
