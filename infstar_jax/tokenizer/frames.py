"""Conversions between uint8 video frames and the VAE's pixel range [-1, 1] (SPEC §6.5, ``tools/run_infinity.py``).

``pixels_to_frames`` is the reference's ``summed_codes2images`` after ``vae.decode``: ``((x + 1) / 2)`` clamped to
``[0, 1]``, times 255, **truncated** to uint8 (not rounded), and for videos (``T > 1``) frame 0 replaced by frame 1.
The reference then flips to BGR for OpenCV and back to RGB when writing; frames here stay RGB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pixels_to_frames(pixels: jax.Array, *, replace_first: bool = True) -> jax.Array:
    """``pixels [B,T,H,W,3]`` (raw decoder output, any range) -> ``frames [B,T,H,W,3]`` uint8 RGB.

    Arithmetic runs in the dtype of ``pixels`` (fp32 for parity). ``replace_first``: for ``T > 1`` frame 0 := frame 1
    (the reference's "smoothing"); a single image keeps its only frame (the reference's line raises there).
    """
    if pixels.ndim != 5 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be [B,T,H,W,3], got shape {pixels.shape}")
    x = jnp.clip((pixels + 1) / 2, 0, 1)
    frames = (x * 255).astype(jnp.uint8)  # float -> uint8 conversion truncates toward zero, like torch's .to(uint8)
    if replace_first and frames.shape[1] > 1:
        frames = frames.at[:, 0].set(frames[:, 1])
    return frames


def frames_to_pixels(frames: jax.Array) -> jax.Array:
    """``frames [..., 3]`` uint8 RGB -> fp32 pixels in [-1, 1] as the reference's ``transform``: ``2*(u8/255) - 1``."""
    if frames.dtype != jnp.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    # A 256-entry table computed on the host: XLA may turn the division by 255 into a multiplication by its rounded
    # reciprocal, which is 1 ulp off the reference for about half of the byte values.
    im = np.arange(256, dtype=np.float32) / np.float32(255)
    return jnp.take(jnp.asarray(im + im - 1), frames.astype(jnp.int32))
