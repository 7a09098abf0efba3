"""The released 8B model (``infinity_qwen8b``); ``:480p`` (default) or ``:720p`` picks the released schedule."""

from infstar_jax.config import base_config


def get_config(arg: str = "480p"):
    if arg not in ("480p", "720p"):
        raise ValueError(f"resolution {arg!r}: the 8B release exists at 480p and 720p")
    c = base_config()
    c.model.architecture = "infinity_qwen8b"
    c.schedule.resolution = arg
    return c
