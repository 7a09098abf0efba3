"""4-D interleaved spacetime RoPE (SPEC §1.6).

Each head's ``head_dim/2`` rotary pairs are split in four equal segments (scale-step, frame, row, col); every segment
uses the same ``F = head_dim/8`` frequencies ``1/base^(j/F)``. Pair ``p`` occupies head elements ``(2p, 2p+1)``.
Positions are integers produced by ``infstar_jax.schedules`` (visual tokens: ``(512 + real_sid, frame, row, col)``,
text token ``n``: ``(n, 0, 0, 0)``); angles are formed in fp32 exactly as the reference (``outer(pos_f32, inv_freq)``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def num_freqs(head_dim: int) -> int:
    """Frequencies per position axis; the reference asserts ``4 * F == head_dim / 2``."""
    if head_dim % 2 or (head_dim // 2) % 4:
        raise ValueError(f"4-D RoPE needs head_dim/2 divisible by 4, got head_dim={head_dim}")
    return head_dim // 8


def inv_freq(head_dim: int, base: float = 10000.0) -> np.ndarray:
    """``[F]`` fp32: ``1 / base ** (arange(F) / F)`` computed in fp32 like ``torch``."""
    f = num_freqs(head_dim)
    exponent = np.arange(f, dtype=np.float32) / np.float32(f)
    return (np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)).astype(np.float32)


def cos_sin(positions: jnp.ndarray, head_dim: int, base: float = 10000.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """RoPE tables for per-token 4-D positions.

    Args:
      positions: ``[..., L, 4]`` int (scale-step, frame, row, col); rows with a negative scale position (padding)
        get cos = sin = 0, as the reference's zero rows.
    Returns:
      ``(cos, sin)``, each ``[..., L, head_dim/2]`` fp32, pairs ordered [scale F | frame F | row F | col F].
    """
    freqs = jnp.asarray(inv_freq(head_dim, base))
    pos = positions.astype(jnp.float32)
    angles = pos[..., :, None] * freqs  # [..., L, 4, F]
    angles = angles.reshape(*angles.shape[:-2], -1)
    valid = (positions[..., :1] >= 0).astype(jnp.float32)
    return jnp.cos(angles) * valid, jnp.sin(angles) * valid


def apply(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates interleaved pairs with the reference's operation order and rounding.

    Args:
      x: ``[B, L, heads, head_dim]`` (any float dtype).
      cos, sin: ``[B or 1, L, head_dim/2]`` fp32.
    Returns:
      ``x`` rotated, same dtype. For bf16 ``x`` this reproduces the reference's double rounding
      ``a <- bf16(bf16(a*cos) - b*sin)``, ``b <- bf16(bf16(b*cos) + a*sin)`` (SPEC §1.6); in fp32 it is plain RoPE.
    """
    dt = x.dtype
    xf = x.astype(jnp.float32)
    # Both halves of a pair as one element-wise expression: x*cos rounded to x's dtype, plus the pair partner times
    # (-sin, +sin) (b*(-s) is exactly -(b*s)). One pass over x: stacking the two halves back into pairs ran at a third
    # of the memory bandwidth on an H200 (docs/benchmarks.md).
    partner = xf.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    c = jnp.repeat(cos, 2, axis=-1)[:, :, None, :]
    s = jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], -1)[:, :, None, :]
    return ((xf * c).astype(dt).astype(jnp.float32) + partner * s).astype(dt)
