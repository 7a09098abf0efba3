"""The causal 3-D video VAE of InfinityStar (SPEC §4.1-4.5), channels-last ``B,T,H,W,C``.

``VideoVAE`` holds the encoder, the decoder, ``proj_down``/``proj_up`` and the learned scale; its methods are pure
(``model.apply(variables, ..., method=...)``, ``variables = {"params": ...}``):

* ``encode(pixels [B,T,H,W,3] in [-1,1], key=None, eps=None) -> latent [B,t,H/16,W/16,4*latent_channels]``:
  encoder -> absorbed 2x2 patchify -> posterior sample ``mean + std*eps`` -> ``proj_down`` -> ``* scale``
  (the reference's ``encode_for_raw_features``); ``t = 1 + (T-1)/4`` for the released temporal compression.
* ``posterior(pixels) -> (mean, logvar, std)``, each ``[B,t,h,w,4*latent_channels]``.
* ``decode(latent) -> pixels [B,T,H,W,3]`` (raw, not clamped): ``/ scale`` -> ``proj_up`` -> unpatchify -> decoder.
* ``encode_features`` / ``decode_features``: the encoder / decoder alone, one chunk at a time with explicit conv caches.

``ChunkedVAE`` runs long videos chunk by chunk (the reference's chunks by default: encoder frames
``[0,9), [9,17), ...``; decoder latent frames ``[0,3), [3,5), ...`` or ``[0,4)`` with ``split_first`` for even
counts), one jitted call per chunk with the conv caches carried between calls, optionally sharded over a mesh. It
equals whole-sequence execution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from infstar_jax.parallel import DEFAULT_RULES, fitted_spec, param_shardings
from infstar_jax.tokenizer.frames import pixels_to_frames
from infstar_jax.tokenizer.layers import (
    ACTIVATION_NAMES,
    CausalConv3d,
    DCDownBlock,
    DCUpBlock,
    ResnetBlock,
    RMSNorm,
    SpatialNorm,
    default_precision,
    patchify,
    shard_activation,
    torch_uniform_init,
    unpatchify,
)

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture (the reference's ``AutoencoderKLCogVideoX`` namespace fields that shape the network).

    ``block_out_channels`` has one more entry than there are down (and up) blocks. Down block ``i`` has a DC
    down-sampler iff ``i < len(spatial_compression_list)`` or ``i < len(temporal_compression_list)``; its temporal
    factor is ``temporal_compression_list[i]`` (1 beyond the list). Up blocks mirror this with the reference's index
    rule (``wan_bsq_vae.py`` ``CogVideoXDecoder3D``). ``embed_dim = 4*latent_channels`` is the tokenizer latent width.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (96, 192, 384, 384, 384)
    layers_per_block: int = 2
    temporal_compression_list: tuple[int, ...] = (2, 2)
    spatial_compression_list: tuple[int, ...] = (2, 2, 2)

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "temporal_compression_list", tuple(int(c) for c in self.temporal_compression_list))
        object.__setattr__(self, "spatial_compression_list", tuple(int(c) for c in self.spatial_compression_list))
        n = self.num_blocks
        if n < 1:
            raise ValueError(f"block_out_channels={self.block_out_channels} needs at least 2 entries")
        if any(f not in (1, 2) for f in self.temporal_compression_list):
            raise ValueError(f"temporal_compression_list={self.temporal_compression_list}: factors must be 1 or 2")
        if any(f != 2 for f in self.spatial_compression_list):
            raise ValueError(f"spatial_compression_list={self.spatial_compression_list}: DC blocks compress space by 2")
        if max(len(self.temporal_compression_list), len(self.spatial_compression_list)) > n:
            raise ValueError(f"compression lists longer than the {n} down blocks of {self.block_out_channels}")
        for i, (cin, cout) in enumerate(zip(self.block_out_channels[:-1], self.block_out_channels[1:])):
            if not self.encoder_has_down(i) and cin != cout:
                raise ValueError(f"down block {i} has no down-sampler, so widths {cin} -> {cout} must be equal")
            if self.encoder_has_down(i) and cout % 4:
                raise ValueError(f"down block {i}: width {cout} must be divisible by 4 (DC down-sampler)")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} must be >= 1")

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels) - 1

    @property
    def embed_dim(self) -> int:
        return 4 * self.latent_channels

    def encoder_has_down(self, i: int) -> bool:
        return i < len(self.temporal_compression_list) or i < len(self.spatial_compression_list)

    def encoder_temporal_factor(self, i: int) -> int:
        return self.temporal_compression_list[i] if i < len(self.temporal_compression_list) else 1

    def _decoder_factor(self, i: int, lst: tuple[int, ...]):
        idx = i - (self.num_blocks - len(lst))
        return lst[-idx] if idx >= 0 else None

    def decoder_has_up(self, i: int) -> bool:
        t = self._decoder_factor(i, self.temporal_compression_list)
        return bool(t or self._decoder_factor(i, self.spatial_compression_list))

    def decoder_temporal_factor(self, i: int) -> int:
        return self._decoder_factor(i, self.temporal_compression_list) or 1

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent position along H and W, including the absorbed 2x2 patchify."""
        return 2 ** sum(self.encoder_has_down(i) for i in range(self.num_blocks)) * 2

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.encoder_temporal_factor(i) for i in range(self.num_blocks))

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown VAE config fields {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------------------
# Frame bookkeeping (static, numpy-free python ints)
# ----------------------------------------------------------------------------------------------------------------------


def encoded_frames(num_frames: int, factors: Sequence[int]) -> int:
    """Latent frames the encoder makes from one chunk of ``num_frames`` (frame 0 alone for odd counts > 1)."""
    t = num_frames
    for f in factors:
        if f > 1 and t > 1:
            t = 1 + (t - 1) // f if t % 2 else t // f
    return t


def decoded_frames(num_latent: int, factors: Sequence[int], split_first: bool = False) -> int:
    """Output frames the decoder makes from one chunk of ``num_latent`` frames."""
    t = num_latent
    for f in factors:
        if f > 1:
            t = t * f - (f - 1 if (t % 2 or split_first) else 0)
    return t


def encoder_chunks(num_frames: int, frames_per_chunk: int) -> list[tuple[int, int]]:
    """The reference's encoder chunks (``_encode``): ``[0, F+r), [F+r, 2F+r), ...`` with ``r = T mod F``."""
    if num_frames < 1:
        raise ValueError(f"cannot encode {num_frames} frames")
    n = max(num_frames // frames_per_chunk, 1)
    r = num_frames % frames_per_chunk
    out = []
    for i in range(n):
        start = frames_per_chunk * i + (0 if i == 0 else r)
        out.append((start, min(frames_per_chunk * (i + 1) + r, num_frames)))
    return out


def decoder_chunks(num_latent: int, latent_per_chunk: int) -> list[tuple[int, int, bool]]:
    """The reference's decoder chunks (``_decode``) as ``(start, end, split_first)``.

    With ``L`` latent frames per chunk: ``[0, L+r), [L+r, 2L+r), ...``, ``r = t mod L``, and when ``L`` divides
    ``t`` the first chunk takes ``2L`` frames. ``split_first`` is set for an even-length first chunk (the reference
    sets it when ``L`` divides ``t``, the same thing for its ``L = 2``). Two latent frames, which the reference cannot decode
    (``torch.cat([])``), decode here as one chunk with ``split_first``, as whole-sequence decoding does.
    """
    if num_latent < 1:
        raise ValueError(f"cannot decode {num_latent} latent frames")
    n = max(num_latent // latent_per_chunk, 1)
    r = num_latent % latent_per_chunk
    if r == 0:
        n -= 1
        r += latent_per_chunk
    if n == 0:
        return [(0, num_latent, num_latent % 2 == 0)]
    out, start = [], 0
    for i in range(n):
        end = min(latent_per_chunk * (i + 1) + r, num_latent)
        out.append((start, end, i == 0 and (end - start) % 2 == 0))
        start = end
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------------------------------


class _Numerics(nn.Module):
    """Shared fields: compute dtype, parameter dtype, conv/matmul precision (None = HIGHEST for fp32)."""

    config: VAEConfig
    dtype: Any = F32
    param_dtype: Any = F32
    precision: Any = None

    @property
    def num(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)


class DownBlock(_Numerics):
    """``CogVideoXDownBlock3D`` (dc mode): ``layers_per_block`` resnets at the input width, then an optional DC
    down-sampler."""

    index: int = 0

    @nn.compact
    def __call__(self, x, cache=None):
        cfg, i = self.config, self.index
        cache = cache or {}
        new = {}
        for j in range(cfg.layers_per_block):
            res = ResnetBlock(False, **self.num, name=f"resnets_{j}")
            x, new[f"resnets_{j}"] = res(x, None, cache.get(f"resnets_{j}"))
        if cfg.encoder_has_down(i):
            out = cfg.block_out_channels[i + 1]
            down = DCDownBlock(out, cfg.encoder_temporal_factor(i), **self.num, name="downsampler")
            x, new["downsampler"] = down(x, cache.get("downsampler"))
        return x, new


class UpBlock(_Numerics):
    """``CogVideoXUpBlock3D`` (dc mode): ``layers_per_block + 1`` SpatialNorm resnets, then an optional DC
    up-sampler."""

    index: int = 0

    @nn.compact
    def __call__(self, x, zq, cache=None, split_first: bool = False):
        cfg, i = self.config, self.index
        cache = cache or {}
        new = {}
        for j in range(cfg.layers_per_block + 1):
            res = ResnetBlock(True, **self.num, name=f"resnets_{j}")
            x, new[f"resnets_{j}"] = res(x, zq, cache.get(f"resnets_{j}"))
        if cfg.decoder_has_up(i):
            out = cfg.block_out_channels[::-1][i + 1]
            up = DCUpBlock(out, cfg.decoder_temporal_factor(i), **self.num, name="upsampler")
            x, new["upsampler"] = up(x, cache.get("upsampler"), split_first)
        return x, new


class MidBlock(_Numerics):
    """Two resnets (SpatialNorm ones in the decoder)."""

    spatial_norm: bool = False

    @nn.compact
    def __call__(self, x, zq=None, cache=None):
        cache = cache or {}
        new = {}
        for j in range(2):
            x, new[f"resnets_{j}"] = ResnetBlock(self.spatial_norm, **self.num, name=f"resnets_{j}")(
                x, zq, cache.get(f"resnets_{j}")
            )
        return x, new


class Encoder(_Numerics):
    """``CogVideoXEncoder3D``: ``pixels [B,T,H,W,3] -> [B,t,H/8,W/8,2*latent]`` (channels ``[mean | logvar]``)."""

    @nn.compact
    def __call__(self, x, cache=None):
        cfg = self.config
        cache = cache or {}
        new = {}
        x = shard_activation(x)
        h, new["conv_in"] = CausalConv3d(cfg.block_out_channels[0], **self.num, name="conv_in")(x, cache.get("conv_in"))
        for i in range(cfg.num_blocks):
            h, new[f"down_blocks_{i}"] = DownBlock(cfg, **self.num, index=i, name=f"down_blocks_{i}")(
                h, cache.get(f"down_blocks_{i}")
            )
        h, new["mid_block"] = MidBlock(cfg, **self.num, name="mid_block")(h, None, cache.get("mid_block"))
        h = nn.silu(RMSNorm(self.param_dtype, name="norm_out")(h))
        conv_out = CausalConv3d(2 * cfg.latent_channels, **self.num, name="conv_out")
        h, new["conv_out"] = conv_out(h, cache.get("conv_out"))
        return shard_activation(h), new


class Decoder(_Numerics):
    """``CogVideoXDecoder3D``: ``z [B,t,h,w,latent] -> pixels [B,T,8h,8w,3]``; every SpatialNorm sees this chunk's
    ``z``."""

    @nn.compact
    def __call__(self, z, cache=None, split_first: bool = False):
        cfg = self.config
        cache = cache or {}
        new = {}
        rev = cfg.block_out_channels[::-1]
        z = shard_activation(z)
        h, new["conv_in"] = CausalConv3d(rev[0], **self.num, name="conv_in")(z, cache.get("conv_in"))
        mid = MidBlock(cfg, **self.num, spatial_norm=True, name="mid_block")
        h, new["mid_block"] = mid(h, z, cache.get("mid_block"))
        for i in range(cfg.num_blocks):
            h, new[f"up_blocks_{i}"] = UpBlock(cfg, **self.num, index=i, name=f"up_blocks_{i}")(
                h, z, cache.get(f"up_blocks_{i}"), split_first
            )
        h = nn.silu(SpatialNorm(**self.num, name="norm_out")(h, z))
        h, new["conv_out"] = CausalConv3d(cfg.out_channels, **self.num, name="conv_out")(h, cache.get("conv_out"))
        return shard_activation(h), new


# ----------------------------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------------------------


def posterior_from_features(enc_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``enc_out [B,t,H/8,W/8,2c] -> (mean, logvar, std)``, each ``[B,t,H/16,W/16,4c]``.

    Patchify first (channel ``k*4 + 2i + j`` of the 2c encoder channels), then split into halves: the first 4c channels
    are the means of latent channels ``0..c-1``, the rest their log-variances, clamped to ``[-30, 20]``.
    """
    hp = patchify(enc_out.astype(F32))
    mean, logvar = jnp.split(hp, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    return mean, logvar, jnp.exp(0.5 * logvar)


def _check_pixels(pixels: jax.Array, cfg: VAEConfig) -> None:
    if pixels.ndim != 5 or pixels.shape[-1] != cfg.in_channels:
        raise ValueError(f"pixels must be [B,T,H,W,{cfg.in_channels}] (channels-last), got shape {pixels.shape}")
    h, w = pixels.shape[2:4]
    s = cfg.spatial_factor
    if h % s or w % s:
        raise ValueError(f"video frames of {h}x{w} pixels: height and width must be multiples of {s}")


def _check_latent(latent: jax.Array, cfg: VAEConfig) -> None:
    if latent.ndim != 5 or latent.shape[-1] != cfg.embed_dim:
        raise ValueError(f"latent must be [B,t,h,w,{cfg.embed_dim}] (channels-last), got shape {latent.shape}")


class VideoVAE(_Numerics):
    """Encoder + decoder + absorbed patchify + ``proj_down``/``proj_up`` + the learned scale
    (``scale_learnable_parameters[0]``)."""

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, **self.num)
        self.decoder = Decoder(cfg, **self.num)
        e = cfg.embed_dim
        dense = dict(
            features=e,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision if self.precision is not None else default_precision(self.dtype),
            kernel_init=nn.with_logical_partitioning(torch_uniform_init(e), ("conv_in", "conv_out")),
            bias_init=nn.with_logical_partitioning(torch_uniform_init(e), ("conv_out",)),
        )
        self.proj_down = nn.Dense(**dense)
        self.proj_up = nn.Dense(**dense)
        self.scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ()), (), self.param_dtype)

    # -- encoder side ------------------------------------------------------------------------------------------------

    def encode_features(self, pixels: jax.Array, cache=None):
        """Encoder on one chunk: ``pixels [B,T,H,W,3] -> (enc_out [B,t,H/8,W/8,2c] fp32, cache')``."""
        _check_pixels(pixels, self.config)
        h, cache = self.encoder(pixels, cache)
        return h.astype(F32), cache

    def sample_to_latent(self, z: jax.Array) -> jax.Array:
        """``proj_down(z) * scale``: posterior sample ``z [B,t,h,w,4c]`` -> tokenizer latent (fp32)."""
        return self.proj_down(z).astype(F32) * self.scale.astype(F32)

    def latent_from_features(self, enc_out: jax.Array, eps: jax.Array) -> jax.Array:
        """Posterior sample ``mean + std*eps`` (``eps`` shaped like the latent) -> ``proj_down`` -> ``* scale``."""
        mean, _, std = posterior_from_features(enc_out)
        if eps.shape != mean.shape:
            raise ValueError(f"eps has shape {eps.shape}, expected the latent shape {mean.shape}")
        return self.sample_to_latent(mean + std * eps.astype(F32))

    def posterior(self, pixels: jax.Array):
        """Whole-sequence ``pixels [B,T,H,W,3] -> (mean, logvar, std)``, each ``[B,t,H/16,W/16,4c]`` fp32."""
        enc, _ = self.encode_features(pixels)
        return posterior_from_features(enc)

    def encode(self, pixels: jax.Array, key: jax.Array | None = None, eps: jax.Array | None = None) -> jax.Array:
        """Whole-sequence ``encode_for_raw_features``: ``pixels [B,T,H,W,3] in [-1,1] -> latent [B,t,H/16,W/16,4c]``.

        The posterior is always sampled (as the reference does, also for I2V conditioning): pass exactly one of a PRNG
        ``key`` (``eps = normal(key, latent shape)``) or the noise ``eps`` itself.
        """
        enc, _ = self.encode_features(pixels)
        return self.latent_from_features(enc, _posterior_noise(key, eps, _latent_shape_of(enc)))

    # -- decoder side ------------------------------------------------------------------------------------------------

    def decoder_input(self, latent: jax.Array) -> jax.Array:
        """``latent [B,t,h,w,4c] -> z [B,t,2h,2w,c]``: ``/ scale`` -> ``proj_up`` -> unpatchify (fp32)."""
        _check_latent(latent, self.config)
        z = latent.astype(F32) / self.scale.astype(F32)
        return unpatchify(self.proj_up(z).astype(F32))

    def decode_features(self, z: jax.Array, cache=None, split_first: bool = False):
        """Decoder on one chunk: ``z [B,t,h,w,c] -> (pixels [B,T,8h,8w,3] in dtype, cache')``."""
        return self.decoder(z, cache, split_first)

    def decode(self, latent: jax.Array) -> jax.Array:
        """Whole-sequence decode: ``latent [B,t,h,w,4c] -> raw pixels [B,T,16h,16w,3]`` (not clamped), fp32.

        For an even ``t`` the first latent frame still expands to one output frame (``split_first``, SPEC §4.5).
        """
        z = self.decoder_input(latent)
        pixels, _ = self.decode_features(z, None, split_first=latent.shape[1] % 2 == 0)
        return pixels.astype(F32)

    def __call__(self, pixels: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Round trip (used by ``init``): ``(latent, decode(latent))``."""
        latent = self.encode(pixels, eps=eps)
        return latent, self.decode(latent)


def _latent_shape_of(enc_out_shape_or_array) -> tuple[int, ...]:
    s = getattr(enc_out_shape_or_array, "shape", enc_out_shape_or_array)
    b, t, h, w, c = s
    return (b, t, h // 2, w // 2, 2 * c)


def _posterior_noise(key, eps, shape) -> jax.Array:
    if (key is None) == (eps is None):
        raise ValueError("pass exactly one of `key` (a PRNG key) or `eps` (the posterior noise)")
    if eps is None:
        return jax.random.normal(key, shape, F32)
    if tuple(eps.shape) != tuple(shape):
        raise ValueError(f"eps has shape {tuple(eps.shape)}, expected the latent shape {tuple(shape)}")
    return eps.astype(F32)


def _dummy_inputs(cfg: VAEConfig):
    s = cfg.spatial_factor
    pixels = jax.ShapeDtypeStruct((1, 1 + cfg.temporal_factor, s, s, cfg.in_channels), F32)
    t_lat = encoded_frames(pixels.shape[1], [cfg.encoder_temporal_factor(i) for i in range(cfg.num_blocks)])
    return pixels, jax.ShapeDtypeStruct((1, t_lat, 1, 1, cfg.embed_dim), F32)


def abstract_variables(model: VideoVAE):
    """``{"params": ...}`` of ``model`` as boxed (logically partitioned) ``ShapeDtypeStruct``s; nothing is computed."""
    return jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs(model.config))


def init_params(model: VideoVAE, seed: int = 0):
    """Random ``{"params": ...}`` drawn on the host with PyTorch's default recipe, U(+-1/sqrt(fan_in)) for conv/linear
    weights and biases; norm gains ``1 + 0.2 N(0,1)`` and the scale ``U(0.6, 1.4)`` (as the golden models) so that
    every parameter matters.

    Host numpy rather than ``model.init``: XLA takes minutes on CPU to compile ~300 threefry draws, and random weights
    here serve tests and benchmarks (the VAE is only ever loaded from the released checkpoint).
    """
    rng = np.random.default_rng(seed)
    tree = nn.meta.unbox(abstract_variables(model))

    def fill(path, leaf, fan_in):
        name = path[-1]
        if name == "gamma":
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        if name == "scale":
            return np.asarray(rng.uniform(0.6, 1.4), leaf.dtype)
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)

    def walk(node, path):
        if not isinstance(node, dict):
            raise TypeError(f"unexpected leaf container at {'/'.join(path)}")
        fan_in = int(np.prod(node["kernel"].shape[:-1])) if "kernel" in node else None
        return {
            k: walk(v, path + (k,)) if isinstance(v, dict) else jnp.asarray(fill(path + (k,), v, fan_in))
            for k, v in node.items()
        }

    return walk(tree, ())


# ----------------------------------------------------------------------------------------------------------------------
# Chunked execution
# ----------------------------------------------------------------------------------------------------------------------


def _shape_key(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


def _chunk_fn(model: VideoVAE, name: str, static: tuple):
    """The pure per-chunk functions ``fn(variables, *args)`` that ``ChunkedVAE`` jits."""
    if name == "enc":
        return lambda v, pixels, cache: model.apply(v, pixels, cache, method=VideoVAE.encode_features)
    if name == "latent":
        return lambda v, enc, eps: model.apply(v, enc, eps, method=VideoVAE.latent_from_features)
    (split_first,) = static

    def dec(v, latent, cache):
        z = model.apply(v, latent, method=VideoVAE.decoder_input)
        pixels, cache = model.apply(v, z, cache, split_first, method=VideoVAE.decode_features)
        return pixels.astype(F32), cache

    return dec


def activation_sharding(mesh, shape: Sequence[int], rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a ``B,T,H,W,C`` activation (or conv cache): batch over the data axes, rows over ``context`` (by
    ``rules``), each dropped where it does not divide the dimension (small latents, odd sizes)."""
    return NamedSharding(mesh, fitted_spec(shape, ACTIVATION_NAMES, mesh, rules))


def conv_compiler_options() -> dict | None:
    """XLA options for programs made of the VAE's convolutions: on GPUs, channels-last convolutions.

    The XLA of JAX 0.11 hands cuDNN its 3-D convolutions channels-first, with a transpose of the input, the kernel and
    the output around every one; forcing NHWC runs them on the tensors as they are (720p decode, 21 latent frames in
    chunks of 4, bf16, H200: 0.913 -> 0.770 s; docs/benchmarks.md).
    """
    return {"xla_gpu_force_conv_nhwc": True} if jax.default_backend() == "gpu" else None


@functools.lru_cache(maxsize=64)
def _jitted(model: VideoVAE, mesh, rules: tuple, name: str, static: tuple, arg_key: tuple):
    """One jit per (model, mesh, function, static flags, argument shapes), shared by every ``ChunkedVAE``; returns
    ``(jitted, in_shardings or None)``."""
    fn = _chunk_fn(model, name, static)
    # The carried conv cache (argument 2 of the encoder/decoder chunk functions) is consumed: donate its buffers.
    donate = (2,) if name in ("enc", "dec") else ()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate, compiler_options=conv_compiler_options()), None
    treedef, specs = arg_key
    args = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in specs])
    abstract = abstract_variables(model)
    act = lambda a: activation_sharding(mesh, a.shape, rules)  # noqa: E731
    in_sh = (param_shardings(abstract, mesh, rules),) + tuple(jax.tree.map(act, a) for a in args)
    out_sh = jax.tree.map(act, jax.eval_shape(fn, nn.meta.unbox(abstract), *args))
    return jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=donate,
                   compiler_options=conv_compiler_options()), in_sh


class ChunkedVAE:
    """Encodes / decodes long videos chunk by chunk, one jitted call per chunk, conv caches carried as a pytree.

    Args:
      model: the ``VideoVAE`` (its ``dtype`` sets the compute precision).
      frames_per_chunk: encoder chunk length in frames after the first chunk (default: the reference's
        ``2 * temporal_factor`` = 8); must be a multiple of ``temporal_factor``.
      latent_frames_per_chunk: decoder chunk length in latent frames after the first chunk (default 2, the reference);
        must be even. Longer chunks are faster on accelerators and use more memory.
      mesh: optional mesh; chunk inputs/outputs and caches are then sharded by ``rules`` (batch over the data axes,
        rows over ``context`` where they divide) and params by their logical names. Call under ``jax.set_mesh(mesh)``.
      rules: logical axis rules (default ``DEFAULT_RULES``).
    """

    def __init__(
        self,
        model: VideoVAE,
        *,
        frames_per_chunk: int | None = None,
        latent_frames_per_chunk: int = 2,
        mesh=None,
        rules: Sequence[tuple[str, Any]] | None = None,
    ):
        cfg = model.config
        self.model = model
        self.enc_factors = [cfg.encoder_temporal_factor(i) for i in range(cfg.num_blocks)]
        tf = cfg.temporal_factor
        self.frames_per_chunk = int(frames_per_chunk or 2 * tf)
        if self.frames_per_chunk < 1 or self.frames_per_chunk % tf:
            raise ValueError(f"frames_per_chunk={frames_per_chunk} must be a positive multiple of {tf}")
        self.latent_frames_per_chunk = int(latent_frames_per_chunk)
        if self.latent_frames_per_chunk < 2 or self.latent_frames_per_chunk % 2:
            raise ValueError(f"latent_frames_per_chunk={latent_frames_per_chunk} must be a positive even number")
        self.mesh = mesh
        self.rules = tuple(rules) if rules is not None else DEFAULT_RULES

    def _call(self, name: str, static: tuple, variables, *args):
        fn, in_sh = _jitted(self.model, self.mesh, self.rules, name, static, _shape_key(args))
        if in_sh is not None:
            # Slices of sharded arrays (and host arrays) are moved to the chunk's shardings explicitly; a no-op for
            # arrays already there (params after the first chunk, caches from the previous chunk).
            variables, *args = jax.device_put((variables, *args), in_sh)
        return fn(variables, *args)

    # -- encode --------------------------------------------------------------------------------------------------------

    def latent_shape(self, pixel_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape ``[B,t,H/16,W/16,4c]`` for a pixel clip ``[B,T,H,W,3]`` (sum over the chunks)."""
        b, t, h, w, _ = pixel_shape
        t_lat = sum(encoded_frames(e - s, self.enc_factors) for s, e in encoder_chunks(t, self.frames_per_chunk))
        s = self.model.config.spatial_factor
        return (b, t_lat, h // s, w // s, self.model.config.embed_dim)

    def encode_features(self, variables, pixels: jax.Array) -> jax.Array:
        """Encoder output ``[B,t,H/8,W/8,2c]`` fp32 (the reference's ``vae.encode``), chunk by chunk."""
        _check_pixels(pixels, self.model.config)
        outs, cache = [], None
        for start, end in encoder_chunks(pixels.shape[1], self.frames_per_chunk):
            out, cache = self._call("enc", (), variables, pixels[:, start:end], cache)
            outs.append(out)
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)

    def encode(self, variables, pixels: jax.Array, *, key: jax.Array | None = None,
               eps: jax.Array | None = None) -> jax.Array:
        """``pixels [B,T,H,W,3] in [-1,1] -> latent [B,t,H/16,W/16,4c]`` fp32; exactly one of ``key`` / ``eps``.

        The encoder runs chunk by chunk; patchify, posterior sampling and ``proj_down`` act per position, so they run
        once on the (small) concatenated encoder output. A key draws the noise for the whole latent at once.
        """
        _check_pixels(pixels, self.model.config)
        eps = _posterior_noise(key, eps, self.latent_shape(pixels.shape))
        enc = self.encode_features(variables, pixels)
        return self._call("latent", (), variables, enc, eps)

    # -- decode --------------------------------------------------------------------------------------------------------

    def decode(self, variables, latent: jax.Array, *, frames: bool = False) -> jax.Array:
        """``latent [B,t,h,w,4c] -> raw pixels [B,T,16h,16w,3]`` fp32 (not clamped), chunk by chunk.

        ``frames=True`` returns uint8 RGB frames instead (``frames.pixels_to_frames``, applied to each chunk as it is
        decoded, so that only uint8 outputs accumulate on the device).
        """
        _check_latent(latent, self.model.config)
        outs, cache = [], None
        for start, end, split_first in decoder_chunks(latent.shape[1], self.latent_frames_per_chunk):
            out, cache = self._call("dec", (split_first,), variables, latent[:, start:end], cache)
            if frames:
                out = _frames_no_replace(out)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
        if frames and out.shape[1] > 1:
            out = out.at[:, 0].set(out[:, 1])
        return out


@jax.jit
def _frames_no_replace(pixels):
    return pixels_to_frames(pixels, replace_first=False)


def load_vae(ckpt_dir, *, dtype=F32, precision=None, target_shardings=None):
    """Loads a converted VAE (``python -m infstar_jax.convert vae ...``): returns ``(VideoVAE, {"params": ...})``.

    ``dtype`` is the compute dtype (fp32 for parity, bf16 as the reference's sampler decodes); params stay fp32.
    ``target_shardings`` (a tree of shardings matching the params) restores them already placed.
    """
    from infstar_jax.checkpoint import load_params, read_meta

    meta = read_meta(ckpt_dir)
    if meta.get("kind") != "vae":
        raise ValueError(f"{ckpt_dir} holds a {meta.get('kind')!r} checkpoint, expected 'vae'")
    model = VideoVAE(VAEConfig.from_dict(meta["config"]), dtype=dtype, precision=precision)
    target = None
    if target_shardings is not None:
        abstract = nn.meta.unbox(abstract_variables(model))["params"]
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, target_shardings
        )
    return model, {"params": load_params(ckpt_dir, target, kind="vae")}
