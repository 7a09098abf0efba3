"""``infinity_qwen2_2b`` (2.19 B parameters, 18 heads MHA) at the released 480p 5 s schedule."""

from infstar_jax.config import base_config


def get_config(arg: str = "480p"):
    c = base_config()
    c.model.architecture = "infinity_qwen2_2b"
    c.schedule.resolution = arg
    return c
