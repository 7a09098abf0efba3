"""``infinity_qwen0b`` (17 M parameters): 4 blocks of width 512; for quick experiments."""

from infstar_jax.config import base_config


def get_config(arg: str = "480p"):
    c = base_config()
    c.model.architecture = "infinity_qwen0b"
    c.schedule.resolution = arg
    c.remat = "none"
    return c
