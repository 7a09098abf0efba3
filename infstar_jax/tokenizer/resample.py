"""Resampling primitives of the multi-scale quantiser: PyTorch's `area` and `trilinear` interpolation.

The reference resamples latents with `F.interpolate` (SPEC §4.7): `mode='area'` (adaptive average pooling) to go
down a scale and `mode='trilinear'` (align_corners=False) to go back up, sometimes over the channel axis jointly with
H and W (`interp_chw`). Both are separable and are applied one axis at a time with tables built in numpy at trace
time (static shapes), matching the PyTorch CPU kernels that produced the golden files:
* area: torch sums the whole (T,H,W) window sequentially in fp32, then divides `sum / kT / kH / kW`. We sum each
  axis with a 0/1 window matrix (one matmul per axis; a different summation order, hence ~1 ulp of the window sum)
  and divide by the window sizes one axis at a time in torch's outer-to-inner order.
* trilinear: per axis two taps `w0·x[i0] + w1·x[i1]` (exact gathers), with torch's fp32 index formula
  `src = max(fma(n/m, o + 0.5, -0.5), 0)`, `i0 = floor(src)`, `i1 = min(i0 + 1, n - 1)`, `w1 = src - i0`,
  `w0 = 1 - w1`. torch nests the axes as `wT0·(wH0·(wW0·a + wW1·b) + ...) + ...`; interpolating the innermost axis
  first gives the same roundings, so on CPU the result is bit-identical to torch.
An axis whose size does not change is skipped: torch copies it exactly (weights 1 and 0).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=None)
def area_matrix(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 window matrix and window sizes of adaptive average pooling n -> m.

    Returns `(sel [m, n] float32, counts [m] float32)`; output o averages inputs `[floor(o*n/m), ceil((o+1)*n/m))`.
    """
    sel = np.zeros((m, n), np.float32)
    counts = np.zeros((m,), np.float32)
    for o in range(m):
        start = (o * n) // m
        end = -((-(o + 1) * n) // m)
        sel[o, start:end] = 1.0
        counts[o] = end - start
    return sel, counts


@functools.lru_cache(maxsize=None)
def linear_taps(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-tap weights of 1-D linear resampling n -> m (align_corners=False), as PyTorch's CPU kernel computes them.

    Returns `(i0 [m] int32, i1 [m] int32, w0 [m] float32, w1 [m] float32)`:
    output o = w0[o]·x[i0[o]] + w1[o]·x[i1[o]].
    The source index is `fma(n/m, o + 0.5, -0.5)` rounded once to fp32 (torch's build contracts it; the fp64 product
    of two fp32 numbers is exact, so evaluating it in fp64 and rounding once reproduces the fused result).
    """
    f32 = np.float32
    scale = f32(n) / f32(m)
    i0 = np.zeros((m,), np.int32)
    i1 = np.zeros((m,), np.int32)
    w0 = np.zeros((m,), np.float32)
    w1 = np.zeros((m,), np.float32)
    for o in range(m):
        src = max(f32(np.float64(scale) * np.float64(f32(o) + f32(0.5)) - 0.5), f32(0.0))
        i0[o] = min(int(np.floor(src)), n - 1)
        w1[o] = min(max(src - f32(i0[o]), f32(0.0)), f32(1.0))
        w0[o] = f32(1.0) - w1[o]
        i1[o] = i0[o] + 1 if i0[o] < n - 1 else i0[o]
    return i0, i1, w0, w1


def _check_axes(x: jax.Array, out_shape: Sequence[int], axes: Sequence[int], what: str) -> tuple[int, ...]:
    if len(out_shape) != len(axes):
        raise ValueError(f"{what}: out_shape {tuple(out_shape)} and axes {tuple(axes)} must have the same length")
    norm = tuple(a % x.ndim if -x.ndim <= a < x.ndim else None for a in axes)
    if None in norm:
        raise ValueError(f"{what}: axes {tuple(axes)} out of range for an input of rank {x.ndim}")
    if len(set(norm)) != len(norm):
        raise ValueError(f"{what}: axes {tuple(axes)} repeat an axis")
    for size in out_shape:
        if int(size) < 1:
            raise ValueError(f"{what}: every output size must be >= 1, got out_shape {tuple(out_shape)}")
    return norm


def _contract(x: jax.Array, mat: np.ndarray, axis: int) -> jax.Array:
    """x with `axis` (size n) replaced by `mat [m, n] @ x` along it (size m)."""
    y = jnp.tensordot(x, jnp.asarray(mat), axes=((axis,), (1,)), precision=_HIGHEST)
    return jnp.moveaxis(y, -1, axis)


def _broadcast_along(v: np.ndarray, axis: int, ndim: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return jnp.asarray(v.reshape(shape))


def area_resize(x: jax.Array, out_shape: Sequence[int], axes: Sequence[int]) -> jax.Array:
    """PyTorch `F.interpolate(mode='area')` (= adaptive average pooling) over `axes`.

    x: any shape, float; out_shape: new sizes of `axes`; axes listed outer to inner as torch sees them (this fixes
    the order of the per-axis divisions). Returns fp32 (or x's wider float type) with those axes resized.
    """
    axes = _check_axes(x, out_shape, axes, "area_resize")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    resized = [(a, x.shape[a], int(m)) for a, m in zip(axes, out_shape) if x.shape[a] != int(m)]
    for a, n, m in resized:
        x = _contract(x, area_matrix(n, m)[0], a)
    for a, n, m in resized:
        x = x / _broadcast_along(area_matrix(n, m)[1], a, x.ndim)
    return x


def trilinear_resize(x: jax.Array, out_shape: Sequence[int], axes: Sequence[int]) -> jax.Array:
    """PyTorch `F.interpolate(mode='trilinear'/'bilinear'/'linear', align_corners=False)` over `axes`.

    x: any shape, float; out_shape: new sizes of `axes`; axes listed outer to inner as torch sees them (the innermost
    is interpolated first, reproducing torch's nesting). Works for up- and down-sampling; equal sizes copy exactly.
    """
    axes = _check_axes(x, out_shape, axes, "trilinear_resize")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    for a, m in reversed(list(zip(axes, out_shape))):
        n = x.shape[a]
        if n != int(m):
            i0, i1, w0, w1 = linear_taps(n, int(m))
            # w0·a + w1·b in this order: XLA contracts it to fma(w0, a, w1·b), torch's CPU kernel's rounding.
            x = _broadcast_along(w0, a, x.ndim) * jnp.take(x, i0, axis=a) + _broadcast_along(w1, a, x.ndim) * jnp.take(
                x, i1, axis=a
            )
    return x


def down3(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Area down-sampling of a video over (T, H, W): x [B, T, H, W, C] -> [B, t, h, w, C] (SPEC §4.7 `down3`)."""
    if x.ndim != 5 or len(size) != 3:
        raise ValueError(f"down3 expects x [B,T,H,W,C] and size (t,h,w); got x {x.shape}, size {tuple(size)}")
    return area_resize(x, size, axes=(1, 2, 3))


def interp_chw(x: jax.Array, size: Sequence[int], mode: str) -> jax.Array:
    """Resample the channel axis jointly with H and W, T untouched (the reference's `interpolate` helper).

    x [B, T, H, W, C] -> [B, T, h, w, c] for size (c, h, w). torch applies `F.interpolate` over (C, H, W) of the
    (B, T, C, H, W) permutation, so C is the outermost resampled axis. mode: 'area' (down) or 'trilinear' (up).
    """
    if x.ndim != 5 or len(size) != 3:
        raise ValueError(f"interp_chw expects x [B,T,H,W,C] and size (c,h,w); got x {x.shape}, size {tuple(size)}")
    if mode == "area":
        return area_resize(x, size, axes=(4, 2, 3))
    if mode == "trilinear":
        return trilinear_resize(x, size, axes=(4, 2, 3))
    raise ValueError(f"interp_chw: mode must be 'area' or 'trilinear', got {mode!r}")
