"""Transformer architectures (SPEC §2.1) and precision modes (SPEC §1.14)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


def mlp_width(embed_dim: int, mlp_ratio: float) -> int:
    """``round(C * mlp_ratio / 256) * 256`` with Python's round-half-even, as the reference."""
    return int(round(embed_dim * mlp_ratio / 256) * 256)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture and numerics of the InfinityStar transformer.

    Precision: ``dtype`` is the matmul compute dtype inside blocks, ``residual_dtype`` the dtype of the residual stream
    and of the embeddings' outputs, ``block_param_dtype`` the storage dtype of block weights. Norm statistics, RoPE
    angles and both heads are always fp32. ``precision_mode`` presets (``PRECISION_MODES``) reproduce the reference:
    ``fp32`` (golden parity), ``train`` (fp32 weights and residual, bf16 block matmuls: the reference's autocast
    training), ``infer`` (bf16 blocks and residual stream, fp32 embeddings params/heads: the reference's sampler).
    """

    depth: int = 36
    embed_dim: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    mlp_dim: int = 16384
    qkvo_bias: bool = False
    text_dim: int = 2048
    text_maxlen: int = 512
    latent_dim: int = 64
    detail_bits: int = 64
    semantic_bits: int = 16
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    residual_dtype: str = "float32"
    block_param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if (self.head_dim // 2) % 4 or self.head_dim % 2:
            raise ValueError(f"4-D RoPE needs head_dim/2 divisible by 4; head_dim={self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")

    def replace(self, **kw) -> "TransformerConfig":
        return dataclasses.replace(self, **kw)

    def with_precision(self, mode: str) -> "TransformerConfig":
        if mode not in PRECISION_MODES:
            raise ValueError(f"precision mode {mode!r}; choose one of {sorted(PRECISION_MODES)}")
        return dataclasses.replace(self, **PRECISION_MODES[mode])

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_residual_dtype(self):
        return jnp.dtype(self.residual_dtype)

    @property
    def jnp_block_param_dtype(self):
        return jnp.dtype(self.block_param_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TransformerConfig":
        names = {f.name for f in dataclasses.fields(TransformerConfig)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown transformer config fields {sorted(unknown)}")
        return TransformerConfig(**d)

    def num_params(self) -> int:
        c, h, kv, hd, m = self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        attn = c * h * hd * 2 + c * kv * hd * 2 + (h * hd + 2 * kv * hd + c if self.qkvo_bias else 0)
        block = attn + 2 * hd + 3 * c * m + 2 * c
        top = (
            self.text_maxlen * self.text_dim
            + (self.text_dim + 1) * c
            + c  # sos_token
            + (self.latent_dim + 1) * c
            + c
            + (c + 1) * 2 * self.detail_bits
            + (c + 1) * 2 * self.semantic_bits
        )
        return self.depth * block + top


PRECISION_MODES = {
    "fp32": dict(dtype="float32", residual_dtype="float32", block_param_dtype="float32"),
    "train": dict(dtype="bfloat16", residual_dtype="float32", block_param_dtype="float32"),
    "infer": dict(dtype="bfloat16", residual_dtype="bfloat16", block_param_dtype="bfloat16"),
}

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attn_out", "dots_attn")


def _arch(depth, c, heads, kv_heads=None, mlp_ratio=4.0, head_dim=None, bias=False):
    head_dim = head_dim or c // heads
    return dict(
        depth=depth,
        embed_dim=c,
        num_heads=heads,
        num_kv_heads=kv_heads or heads,
        head_dim=head_dim,
        mlp_dim=mlp_width(c, mlp_ratio),
        qkvo_bias=bias,
    )


# Every registered reference model that can be built (SPEC §2.1; infinity_v2b cannot: head_dim 126 breaks 4-D RoPE).
# `block_chunks` only affects checkpoint key names (block_chunks.{c}.module.{j} vs blocks.{i}).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "infinity_qwen8b": dict(_arch(36, 4096, 32, 8, 4.0), block_chunks=6),
    "infinity_qwen7b": dict(_arch(36, 4096, 32, 8, 3.0), block_chunks=6),
    "infinity_qwen_wide14b": dict(_arch(36, 5632, 44, 11, 3.4), block_chunks=6),
    "infinity_qwen13bMHA": dict(_arch(40, 5120, 40, 40, 3.4, bias=True), block_chunks=8),
    "infinity_qwen2_2b": dict(_arch(28, 2304, 18, 18, 3.55), block_chunks=7),
    "infinity_qwen0b": dict(_arch(4, 512, 4, 4, 3.55), block_chunks=2),
    "infinity_qwen2_30b": dict(_arch(54, 6144, 48, 12, 4.0), block_chunks=27),
    "infinity_qwen14b": dict(_arch(48, 4608, 36, 9, 4.0), block_chunks=24),
    "infinity_2b": dict(_arch(32, 2048, 16), block_chunks=1),
    "infinity_sa2b": dict(_arch(28, 2560, 20), block_chunks=7),
    "infinity_sa8b": dict(_arch(42, 4096, 32), block_chunks=7),
    "infinity_sa14b": dict(_arch(40, 5120, 40, mlp_ratio=3.4), block_chunks=8),
    "infinity_sa12b": dict(_arch(60, 4096, 32), block_chunks=1),
    "infinity_sa16b": dict(_arch(42, 4096, 32), block_chunks=1),
    "infinity_8b": dict(_arch(40, 3584, 28), block_chunks=1),
    "infinity_20b": dict(_arch(58, 4608, 36), block_chunks=1),
    "infinity_layer12": dict(_arch(12, 768, 8), block_chunks=1),
    "infinity_layer16": dict(_arch(16, 1152, 12), block_chunks=1),
    "infinity_layer24": dict(_arch(24, 1536, 16), block_chunks=1),
    "infinity_layer32": dict(_arch(32, 2080, 20), block_chunks=1),
    "infinity_layer40": dict(_arch(40, 2688, 24), block_chunks=1),
    "infinity_layer48": dict(_arch(48, 3360, 28), block_chunks=1),
}


def architecture(name: str, **overrides) -> TransformerConfig:
    """The config of a registered architecture (``block_chunks`` dropped: it is a checkpoint-naming detail)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    kw = {k: v for k, v in ARCHITECTURES[name].items() if k != "block_chunks"}
    kw.update(overrides)
    return TransformerConfig(**kw)
