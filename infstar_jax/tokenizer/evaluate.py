"""Reconstruction quality of a tokenizer per number of scales kept: PSNR and SSIM (issue 9).

``python -m infstar_jax.tokenizer.evaluate --ckpt DIR --videos FOLDER [--scales K]`` prints, for ``k = 1..K``, the
mean PSNR and SSIM of the clips reconstructed from the first ``k`` scales of every clip pyramid (all repetitions of
those scales), ``K`` = all scales of a clip by default. ``DIR`` is a tokenizer checkpoint: a converted VAE
(``python -m infstar_jax.convert vae``), a trainer export (``WORKDIR/export/vae``) or a training workdir.

Metrics (on frames mapped from [-1, 1] to [0, 1], reconstructions clamped):
* PSNR of a clip = ``10 log10(1 / MSE)`` over all its frames, pixels and channels; the table averages clips.
* SSIM (Wang et al. 2004) per frame and channel with an 11x11 Gaussian window (sigma 1.5) over the valid region
  (no padding), ``C1 = 0.01²``, ``C2 = 0.03²``; a clip's SSIM is the mean over frames and channels.
The latent is the posterior *mean* (deterministic); training samples the posterior.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infstar_jax import schedules
from infstar_jax.tokenizer import train as tt
from infstar_jax.tokenizer.multiscale import Plan
from infstar_jax.tokenizer.vae import VideoVAE, conv_compiler_options

log = logging.getLogger(__name__)

F32 = jnp.float32
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


def to_unit(pixels: jax.Array) -> jax.Array:
    """[-1, 1] pixels -> [0, 1], clamped, fp32."""
    return (jnp.clip(pixels.astype(F32), -1.0, 1.0) + 1.0) / 2.0


def psnr(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """PSNR (dB) of each leading item: ``x, y [N, ...]`` -> ``[N]`` (MSE over everything but the first axis)."""
    d = (x.astype(F32) - y.astype(F32)).reshape(x.shape[0], -1)
    mse = jnp.mean(d * d, axis=1)
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian ``[size] float64`` centred on the middle tap."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: jax.Array, g: jax.Array) -> jax.Array:
    """Separable 'valid' Gaussian filter of ``x [N, H, W]`` -> ``[N, H-k+1, W-k+1]``."""
    k = g.shape[0]
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(g[i] * x[:, i:i + h, :] for i in range(k))
    return sum(g[j] * rows[:, :, j:j + w] for j in range(k))


def ssim(x: jax.Array, y: jax.Array, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> jax.Array:
    """Mean SSIM of each image: ``x, y [N, H, W, C]`` (values in ``[0, data_range]``) -> ``[N]``.

    Local statistics with the Gaussian window over the valid region; ``σ²`` and ``σxy`` are the biased
    (window-weighted) moments ``E[x²] - μ²``; averaged over positions and channels.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim: expected two [N, H, W, C] arrays of one shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) < window:
        raise ValueError(f"ssim: images of {x.shape[1]}x{x.shape[2]} are smaller than the {window}x{window} window")
    n, _, _, c = x.shape
    g = jnp.asarray(gaussian_window(window, sigma), F32)
    xs = jnp.moveaxis(x.astype(F32), -1, 1).reshape(n * c, x.shape[1], x.shape[2])
    ys = jnp.moveaxis(y.astype(F32), -1, 1).reshape(n * c, y.shape[1], y.shape[2])
    f = functools.partial(_filter_valid, g=g)
    mx, my = f(xs), f(ys)
    sxx = f(xs * xs) - mx * mx
    syy = f(ys * ys) - my * my
    sxy = f(xs * ys) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(smap.reshape(n, c, -1), axis=(1, 2))


def clip_metrics(recon: jax.Array, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(psnr [B], ssim [B])`` of reconstructions ``recon`` vs ``video`` (``[B, T, H, W, 3]`` in [-1, 1])."""
    r, v = to_unit(recon), to_unit(video)
    b, t = v.shape[:2]
    s = ssim(r.reshape((b * t,) + r.shape[2:]), v.reshape((b * t,) + v.shape[2:])).reshape(b, t)
    return psnr(r, v), jnp.mean(s, axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# Schedules for a clip size
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """The multi-scale quantisation a tokenizer is run with (``None`` = from the clip size / release defaults)."""

    num_scales: int | None = None
    image_rep: tuple[int, ...] | None = None
    video_rep: tuple[int, ...] | None = None
    detail_scale_min_tokens: int | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d) -> "QuantSettings":
        d = dict(d or {})
        return cls(num_scales=d.get("num_scales"),
                   image_rep=tuple(d["image_rep"]) if d.get("image_rep") is not None else None,
                   video_rep=tuple(d["video_rep"]) if d.get("video_rep") is not None else None,
                   detail_scale_min_tokens=d.get("detail_scale_min_tokens"))


def plan_for(frames: int, height: int, width: int, q: QuantSettings = QuantSettings(),
             stride: int = schedules.SPATIAL_STRIDE
             ) -> tuple[schedules.Schedule, Plan]:
    """The schedule and quantisation plan of clips of ``frames x height x width`` pixels.

    The h/w template is the nearest to ``height / width``; the number of scales per clip is the one whose pixel
    size (latent size x ``stride``, the tokenizer's pixels per latent position) equals the frame size (or
    ``q.num_scales``, which must then give that size). Repetitions and the
    detail-head threshold default to the release's (480p for up to 14 scales, 720p for 15) or, for truncated
    pyramids, image ``[3]*N`` / video ``[3]*(N-2)+[2,1]``.
    """
    template = schedules.nearest_template(height / width)
    sizes = {n: schedules.pixel_hw(template, n, stride) for n in range(1, len(schedules.SCALE_SIDES) + 1)}
    if q.num_scales is None:
        fits = [n for n, hw in sizes.items() if hw == (height, width)]
        if not fits:
            raise ValueError(f"frames of {height}x{width} (h/w template {template}) are not the pixel size of any "
                             f"pyramid of that template ({sorted(set(sizes.values()))}); resize the clips")
        n = fits[-1]
    else:
        n = int(q.num_scales)
        if sizes.get(n) != (height, width):
            raise ValueError(f"{n} scales of template {template} give {sizes.get(n)} pixel frames, but the clips "
                             f"are {height}x{width}")
    sched = schedules.resolve(
        "720p" if n == 15 else "480p", height=int(height), width=int(width), frames=int(frames), num_scales=n,
        image_rep=q.image_rep, video_rep=q.video_rep, detail_scale_min_tokens=q.detail_scale_min_tokens,
        training=True, strict_heads=False)
    plan = Plan.from_schedule(sched.scales, sched.reps, sched.scales_per_clip, sched.detail_scale_min_tokens)
    return sched, plan


# ----------------------------------------------------------------------------------------------------------------------
# Per-scale table
# ----------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _table_fn(model: VideoVAE, plan: Plan):
    def fn(params, video):
        latent = tt.encode_latent(model, params, video)
        q = tt.quantize(latent, plan, return_partials=True)
        ps, ss = [], []
        for codes in q.partial_sums:
            p, s = clip_metrics(tt.decode_codes(model, params, codes), video)
            ps.append(p)
            ss.append(s)
        return jnp.stack(ps), jnp.stack(ss)

    return jax.jit(fn, compiler_options=conv_compiler_options())


def scale_metrics(model: VideoVAE, params, video: jax.Array, plan: Plan) -> tuple[jax.Array, jax.Array]:
    """``(psnr [K, B], ssim [K, B])`` of ``video [B, T, H, W, 3]`` reconstructed from the first ``k = 1..K``
    scales of every clip (posterior mean, no flips)."""
    return _table_fn(model, plan)(params, video)


def scale_table(model: VideoVAE, params, clips: np.ndarray, plan: Plan, batch_size: int = 4) -> list[dict]:
    """Per ``k = 1..K``: ``{"scales": k, "psnr": mean dB, "ssim": mean, "clips": n}`` over ``clips [N, T, H, W, 3]``
    (processed ``batch_size`` at a time; a short last batch is padded and its padding ignored)."""
    clips = np.asarray(clips, np.float32)
    n = clips.shape[0]
    if n == 0:
        raise ValueError("no clips to evaluate")
    ps, ss = [], []
    for start in range(0, n, batch_size):
        chunk = clips[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        p, s = jax.device_get(scale_metrics(model, params, jnp.asarray(chunk), plan))
        ps.append(p[:, :real])
        ss.append(s[:, :real])
    p, s = np.concatenate(ps, axis=1), np.concatenate(ss, axis=1)
    return [{"scales": k + 1, "psnr": float(p[k].mean()), "ssim": float(s[k].mean()), "clips": n}
            for k in range(p.shape[0])]


def format_table(rows: Sequence[dict], title: str = "") -> str:
    """A markdown table of ``scale_table`` rows."""
    lines = [title] if title else []
    lines += ["| scales kept | PSNR (dB) | SSIM |", "|---:|---:|---:|"]
    lines += [f"| {r['scales']} | {r['psnr']:.2f} | {r['ssim']:.4f} |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def find_checkpoint(path: str) -> str:
    """A VAE checkpoint folder from ``path``: the folder itself, ``PATH/vae`` or ``PATH/export/vae``."""
    from infstar_jax.checkpoint import META_FILE

    for cand in (path, os.path.join(path, "vae"), os.path.join(path, "export", "vae")):
        if os.path.isfile(os.path.join(cand, META_FILE)):
            return cand
    raise FileNotFoundError(f"{path} holds no tokenizer checkpoint (looked for {META_FILE} in {path}, {path}/vae and "
                            f"{path}/export/vae); convert one with `python -m infstar_jax.convert vae` or train one")


def list_videos(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--videos {folder} is not a folder")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(VIDEO_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) in {folder}")
    return paths


def load_clips(paths: Sequence[str], frames: int, pn: int | str, limit: int | None = None,
               stride: int = schedules.SPATIAL_STRIDE) -> np.ndarray:
    """The first ``frames`` frames (at 16 fps) of each video, resized/cropped to the template size at pixel level
    ``pn``: ``[N, T, H, W, 3] float32`` in [-1, 1]. Unreadable or too short videos are skipped with a warning; clips
    of another size than the first are refused (one table covers one size)."""
    from infstar_jax.data import video as vid

    out = []
    for p in paths:
        if limit is not None and len(out) >= limit:
            break
        try:
            clip = vid.load_clip(p, frames, pn, stride=stride)
        except vid.VideoError as e:
            log.warning("skipping %s: %s", p, e)
            continue
        if out and clip.frames.shape != out[0].shape:
            raise ValueError(f"{p} gives a {clip.frames.shape} clip, the first gave {out[0].shape}: evaluate videos "
                             "of one aspect ratio at a time")
        out.append(clip.frames)
    if not out:
        raise ValueError(f"none of the {len(paths)} videos gave a {frames}-frame clip")
    return np.stack(out)


def _size_for(folder_paths: Sequence[str], pn, stride: int = schedules.SPATIAL_STRIDE) -> int | str:
    """A pixel level for the first video: the given ``pn``, else the number of scales whose pixel size equals the
    video's own size."""
    if pn is not None:
        return int(pn) if str(pn).isdigit() else pn
    from infstar_jax.data import video as vid

    info = vid.probe(folder_paths[0])
    template = schedules.nearest_template(info.height / info.width)
    for n in range(len(schedules.SCALE_SIDES), 0, -1):
        if schedules.pixel_hw(template, n, stride) == (info.height, info.width):
            return n
    raise ValueError(f"{folder_paths[0]} is {info.width}x{info.height}, not the size of a scale pyramid; pass --pn "
                     "(a pixel level such as 0.40M or a number of scales) to resize the clips")


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infstar_jax.tokenizer.evaluate",
                                     description="PSNR/SSIM of a tokenizer's reconstructions per number of scales kept")
    parser.add_argument("--ckpt", required=True, help="tokenizer checkpoint (converted VAE, export, or workdir)")
    parser.add_argument("--videos", required=True, help="folder of videos")
    parser.add_argument("--scales", type=int, default=None, help="print k = 1..K (default: all scales of a clip)")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip, 4k+1 (default 17)")
    parser.add_argument("--pn", default=None, help="pixel level (0.40M) or number of scales to resize the clips to "
                                                   "(default: the video's own size)")
    parser.add_argument("--num", type=int, default=None, help="evaluate at most this many videos")
    parser.add_argument("--batch", type=int, default=4, help="clips per device batch")
    parser.add_argument("--image-rep", type=_ints, default=None, help="repetitions of the image pyramid's scales")
    parser.add_argument("--video-rep", type=_ints, default=None, help="repetitions of a clip pyramid's scales")
    parser.add_argument("--detail-scale-min-tokens", type=int, default=None,
                        help="ph*pw from which a scale uses the 64-bit detail quantiser")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="VAE compute dtype")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from infstar_jax.checkpoint import read_meta
    from infstar_jax.tokenizer.vae import load_vae

    try:
        ckpt = find_checkpoint(args.ckpt)
        meta = read_meta(ckpt)
        saved = QuantSettings.from_dict(meta.get("quantization"))
        q = QuantSettings(image_rep=args.image_rep if args.image_rep is not None else saved.image_rep,
                          video_rep=args.video_rep if args.video_rep is not None else saved.video_rep,
                          detail_scale_min_tokens=(args.detail_scale_min_tokens
                                                   if args.detail_scale_min_tokens is not None
                                                   else saved.detail_scale_min_tokens))
        paths = list_videos(args.videos)
        model, variables = load_vae(ckpt, dtype=jnp.bfloat16 if args.dtype == "bf16" else F32)
        stride = model.config.spatial_factor
        pn = _size_for(paths, args.pn if args.pn is not None else saved.num_scales, stride)
        clips = load_clips(paths, args.frames, pn, args.num, stride)
        _, t, h, w, _ = clips.shape
        sched, plan = plan_for(t, h, w, q, stride)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    k_total = tt.scales_per_clip(plan)
    k = k_total if args.scales is None else args.scales
    if not 1 <= k <= k_total:
        print(f"error: --scales {args.scales}: a clip of this schedule has {k_total} scales", file=sys.stderr)
        return 2
    rows = scale_table(model, variables["params"], clips, plan, args.batch)[:k]
    print(format_table(rows, f"{ckpt}: {clips.shape[0]} clips of {t}x{h}x{w}, {k_total} scales per clip "
                             f"{[s[1:] for s in sched.scales[:k_total]]}, repetitions {list(sched.reps)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
