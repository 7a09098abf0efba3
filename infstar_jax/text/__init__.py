"""Text conditioning: the Flan-T5 encoder in Flax, its offline tokenizer, and the release's prompt pipeline.

    enc = load_text_encoder("ckpt/flan_t5_xl")                  # from `python -m infstar_jax.convert t5`
    feats, lens = enc.encode([inference_prompt("a cat surfing")])  # [B, Lb, 2048] fp32, [B] int32
"""

from infstar_jax.text.prompts import (
    DEFAULT_BUCKETS,
    DEFAULT_QUALITY_SUFFIX,
    duration_prefix,
    inference_prompt,
    keep_first_rows,
    kv_compact,
    pad_to_bucket,
    training_caption,
)
from infstar_jax.text.t5 import T5Config, T5Encoder, TextEncoder, load_text_encoder
from infstar_jax.text.tokenizer import T5Tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_QUALITY_SUFFIX",
    "T5Config",
    "T5Encoder",
    "T5Tokenizer",
    "TextEncoder",
    "duration_prefix",
    "inference_prompt",
    "keep_first_rows",
    "kv_compact",
    "load_text_encoder",
    "load_tokenizer",
    "pad_to_bucket",
    "training_caption",
]
