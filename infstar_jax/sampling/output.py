"""Writing samples: mp4 (PyAV, 16 fps), PNG frames, and a contact sheet of a batch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from infstar_jax.schedules import FPS


def _atomic(path: Path):
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    return tmp, lambda: os.replace(tmp, path)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = FPS, crf: int = 18) -> Path:
    """``frames [T, H, W, 3]`` uint8 RGB -> H.264 mp4 (yuv420p; H and W must be even)."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, commit = _atomic(path)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    commit()
    return path


def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """``[H, W, 3]`` uint8 RGB -> PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, commit = _atomic(path)
    Image.fromarray(np.asarray(image)).save(tmp, format="PNG")
    commit()
    return path


def contact_sheet(frames: np.ndarray, columns: int | None = None, frames_per_video: int = 6, gap: int = 2) -> np.ndarray:
    """A grid image: one row per sample (``frames [B, T, H, W, 3]``), ``frames_per_video`` evenly spaced frames per
    row (one column for images), separated by ``gap`` white pixels. ``columns`` overrides the frame count."""
    frames = np.asarray(frames)
    b, t, h, w, _ = frames.shape
    n = min(t, columns or frames_per_video)
    idx = np.linspace(0, t - 1, n).round().astype(int)
    sheet = np.full((b * h + (b - 1) * gap, n * w + (n - 1) * gap, 3), 255, np.uint8)
    for i in range(b):
        for j, k in enumerate(idx):
            sheet[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = frames[i, k]
    return sheet
