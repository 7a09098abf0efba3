"""A toy dataset of moving shapes: a colored circle, square or triangle crossing a plain black background.

Each video gets a caption such as ``"a red circle moving left"``; everything is a deterministic function of the
seed and the video's number (video ``i`` is the same whatever ``--num`` is). Written as H.264 mp4 (PyAV) plus two
metadata files describing the same videos::

    OUT/videos/00000.mp4 ...
    OUT/toy.jsonl                       native format: path (relative to OUT), caption, shape, color, direction
    OUT/reference/000000/toy.jsonl      the reference's format (video_path relative to OUT: load with root=OUT)

Command line: ``python -m infstar_jax.data.toy --out DIR --num N --frames 17 --size 64x64 [--seed 0 --fps 16]``
(``--size`` is WIDTHxHEIGHT, both even).
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import json
import os
import sys

import numpy as np

from infstar_jax import schedules

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (170, 60, 220),
}
DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
BACKGROUND = (0, 0, 0)
SUPERSAMPLE = 4  # sub-pixels per side for anti-aliased edges


@dataclasses.dataclass(frozen=True)
class ShapeMotion:
    """One toy video: a shape of ``radius`` pixels whose center moves from ``start`` to ``end`` ((y, x) pixels)."""

    shape: str
    color: str
    direction: str
    radius: float
    start: tuple[float, float]
    end: tuple[float, float]

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


def sample_motion(rng: np.random.Generator, height: int, width: int) -> ShapeMotion:
    """Draws a shape, color, direction and a straight path that keeps the shape inside the frame."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    radius = float(min(height, width) * rng.uniform(0.12, 0.18))
    margin = radius + 1.0
    dy, dx = DIRECTIONS[direction]
    along = width if dx else height
    travel = rng.uniform(0.45, 0.65) * (along - 2 * margin)
    lo = margin + rng.uniform(0.0, (along - 2 * margin) - travel)
    a0, a1 = (lo, lo + travel) if (dx > 0 or dy > 0) else (lo + travel, lo)
    across = rng.uniform(margin, (height if dx else width) - margin)
    if dx:
        start, end = (across, a0), (across, a1)
    else:
        start, end = (a0, across), (a1, across)
    return ShapeMotion(shape, color, direction, radius, (float(start[0]), float(start[1])),
                       (float(end[0]), float(end[1])))


def _coverage(shape: str, cy: float, cx: float, r: float, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape: ``[H, W] float32``."""
    s = SUPERSAMPLE
    y = (np.arange(height * s, dtype=np.float32) + 0.5) / s
    x = (np.arange(width * s, dtype=np.float32) + 0.5) / s
    yy, xx = np.meshgrid(y - cy, x - cx, indexing="ij")
    if shape == "circle":
        inside = yy * yy + xx * xx <= r * r
    elif shape == "square":  # side 1.8 r: about the circle's area
        inside = (np.abs(yy) <= 0.9 * r) & (np.abs(xx) <= 0.9 * r)
    elif shape == "triangle":  # equilateral, pointing up, circumradius 1.2 r
        R = 1.2 * r
        k = np.sqrt(3.0)
        inside = (yy <= R / 2) & (k * xx - yy <= R) & (-k * xx - yy <= R)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(height, s, width, s).mean(axis=(1, 3), dtype=np.float32)


def render(motion: ShapeMotion, num_frames: int, height: int, width: int) -> np.ndarray:
    """The video of ``motion``: ``[num_frames, height, width, 3] uint8`` RGB."""
    color = np.asarray(COLORS[motion.color], np.float32)
    bg = np.asarray(BACKGROUND, np.float32)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        f = t / max(1, num_frames - 1)
        cy = motion.start[0] + f * (motion.end[0] - motion.start[0])
        cx = motion.start[1] + f * (motion.end[1] - motion.start[1])
        a = _coverage(motion.shape, cy, cx, motion.radius, height, width)[..., None]
        out[t] = np.round(bg * (1 - a) + color * a).astype(np.uint8)
    return out


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 (what decoders assume for an untagged H.264 stream).

    Args:
      rgb: ``[H, W, 3] uint8`` with even H and W.
    Returns:
      ``[3H/2, W] uint8``: the Y plane, then the 2x2-averaged Cb and Cr planes, flat (PyAV's ``yuv420p`` layout).
    """
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def half(c):
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).reshape(-1)

    planes = np.concatenate([y.reshape(-1), half(cb), half(cr)]).reshape(h * 3 // 2, w)
    return np.clip(np.round(planes), 0, 255).astype(np.uint8)


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    """Writes ``[T, H, W, 3] uint8`` RGB as H.264 (yuv420p, near-lossless), byte-for-byte reproducibly."""
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with 4:2:0 chroma needs an even frame size, got {w}x{h}")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "10", "preset": "veryfast"}
        for i, frame in enumerate(frames):
            # Our own RGB->YUV and explicit timestamps: with PyAV's RGB input conversion or without timestamps the
            # encoder's output differs from run to run.
            vf = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            vf.pts, vf.time_base = i, fractions.Fraction(1, int(fps))
            container.mux(stream.encode(vf))
        container.mux(stream.encode())


def generate(out: str, num: int, frames: int = 17, size: tuple[int, int] = (64, 64), seed: int = 0,
             fps: int = schedules.FPS, progress: bool = False) -> list[dict]:
    """Writes ``num`` toy videos and both metadata files under ``out``.

    Args:
      size: (width, height) in pixels, both even.
      frames: frames per video (16 * seconds + 1 gives whole training durations: 17 = 1 s, 81 = 5 s at 16 fps).
    Returns:
      the native-format records as written to ``OUT/toy.jsonl``.
    """
    width, height = size
    if num < 1 or frames < 1 or fps < 1:
        raise ValueError(f"need num >= 1, frames >= 1 and fps >= 1, got num={num}, frames={frames}, fps={fps}")
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    os.makedirs(os.path.join(out, "reference", "000000"), exist_ok=True)
    native, reference = [], []
    iterator = range(num)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="toy videos", unit="video")
    for i in iterator:
        motion = sample_motion(np.random.default_rng([seed, i]), height, width)
        rel = f"videos/{i:05d}.mp4"
        write_mp4(os.path.join(out, rel), render(motion, frames, height, width), fps)
        native.append({"path": rel, "caption": motion.caption, "shape": motion.shape, "color": motion.color,
                       "direction": motion.direction})
        reference.append({"video_path": rel, "begin_frame_id": 0, "end_frame_id": frames,
                          "tarsier2_caption": motion.caption, "width": width, "height": height,
                          "h_div_w": height / width, "fps": fps})
    for path, records in ((os.path.join(out, "toy.jsonl"), native),
                          (os.path.join(out, "reference", "000000", "toy.jsonl"), reference)):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return native


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT like 64x64, got {text!r}") from None
    if w < 2 or h < 2 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"--size needs even width and height >= 2, got {text!r}")
    return w, h


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infstar_jax.data.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=256, help="number of videos")
    parser.add_argument("--frames", type=int, default=17, help="frames per video (17 = 1 s at 16 fps)")
    parser.add_argument("--size", type=_size, default=(64, 64), help="WIDTHxHEIGHT, even (default 64x64)")
    parser.add_argument("--fps", type=int, default=schedules.FPS, help="frame rate (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out, args.num, args.frames, args.size, args.seed, args.fps, progress=True)
    print(f"wrote {args.num} videos to {os.path.join(args.out, 'videos')}\n"
          f"metadata: {os.path.join(args.out, 'toy.jsonl')} (native), "
          f"{os.path.join(args.out, 'reference')} (reference format, root={args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
