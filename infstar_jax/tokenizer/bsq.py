"""Binary spherical quantisation (BSQ), SPEC §4.6.

A token's d channels are l2-normalised and each entry is replaced by its sign scaled to the unit sphere:
code = ±1/sqrt(d) (±0.25 for the 16-bit semantic quantiser, ±0.125 for the 64-bit detail one), bit = code > 0.
The magnitude of the input never survives quantisation; only the signs do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`F.normalize(x, dim=-1)`: x / max(||x||_2, eps) over the last axis, fp32."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def bsq_quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantise tokens to the sign corners of the unit sphere.

    x: [..., d] float (channels last). Returns `(codes [..., d] fp32, bits [..., d] uint8)`.
    codes = u + stop_gradient(ẑ - u) with u = l2-normalised x and ẑ = ±1/sqrt(d) (+ iff u > 0): the value is ẑ (up to
    the fp32 rounding of that sum, exactly as the reference computes it) and the gradient is the straight-through one.
    bits = codes > 0, so an input entry that is exactly 0 gets bit 0.
    """
    d = x.shape[-1]
    u = l2_normalize(x).astype(jnp.float32)
    # The reference multiplies ±1 by the Python float 1/d**0.5; the fp32 rounding of that constant is what it uses.
    q_scale = np.float32(1.0 / d**0.5)
    zhat = jnp.where(u > 0, q_scale, -q_scale)
    codes = u + jax.lax.stop_gradient(zhat - u)
    bits = (codes > 0).astype(jnp.uint8)
    return codes, bits


def bits_to_codes(bits: jax.Array) -> jax.Array:
    """Bit labels -> BSQ codes: bits [..., d] (0/1, any int or bool dtype) -> [..., d] fp32 = ±1/sqrt(d).

    Same as the reference's `indices_to_codes(bits, 'bit_label')` = l2norm(2·bits − 1), exact for d = 16 and 64.
    """
    d = bits.shape[-1]
    signs = jnp.where(bits.astype(jnp.int32) > 0, jnp.float32(1.0), jnp.float32(-1.0))
    return signs / jnp.sqrt(jnp.float32(d))


def bsq_aux_losses(
    x: jax.Array,
    codes: jax.Array,
    *,
    inv_temperature: float = 100.0,
    commitment_loss_weight: float = 0.25,
    entropy_loss_weight: float = 0.1,
    gamma0: float = 1.0,
    gamma: float = 1.0,
    zeta: float = 1.0,
) -> dict[str, jax.Array]:
    """The BSQ training losses (tokenizer training only; InfinityStar runs the VAE in eval mode where they are 0).

    x: [..., d] the quantiser input (before normalisation); codes: [..., d] `bsq_quantize(x)[0]`. Every leading axis
    is a token axis. With u = l2norm(x) and p = sigmoid(-4·u/sqrt(d)·inv_temperature) (the soft probability of bit 0):
      per_sample_entropy = mean_tokens Σ_d H([p, 1-p]),   codebook_entropy = Σ_d H(mean_tokens [p, 1-p]),
      H(q) = -Σ q·log(q + 1e-8),   commitment = mean((u - stop_gradient(codes))²),
      aux_loss = commitment_loss_weight·commitment
                 + entropy_loss_weight·zeta·(gamma0·per_sample_entropy − gamma·codebook_entropy)/inv_temperature.
    Returns a dict of fp32 scalars with those five names.
    """
    d = x.shape[-1]
    u = l2_normalize(x).astype(jnp.float32).reshape(-1, d)
    p = jax.nn.sigmoid(-4.0 * u / np.float32(d**0.5) * np.float32(inv_temperature))
    prob = jnp.stack([p, 1.0 - p], axis=-1)  # [tokens, d, 2]

    def entropy(q):
        return -jnp.sum(q * jnp.log(q + 1e-8), axis=-1)

    per_sample_entropy = jnp.mean(jnp.sum(entropy(prob), axis=-1))
    codebook_entropy = jnp.sum(entropy(jnp.mean(prob, axis=0)))
    commitment = jnp.mean(jnp.square(u - jax.lax.stop_gradient(codes.astype(jnp.float32).reshape(-1, d))))
    entropy_penalty = gamma0 * per_sample_entropy - gamma * codebook_entropy
    aux_loss = commitment * commitment_loss_weight + (zeta * entropy_penalty / inv_temperature) * entropy_loss_weight
    return {
        "per_sample_entropy": per_sample_entropy,
        "codebook_entropy": codebook_entropy,
        "commitment": commitment,
        "entropy_penalty": entropy_penalty,
        "aux_loss": aux_loss,
    }
