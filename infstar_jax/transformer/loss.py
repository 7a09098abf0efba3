"""Bitwise loss and per-scale loss weighting (SPEC §1.8, §7.6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bitwise_loss_acc(logits: jnp.ndarray, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """2-way cross-entropy per bit averaged over bits, and bit accuracy.

    Args:
      logits: ``[..., d, 2]`` fp32 (label 0, label 1).
      labels: ``[..., d]`` integer 0/1.
    Returns:
      ``(loss [...], acc [...])`` fp32; accuracy takes argmax with ties to label 0, like ``torch.argmax``.
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    labels = labels.astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    pred = (logits[..., 1] > logits[..., 0]).astype(jnp.int32)
    return nll.mean(-1), (pred == labels).astype(jnp.float32).mean(-1)


def token_loss_acc(detail, semantic, labels, token_is_detail):
    """Per-token loss/accuracy choosing each token's head.

    Args:
      detail: ``[B, L, Dd, 2]``; semantic: ``[B, L, Ds, 2]`` logits.
      labels: ``[B, L, Dd]`` bits (semantic tokens use the first ``Ds``).
      token_is_detail: ``[L]`` bool.
    Returns: ``(loss [B, L], acc [B, L])``.
    """
    ld, ad = bitwise_loss_acc(detail, labels)
    ls, as_ = bitwise_loss_acc(semantic, labels[..., : semantic.shape[-2]])
    return jnp.where(token_is_detail, ld, ls), jnp.where(token_is_detail, ad, as_)


def scale_weighted(per_token: jnp.ndarray, token_block: jnp.ndarray, block_weights: jnp.ndarray):
    """Mean per block, then the weighted sum with normalised block weights.

    Args:
      per_token: ``[B, L]``; token_block: ``[L]`` int block index; block_weights: ``[nb]`` summing to 1.
    Returns: ``(total [B], per_block [B, nb])``.
    """
    nb = block_weights.shape[0]
    sums = jax.ops.segment_sum(per_token.T, token_block, nb)  # [nb, B]
    counts = jax.ops.segment_sum(jnp.ones_like(token_block, jnp.float32), token_block, nb)
    per_block = (sums / jnp.maximum(counts, 1.0)[:, None]).T
    return jnp.sum(per_block * block_weights, axis=-1), per_block
