"""Building blocks of the causal 3-D video VAE (SPEC §4.2), channels-last ``B,T,H,W,C``.

Every convolution is causal in time. The first chunk of a video pads its start with ``k_t - 1`` copies of its first
frame; later chunks pad with the last ``k_t - 1`` (time-extended) input frames of the previous chunk, which each conv
returns as its cache. Caches are plain nested dicts of arrays (an explicit pytree: ``None`` on the first chunk) that
mirror the module tree, so a video can be processed chunk by chunk with results equal to whole-sequence execution.

Numerics follow the reference: norms are computed in fp32; convolutions run in ``dtype`` (fp32 at HIGHEST precision for
parity; bf16 to match the reference's bf16-autocast decode), with the conv output and residual stream in ``dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infstar_jax.parallel import constrain

Cache = Any  # nested dict of arrays, or None before the first chunk

# Activations: batch over the data axes, rows over `context` (DEFAULT_RULES); channels replicated.
ACTIVATION_NAMES = ("activation_batch", "frames", "height", "width", None)


def default_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for fp32 (parity with the reference's fp32 convs), DEFAULT for reduced-precision compute."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def torch_uniform_init(fan_in: int):
    """PyTorch's default Conv/Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases alike."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def shard_activation(x: jax.Array) -> jax.Array:
    """Sharding constraint for a ``B,T,H,W,C`` activation (no-op without a mesh)."""
    return constrain(x, ACTIVATION_NAMES)


# ----------------------------------------------------------------------------------------------------------------------
# Pure rearrangements
# ----------------------------------------------------------------------------------------------------------------------


def space_to_depth(x: jax.Array) -> jax.Array:
    """``[B,T,2h,2w,C] -> [B,T,h,w,4C]`` with channel index ``(2*i + j)*C + c`` (einops ``(ph pw c)``, c fastest)."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h // 2, w // 2, 4 * c)


def depth_to_space(x: jax.Array, tf: int) -> jax.Array:
    """``[B,T,H,W,tf*4*C] -> [B,T*tf,2H,2W,C]``, channel index ``((p*2 + i)*2 + j)*C + c`` (einops ``(pt ph pw c)``)."""
    b, t, h, w, k = x.shape
    c = k // (4 * tf)
    x = x.reshape(b, t, h, w, tf, 2, 2, c)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t * tf, 2 * h, 2 * w, c)


def patchify(x: jax.Array) -> jax.Array:
    """Per-frame ``pixel_unshuffle(2)``: ``[B,T,2h,2w,C] -> [B,T,h,w,4C]``, channel index ``c*4 + 2*i + j``."""
    b, t, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"patchify needs even height and width, got {h}x{w}")
    x = x.reshape(b, t, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 2, 4, 6, 3, 5).reshape(b, t, h // 2, w // 2, 4 * c)


def unpatchify(x: jax.Array) -> jax.Array:
    """Per-frame ``pixel_shuffle(2)``, the inverse of ``patchify``: ``[B,T,h,w,4C] -> [B,T,2h,2w,C]``."""
    b, t, h, w, k = x.shape
    if k % 4:
        raise ValueError(f"unpatchify needs a channel count divisible by 4, got {k}")
    x = x.reshape(b, t, h, w, k // 4, 2, 2)
    return x.transpose(0, 1, 2, 5, 3, 6, 4).reshape(b, t, 2 * h, 2 * w, k // 4)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PyTorch's default ``nearest`` interpolation (float32 ``floor(i * in/out)``, clamped)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def _take_axis(x: jax.Array, idx: np.ndarray, axis: int) -> jax.Array:
    n = x.shape[axis]
    if len(idx) == n and np.array_equal(idx, np.arange(n)):
        return x
    if len(idx) % n == 0 and np.array_equal(idx, np.repeat(np.arange(n), len(idx) // n)):
        # Integral up-sampling: a broadcast, which XLA fuses into its consumer instead of gathering.
        return jnp.repeat(x, len(idx) // n, axis=axis)
    return jnp.take(x, jnp.asarray(idx), axis=axis)


def nearest_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """``F.interpolate(x, size)`` (mode ``nearest``) over the ``T,H,W`` axes of ``[B,T,H,W,C]``."""
    for axis, out in zip((1, 2, 3), size):
        x = _take_axis(x, nearest_indices(x.shape[axis], int(out)), axis)
    return x


def resize_like_features(z: jax.Array, size: Sequence[int]) -> jax.Array:
    """SpatialNorm's resize of the decoder latent ``z [B,t,h,w,C]`` to a feature map of ``size = (T,H,W)``.

    For odd ``T > 1`` the first frame is resized alone and frames ``1..`` to ``T-1`` frames, so that the first latent
    frame maps to the first output frame only (causal first-frame handling); otherwise all frames are resized together.
    """
    t, h, w = (int(s) for s in size)
    if t > 1 and t % 2 == 1:
        first = nearest_resize(z[:, :1], (1, h, w))
        rest = nearest_resize(z[:, 1:], (t - 1, h, w))
        return jnp.concatenate([first, rest], axis=1)
    return nearest_resize(z, (t, h, w))


# ----------------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Causal 3-D convolution (``CogVideoXCausalConv3d``), stride 1, zero-padded ``k//2`` in space.

    ``__call__(x [B,T,H,W,Cin], cache [B,k_t-1,H,W,Cin] | None) -> (y [B,T,H,W,features], cache')``; the returned cache
    is ``None`` for ``k_t == 1``. Kernel ``(kT,kH,kW,Cin,Cout)``.
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, cache: jax.Array | None = None):
        kt, kh, kw = self.kernel_size
        cin = x.shape[-1]
        init = torch_uniform_init(cin * kt * kh * kw)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, (None, None, None, "conv_in", "conv_out")),
            (kt, kh, kw, cin, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(init, ("conv_out",)), (self.features,), self.param_dtype)
        # Casting before padding is exact and keeps the cache in the compute dtype (half the memory in bf16).
        x = x.astype(self.dtype)
        new_cache = None
        if kt > 1:
            if cache is None:
                pad = jnp.repeat(x[:, :1], kt - 1, axis=1)
            else:
                if cache.shape[1] != kt - 1 or cache.shape[2:] != x.shape[2:]:
                    raise ValueError(f"conv cache of shape {cache.shape} does not fit input {x.shape} (k_t={kt})")
                pad = cache.astype(self.dtype)
            x = jnp.concatenate([pad, x], axis=1)
            new_cache = x[:, -(kt - 1) :]
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(self.dtype),
            window_strides=(1, 1, 1),
            padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            precision=self.precision if self.precision is not None else default_precision(self.dtype),
        )
        return y + bias.astype(self.dtype), new_cache


class RMSNorm(nn.Module):
    """Wan ``RMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels, computed and returned in fp32."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        init = nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",))
        gamma = self.param("gamma", init, (c,), self.param_dtype)
        x = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        return x / jnp.maximum(norm, 1e-12) * np.float32(c**0.5) * gamma.astype(jnp.float32)


class SpatialNorm(nn.Module):
    """``CogVideoXSpatialNorm3D``: ``RMS(f) * conv_y(z') + conv_b(z')``, z' = the decoder latent resized to f.

    The 1x1x1 convs are applied to ``z`` before the nearest resize: a pointwise map commutes with nearest resizing
    exactly (every output element is the same dot product), and it is far cheaper at latent resolution.
    ``f [B,T,H,W,C]``, ``zq [B,t,h,w,Cz]`` -> ``[B,T,H,W,C]``.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        c = f.shape[-1]
        kw = dict(kernel_size=(1, 1, 1), dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        y, _ = CausalConv3d(c, name="conv_y", **kw)(zq)
        b, _ = CausalConv3d(c, name="conv_b", **kw)(zq)
        y = resize_like_features(y, f.shape[1:4])
        b = resize_like_features(b, f.shape[1:4])
        return RMSNorm(self.param_dtype, name="norm_layer")(f) * y + b


class ResnetBlock(nn.Module):
    """``CogVideoXResnetBlock3D`` with equal in/out widths: ``x + conv2(silu(N2(conv1(silu(N1(x))))))``.

    N = RMSNorm (encoder) or SpatialNorm conditioned on ``zq`` (decoder, ``spatial_norm=True``).
    ``__call__(x [B,T,H,W,C], zq | None, cache) -> (y, cache')``; cache ``{"conv1", "conv2"}``.
    """

    spatial_norm: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    def _norm(self, name: str, h, zq):
        if self.spatial_norm:
            return SpatialNorm(self.dtype, self.param_dtype, self.precision, name=name)(h, zq)
        return RMSNorm(self.param_dtype, name=name)(h)

    @nn.compact
    def __call__(self, x: jax.Array, zq: jax.Array | None = None, cache: Cache = None):
        c = x.shape[-1]
        cache = cache or {}
        conv = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        x = shard_activation(x)
        h = nn.silu(self._norm("norm1", x, zq))
        h, c1 = CausalConv3d(c, name="conv1", **conv)(h, cache.get("conv1"))
        h = nn.silu(self._norm("norm2", h, zq))
        h, c2 = CausalConv3d(c, name="conv2", **conv)(h, cache.get("conv2"))
        return h + x, {"conv1": c1, "conv2": c2}


class DCDownBlock(nn.Module):
    """``DCDownBlock3d`` (3d-dc down-sampler with RMS norm): space-to-depth by 2, time by ``tf`` after frame 0.

    ``x = conv(silu(RMS(h)))`` to ``out/4`` channels; x and the raw input h are each rearranged ``(ph pw c)``; for odd
    ``T > 1`` frame 0 is handled alone (spatial only) and the other frames are grouped in ``tf`` consecutive frames and
    averaged; even ``T``: all frames grouped; ``T == 1``: spatial only. The skip averages the rearranged h over groups
    of ``out`` channels. ``[B,T,H,W,Cin] -> [B,T',H/2,W/2,out]``; cache ``{"conv"}``.
    """

    out_channels: int
    temporal_factor: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    def _rearrange(self, a: jax.Array) -> jax.Array:
        t = a.shape[1]
        if t > 1 and t % 2 == 1:
            first, rest = a[:, :1], a[:, 1:]
        elif t > 1:
            first, rest = None, a
        else:
            first, rest = a, None
        parts = []
        if first is not None:
            parts.append(space_to_depth(first))
        if rest is not None:
            rest = space_to_depth(rest)
            tf = self.temporal_factor
            if tf > 1:
                b, tr, h, w, c = rest.shape
                if tr % tf:
                    raise ValueError(f"DC down-block: {tr} frames after frame 0 cannot be grouped by {tf}")
                rest = rest.reshape(b, tr // tf, tf, h, w, c).mean(axis=2)
            parts.append(rest)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None):
        cache = cache or {}
        if self.out_channels % 4:
            raise ValueError(f"DC down-block output width {self.out_channels} must be divisible by 4")
        x = shard_activation(x)
        h = nn.silu(RMSNorm(self.param_dtype, name="norm")(x))
        num = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        conv = CausalConv3d(self.out_channels // 4, **num, name="conv")
        h, c = conv(h, cache.get("conv"))
        h = self._rearrange(h)
        y = self._rearrange(x)
        g = y.shape[-1] // self.out_channels
        y = y.reshape(*y.shape[:-1], g, self.out_channels).mean(axis=-2)
        return h + y, {"conv": c}


class DCUpBlock(nn.Module):
    """``DCUpBlock3d`` (3d-dc up-sampler with RMS norm): depth-to-space by 2 in space and ``tf`` in time.

    ``x = conv(silu(RMS(h)))`` to ``out*4*tf`` channels rearranged ``(pt ph pw c)``; skip = h tiled along channels and
    rearranged the same way; with ``tf > 1`` and (odd ``T`` or ``split_first``) the first ``tf`` output frames are
    averaged into one (first latent frame -> first output frame). ``[B,T,H,W,Cin] -> [B,T',2H,2W,out]``;
    cache ``{"conv"}``.
    """

    out_channels: int
    temporal_factor: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, cache: Cache = None, split_first: bool = False):
        cache = cache or {}
        tf = self.temporal_factor
        cin = x.shape[-1]
        cout = self.out_channels * 4 * tf
        if cout % cin:
            raise ValueError(f"DC up-block: conv width {cout} must be a multiple of the input width {cin}")
        compress_first = x.shape[1] % 2 == 1 or split_first
        x = shard_activation(x)
        h = nn.silu(RMSNorm(self.param_dtype, name="norm")(x))
        num = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        conv = CausalConv3d(cout, **num, name="conv")
        h, c = conv(h, cache.get("conv"))
        h = depth_to_space(h, tf)
        y = depth_to_space(jnp.tile(x, (1, 1, 1, 1, cout // cin)), tf)
        if tf > 1 and compress_first:
            h = jnp.concatenate([h[:, :tf].mean(axis=1, keepdims=True), h[:, tf:]], axis=1)
            y = jnp.concatenate([y[:, :tf].mean(axis=1, keepdims=True), y[:, tf:]], axis=1)
        return h + y, {"conv": c}
