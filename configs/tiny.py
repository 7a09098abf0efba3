"""A tiny transformer for tests: 2 blocks, width 64, GQA 4/2, head_dim 16, text width 32, fp32."""

from infstar_jax.config import base_config


def get_config(arg: str | None = None):
    del arg
    c = base_config()
    c.model.architecture = None
    c.model.overrides = dict(depth=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                             text_dim=32, text_maxlen=64)
    c.precision = "fp32"
    c.remat = "none"
    c.schedule.num_scales = 3
    return c
