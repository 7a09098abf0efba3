"""Any registered reference architecture: ``--config configs/arch.py:infinity_qwen7b`` (SPEC §2.1)."""

from infstar_jax.config import base_config
from infstar_jax.transformer.config import ARCHITECTURES


def get_config(arg: str = "infinity_qwen8b"):
    if arg not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arg!r}; known: {sorted(ARCHITECTURES)}")
    c = base_config()
    c.model.architecture = arg
    return c
