"""The optional GAN part of tokenizer training: a per-frame PatchGAN discriminator and its losses.

The reference ships the losses (``infinity/models/videovae/modules/loss.py``: hinge / vanilla discriminator losses,
``adopt_weight``) and the switches (``utils/arguments.py``: ``disc_type='patchgan'``, ``disc_channels=64``,
``disc_layers=3``, ``norm_type='group'``, ``disc_loss_type='hinge'``, ``discriminator_iter_start``, ``disc_warmup``)
but not the discriminator itself. ``PatchDiscriminator`` is the pix2pix / taming-transformers N-layer PatchGAN those
switches name, with GroupNorm (the reference's loss-argument default) instead of BatchNorm, which also keeps it
purely functional (no running statistics). It sees frames, ``[N, H, W, 3]`` in [-1, 1] (a video's frames flattened
into the batch, the reference's image discriminator with ``gan_image4video='yes'``), and returns one logit per patch.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

DISC_LOSSES = ("hinge", "vanilla")
NORMS = ("group", "none")


@dataclasses.dataclass(frozen=True)
class DiscConfig:
    """``channels``: width of the first conv (doubles per layer, capped at 8x); ``layers``: stride-2 convs;
    ``norm``: ``group`` (32 groups, or fewer for narrow layers) or ``none``."""

    channels: int = 64
    layers: int = 3
    norm: str = "group"

    def __post_init__(self):
        if self.channels < 1 or self.layers < 1:
            raise ValueError(f"discriminator channels ({self.channels}) and layers ({self.layers}) must be >= 1")
        if self.norm not in NORMS:
            raise ValueError(f"discriminator norm {self.norm!r}: expected one of {NORMS}")

    def min_size(self) -> int:
        """Smallest frame side the network accepts: the stride-2 convs halve it ``layers`` times and the two final
        stride-1 convs (k4, pad 1) remove one pixel each, leaving at least one logit."""
        return 3 * 2**self.layers


def _groups(channels: int) -> int:
    g = min(32, channels)
    while channels % g:
        g -= 1
    return g


class PatchDiscriminator(nn.Module):
    """``frames [N, H, W, 3] -> logits [N, h, w, 1]`` fp32 (h ~ H / 2**layers - 2).

    conv4 s2 (no norm) -> LeakyReLU(0.2) -> (layers - 1) x [conv4 s2 -> norm -> LeakyReLU] -> conv4 s1 -> norm ->
    LeakyReLU -> conv4 s1 -> 1 channel; convs pad by 1, widths ``channels * min(2**n, 8)``. Weights N(0, 0.02),
    norm gains N(1, 0.02) as taming's ``weights_init``.
    """

    config: DiscConfig = DiscConfig()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"the discriminator takes frames [N, H, W, 3], got shape {x.shape}")
        if min(x.shape[1:3]) < cfg.min_size():
            raise ValueError(f"frames of {x.shape[1]}x{x.shape[2]} are too small for a {cfg.layers}-layer patch "
                             f"discriminator (needs sides >= {cfg.min_size()}); lower loss.disc_layers")
        kernel_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "conv_in", "conv_out"))
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",))

        def conv(h, features, stride, name):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           precision=jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None,
                           kernel_init=kernel_init, bias_init=bias_init, name=name)(h)

        def norm(h, name):
            if cfg.norm == "none":
                return h
            return nn.GroupNorm(num_groups=_groups(h.shape[-1]), epsilon=1e-5, dtype=jnp.float32,
                                scale_init=nn.with_logical_partitioning(
                                    lambda k, s, d=jnp.float32: 1.0 + 0.02 * jax.random.normal(k, s, d),
                                    ("conv_out",)),
                                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                                name=name)(h.astype(jnp.float32)).astype(self.dtype)

        h = nn.leaky_relu(conv(x.astype(self.dtype), cfg.channels, 2, "conv_0"), 0.2)
        for n in range(1, cfg.layers):
            h = conv(h, cfg.channels * min(2**n, 8), 2, f"conv_{n}")
            h = nn.leaky_relu(norm(h, f"norm_{n}"), 0.2)
        h = conv(h, cfg.channels * min(2**cfg.layers, 8), 1, f"conv_{cfg.layers}")
        h = nn.leaky_relu(norm(h, f"norm_{cfg.layers}"), 0.2)
        return conv(h, 1, 1, "conv_out").astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def d_loss(kind: str, logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown discriminator loss {kind!r}; expected one of {DISC_LOSSES}")


def adopt_weight(step: jax.Array, threshold: int, warmup: int = 0) -> jax.Array:
    """The reference's GAN warm-up factor: 0 before ``threshold`` (and always 0 for a negative threshold), then a
    linear ramp from 0 to 1 over ``warmup`` steps (1 at once for ``warmup = 0``). ``step``: int scalar (traced)."""
    step = jnp.asarray(step, jnp.float32)
    if threshold < 0:
        return jnp.zeros((), jnp.float32)
    ramp = jnp.minimum((step - threshold) / warmup, 1.0) if warmup > 0 else jnp.ones((), jnp.float32)
    return jnp.where(step < threshold, 0.0, ramp).astype(jnp.float32)
