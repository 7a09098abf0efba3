"""``infinity_qwen2_2b`` (2.19 B parameters, 18 heads MHA) at the released 480p 5 s schedule."""

from infstar_jax.config import base_config


def get_config(arg: str = "480p"):
    c = base_config()
    c.model.architecture = "infinity_qwen2_2b"
    c.schedule.resolution = arg
    # Measured on one H200 (docs/benchmarks.md, 40 % MFU on the released packing mix): steps of up to 30,000 packed
    # tokens keep matmul and attention outputs, longer ones only the attention outputs. With less memory per device
    # lower the bound (or drop it: `--config.remat_by_length=`).
    c.remat = "attn_out"
    c.remat_by_length = "30000:dots_attn"
    return c
