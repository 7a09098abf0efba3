"""Video and image decoding for training, following the reference's rules (SPEC §7.1).

The reference (``infinity/dataset/dataset_joint_vi.py:prepare_video_input`` with ``EncodedVideoOpencv``) reads a clip
of ``sample_frames`` frames as follows; we decode with PyAV instead of OpenCV but keep every index and size rule:

* the clip starts at ``start = max(0, begin_frame_id / container_fps)`` seconds and spans
  ``(sample_frames - 1) / video_fps`` seconds (``video_fps`` = 16, the training frame rate); the clip may overrun the
  file by at most 0.2 s and is then clipped to the file's duration (``n / container_fps``);
* frame indices ``linspace(ceil(fps*start), min(ceil(fps*end), n) - 1, sample_frames)`` cast to int (truncation),
  indices counted in decode order from the first frame; repeated indices repeat the frame;
* each RGB frame is resized with PIL LANCZOS so that it covers the target box (the other side by ``int()``
  truncation), center-cropped to the target and mapped to ``2x - 1`` with ``x = uint8 / 255`` in float32;
* the target box is the ``'pixel'`` size of the h/w template nearest to the decoded frame's h/w.

Decoding errors are typed (``VideoError`` subclasses with a ``reason``) so the pipeline can skip and count them.
Frames are channels-last: ``[T, H, W, 3]``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from infstar_jax import schedules

CLIP_OVERRUN_S = 0.2  # the reference asserts end <= duration + 0.2 s before clipping the window
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class VideoError(Exception):
    """A video (or image) that cannot be used; ``reason`` names the kind of failure for the skip counters."""

    reason = "unreadable"

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


class VideoNotFoundError(VideoError):
    reason = "missing"


class VideoUnreadableError(VideoError):
    """Not a decodable video/image: corrupt header, no video stream, unknown format."""

    reason = "unreadable"


class VideoTruncatedError(VideoError):
    """The container promises more frames than the stream delivers (cut-off file, broken packets)."""

    reason = "truncated"


class ClipOutOfRangeError(VideoError):
    """The requested clip ends more than 0.2 s after the end of the video."""

    reason = "too_short"


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video: frame rate, frame count (OpenCV's ``CAP_PROP_FRAME_COUNT`` rule) and
    frame size."""

    path: str
    fps: float
    num_frames: int
    height: int
    width: int

    @property
    def duration(self) -> float:
        """Seconds, as the reference computes it: ``num_frames / fps``."""
        return self.num_frames / self.fps


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise VideoNotFoundError(path, "no such file")


def _open(path: str):
    import av  # the [video] extra; imported lazily so metadata handling works without it

    _check_exists(path)
    try:
        container = av.open(path)
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types for bad input
        raise VideoUnreadableError(path, f"cannot open as a video container ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoUnreadableError(path, "the container has no video stream")
    return container


def _stream_info(path: str, container) -> VideoInfo:
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.base_rate or stream.guessed_rate
    if not rate or float(rate) <= 0:
        raise VideoUnreadableError(path, "the video stream has no frame rate")
    fps = float(rate)
    n = int(stream.frames or 0)
    if n <= 0:  # OpenCV's fallback when the container has no frame count: round(duration * fps)
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1_000_000
        else:
            seconds = 0.0
        n = int(math.floor(seconds * fps + 0.5))
    if n <= 0:
        raise VideoUnreadableError(path, "the video stream has no frames")
    ctx = stream.codec_context
    if not ctx.height or not ctx.width:
        raise VideoUnreadableError(path, "the video stream has no frame size")
    return VideoInfo(path=path, fps=fps, num_frames=n, height=int(ctx.height), width=int(ctx.width))


def probe(path: str) -> VideoInfo:
    """Frame rate, frame count and size of a video file, without decoding frames."""
    container = _open(path)
    try:
        return _stream_info(path, container)
    finally:
        container.close()


def clip_window(info: VideoInfo, start_s: float, sample_frames: int, video_fps: float) -> tuple[float, float]:
    """The reference's clip window in seconds: ``(start, min(start + (sample_frames-1)/video_fps, duration))``.

    Raises ``ClipOutOfRangeError`` if the clip would end more than 0.2 s after the video (the reference's assertion),
    or starts after it.
    """
    start = max(0.0, float(start_s))
    end = start + (sample_frames - 1) / video_fps
    if end > info.duration + CLIP_OVERRUN_S or start > info.duration:
        raise ClipOutOfRangeError(
            info.path,
            f"a clip of {sample_frames} frames at {video_fps} fps from {start:.3f}s ends at {end:.3f}s, but the video "
            f"has {info.num_frames} frames at {info.fps:g} fps ({info.duration:.3f}s)")
    return start, min(end, info.duration)


def frame_indices(fps: float, num_frames: int, start_s: float, end_s: float, sample_frames: int) -> np.ndarray:
    """The reference's frame-index rule (``video_decoder.py:get_clip``).

    Returns ``[sample_frames] int64``:
    ``linspace(ceil(fps*start), min(ceil(fps*end), num_frames) - 1, sample_frames)`` truncated to int.
    """
    start_idx = math.ceil(fps * start_s)
    end_idx = min(math.ceil(fps * end_s), num_frames)
    return np.linspace(start_idx, end_idx - 1, sample_frames).astype(np.int64)


def read_frames(path: str, indices: np.ndarray) -> np.ndarray:
    """Decodes the frames at ``indices`` (decode order, repeats allowed) as RGB.

    Returns ``[len(indices), H, W, 3] uint8``. Decoding is sequential from the first frame, exactly as the reference's
    OpenCV reader, so the index of a frame is its position in the decoded stream.
    """
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or indices.size == 0 or indices.min() < 0:
        raise ValueError(f"frame indices must be a non-empty 1-D array of non-negative ints, got {indices!r}")
    wanted = {int(i): [] for i in np.unique(indices)}
    last = int(indices.max())
    container = _open(path)
    got = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = {}
        try:
            for i, frame in enumerate(container.decode(stream)):
                got = i + 1
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        except Exception as e:  # noqa: BLE001 - a broken packet mid-stream: report what was reached
            raise VideoTruncatedError(
                path, f"decoding failed after {got} frames while frame {last} was needed ({type(e).__name__}: {e})"
            ) from e
    finally:
        container.close()
    if got <= last:
        raise VideoTruncatedError(path, f"the stream ended after {got} frames but frame {last} was needed")
    return np.stack([frames[int(i)] for i in indices])


def cover_size(width: int, height: int, tgt_h: int, tgt_w: int) -> tuple[int, int]:
    """``(resized_width, resized_height)`` of the reference's ``transform``: the side that is relatively short
    becomes the target size, the other keeps the aspect ratio with ``int()`` truncation (same float expressions)."""
    if width / height <= tgt_w / tgt_h:
        return tgt_w, int(tgt_w / (width / height))
    return int((width / height) * tgt_h), tgt_h


def resize_crop(image: np.ndarray, tgt_h: int, tgt_w: int) -> np.ndarray:
    """Resize-to-cover (PIL LANCZOS) and center crop.

    Args:
      image: ``[H, W, 3] uint8`` RGB.
    Returns:
      ``[tgt_h, tgt_w, 3] uint8``.
    """
    from PIL import Image

    height, width = image.shape[:2]
    rw, rh = cover_size(width, height, tgt_h, tgt_w)
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), resample=Image.LANCZOS))
    y = (resized.shape[0] - tgt_h) // 2
    x = (resized.shape[1] - tgt_w) // 2
    return resized[y:y + tgt_h, x:x + tgt_w]


def to_signed_unit(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] as the reference: ``x = v / 255`` (torchvision ``to_tensor``), then ``x + x - 1``."""
    x = np.asarray(images, np.uint8).astype(np.float32) / np.float32(255)
    return (x + x) - np.float32(1)


def target_size(height: int, width: int, pn: int | str,
                stride: int = schedules.SPATIAL_STRIDE) -> tuple[float, tuple[int, int]]:
    """``(template, (tgt_h, tgt_w))`` for frames of ``height x width``: the nearest h/w template's pixel size at the
    pixel level ``pn`` (e.g. "0.40M", or a number of scales) for a tokenizer of spatial ``stride``."""
    template = schedules.nearest_template(height / width)
    return template, schedules.pixel_hw(template, pn, stride)


@dataclasses.dataclass(frozen=True)
class Clip:
    """A decoded, transformed clip.

    ``frames``: ``[T, tgt_h, tgt_w, 3] float32`` in [-1, 1]; ``indices``: ``[T] int64`` decoded frame indices
    (``[0]`` for images); ``template``: the h/w template used; ``info``: the source's ``VideoInfo``.
    """

    frames: np.ndarray
    indices: np.ndarray
    template: float
    info: VideoInfo


def transform_frames(frames: np.ndarray, pn: int | str,
                     stride: int = schedules.SPATIAL_STRIDE) -> tuple[float, np.ndarray]:
    """``[T, H, W, 3] uint8`` RGB -> ``(template, [T, tgt_h, tgt_w, 3] float32 in [-1, 1])``."""
    template, (tgt_h, tgt_w) = target_size(frames.shape[1], frames.shape[2], pn, stride)
    out = np.stack([resize_crop(f, tgt_h, tgt_w) for f in frames])
    return template, to_signed_unit(out)


def load_clip(path: str, sample_frames: int, pn: int | str, *, video_fps: float = schedules.FPS,
              begin_frame_id: int | None = None, start_s: float | None = None,
              info: VideoInfo | None = None, stride: int = schedules.SPATIAL_STRIDE) -> Clip:
    """Reads ``sample_frames`` frames of a video with the reference's rules and transforms them.

    Args:
      path: local video file.
      sample_frames: frames to return (``16 * seconds + 1`` in training).
      pn: pixel level ("0.40M", "0.90M", ...) or number of scales; with the frame size it fixes the target size.
      video_fps: the training frame rate (16): the clip spans ``(sample_frames - 1) / video_fps`` seconds.
      begin_frame_id: the reference's start, in frames of the container's frame rate.
      start_s: alternatively the start in seconds (native metadata); default 0.
      info: a ``probe`` result to reuse.
      stride: the tokenizer's pixels per latent position (16 for the release), with ``pn`` the target size.
    Returns:
      a ``Clip``. Raises a ``VideoError`` subclass for a missing, unreadable, truncated or too short video.
    """
    if begin_frame_id is not None and start_s is not None:
        raise ValueError("give begin_frame_id or start_s, not both")
    info = info or probe(path)
    start = begin_frame_id / info.fps if begin_frame_id is not None else (start_s or 0.0)
    start, end = clip_window(info, start, sample_frames, video_fps)
    indices = frame_indices(info.fps, info.num_frames, start, end, sample_frames)
    raw = read_frames(path, indices)
    template, frames = transform_frames(raw, pn, stride)
    return Clip(frames=frames, indices=indices, template=template, info=info)


def load_image(path: str, pn: int | str, stride: int = schedules.SPATIAL_STRIDE) -> Clip:
    """Reads an image (converted to RGB) as a one-frame clip ``[1, tgt_h, tgt_w, 3] float32``."""
    from PIL import Image, UnidentifiedImageError

    _check_exists(path)
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise VideoUnreadableError(path, f"cannot read as an image ({type(e).__name__}: {e})") from e
    info = VideoInfo(path=path, fps=1.0, num_frames=1, height=rgb.shape[0], width=rgb.shape[1])
    template, frames = transform_frames(rgb[None], pn, stride)
    return Clip(frames=frames, indices=np.zeros((1,), np.int64), template=template, info=info)
